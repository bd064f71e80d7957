"""Running Ansible from the lab and reading what its default callback prints.

One reader for the three things tests and benchmarks take from that text: an ad-hoc module's result
(``host | CHANGED => {...}``), the PLAY RECAP counts and the names of the tasks that reported ``changed``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# colour codes would sit between the words the readers below look for
NO_COLOR = {"ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}

_RECAP_LINE = re.compile(r"^(\S+)\s*:\s*((?:\w+=\d+\s*)+)$")
_SECTION = re.compile(r"^(TASK|RUNNING HANDLER|PLAY|PLAY RECAP) \[(.*)\]|^PLAY RECAP")


def ansible_bin(name):
    """The virtualenv's ``ansible``/``ansible-playbook`` when there is one, else the one on PATH."""
    path = os.path.join(REPO, ".venv", "bin", name)
    return path if os.path.exists(path) else name


def module_result(stdout, returncode, stderr=""):
    """The JSON result of a one-host ad-hoc run (``ansible HOST -m MODULE``), plus ``_rc`` (the exit status)
    and ``failed`` (from the ``| FAILED!`` banner when the module did not say)."""
    marker = stdout.find("=> {")
    assert marker >= 0, "unexpected ansible output:\n%s\n%s" % (stdout, stderr)
    result = json.loads(stdout[marker + 3:])
    result["_rc"] = returncode
    result.setdefault("failed", "| FAILED!" in stdout[:marker])
    return result


def recap(stdout):
    """``{host: {"ok": N, "changed": N, ...}}`` from the PLAY RECAP (the last one when there are several)."""
    hosts = {}
    for line in stdout[stdout.rfind("PLAY RECAP"):].splitlines()[1:]:
        match = _RECAP_LINE.match(line.strip())
        if match:
            hosts[match.group(1)] = {k: int(v) for k, v in (f.split("=") for f in match.group(2).split())}
    return hosts


def recap_changed(stdout, host=None):
    """changed=N of ``host`` in the PLAY RECAP (of its only host when None); AssertionError without one."""
    hosts = recap(stdout)
    if host is None and len(hosts) == 1:
        host = next(iter(hosts))
    assert host in hosts, "no PLAY RECAP line for %s in:\n%s" % (host, stdout[-2000:])
    return hosts[host]["changed"]


def changed_tasks(stdout):
    """Names (without the role's prefix) of the role tasks that reported ``changed`` for any host or item, in
    order. Playbook-level tasks and handlers are left out: the tests count what the roles did."""
    names = []
    task = None
    for line in stdout.splitlines():
        section = _SECTION.match(line)
        if section:
            task = None
            if section.group(1) == "TASK" and " : " in section.group(2):
                task = section.group(2).split(" : ", 1)[1]
            continue
        if task is not None and line.startswith("changed:"):
            names.append(task)
            task = None  # once per task, however many items changed
    return names


class PlaybookRun(object):
    """What one ``ansible-playbook`` run printed, and how long it took."""

    def __init__(self, proc, seconds):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.seconds = seconds

    def changed(self, host=None):
        return recap_changed(self.stdout, host)

    def changed_tasks(self):
        return changed_tasks(self.stdout)


def run_playbook(playbook, *args, timeout=1800, env=None):
    """``ansible-playbook PLAYBOOK ARGS`` in the repository, without colour; a :class:`PlaybookRun`."""
    argv = [ansible_bin("ansible-playbook"), str(playbook)] + [str(a) for a in args]
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(env if env is not None else os.environ, **NO_COLOR))
    return PlaybookRun(proc, time.monotonic() - started)


def run_module_main(module, capsys, **args):
    """A module's ``main()`` in this process with ``args``: its JSON result plus ``rc`` (the exit code).

    For unit tests: ``capsys`` is pytest's fixture, which holds what ``exit_json``/``fail_json`` printed.
    """
    # imported here: the lab's other readers run outside pytest and without ansible's test helpers
    import pytest  # pylint: disable=import-outside-toplevel
    from ansible.module_utils.testing import patch_module_args  # pylint: disable=import-outside-toplevel

    with patch_module_args(args):
        with pytest.raises(SystemExit) as exc:
            module.main()
    result = json.loads(capsys.readouterr().out)
    result["rc"] = exc.value.code
    return result
