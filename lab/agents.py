"""The runtime agents as host processes in the namespaces of :class:`lab.netns.Namespaces`.

What the namespace tests share: this checkout's agent shims and the environment they need, an agent process
whose output goes to a file, a client run to completion, a fake laptop /boot and a key file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ansible_collections.stiefel.system.plugins.module_utils import keyfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENTS = os.path.join(REPO, "agents")
# STIEFEL_AGENT_PYTHON=/usr/bin/python3 runs the agents with Debian 12's python3-pyroute2 0.7 and
# python3-cryptography 38, as on the targets.
PYTHON = os.environ.get("STIEFEL_AGENT_PYTHON") or sys.executable
# What PYTHONPATH=/usr/lib/stiefel/python gives an agent on a target: ansible_collections and stiefel_runtime
# side by side (both under <repo>/collections in a checkout).
ENV = dict(os.environ, PYTHONPATH=os.path.join(REPO, "collections"), PYTHONUNBUFFERED="1")


class Agent(object):
    """An agent process in a namespace (the server's unless ``netns`` names another), its output in a file."""

    def __init__(self, ns, argv, log_path, netns=None):
        self.log_path = log_path
        # The log file and the process live as long as the agent: stop() ends the process (by PID) and closes
        # the file, so neither fits a with block.
        self.log = open(log_path, "w+", encoding="utf-8")  # noqa: SIM115  pylint: disable=consider-using-with
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            ns.exec_argv(netns or ns.server, *argv), stdout=self.log, stderr=subprocess.STDOUT, env=ENV)

    def text(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait_for(self, marker, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("%r not seen within %ss; output:\n%s" % (marker, timeout, self.text()))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # by PID
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_client(ns, tmp, key_path, name, timeout):
    """``stiefel-client --stop-before-kexec`` in the client namespace until it ends; ``(proc, its run dir)``."""
    run_dir = os.path.join(tmp, name)
    argv = ns.exec_argv(ns.client, PYTHON, os.path.join(AGENTS, "stiefel-client"), "--key", key_path,
                        "--cmdline-file", "/dev/null", "--run-dir", run_dir, "--stop-before-kexec",
                        "--timeout", str(timeout))
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout + 30, check=False)
    print("[%s] rc=%d in %.1f s\n%s" % (name, proc.returncode, time.monotonic() - started, proc.stdout[-3000:]))
    return proc, run_dir


def write_key(path, key):
    """Write ``key`` as a stiefel key file (0600); return ``path``."""
    keyfile.write_key_atomic(path, key)
    return path


def fake_boot(tmp):
    """A laptop /boot of random bytes under ``tmp``: kernel, initrd and ``stiefel/boot.json``."""
    boot = os.path.join(tmp, "boot")
    os.makedirs(os.path.join(boot, "stiefel"))
    with open(os.path.join(boot, "vmlinuz-6.1.0-test"), "wb") as handle:
        handle.write(os.urandom(3 * 1024 * 1024 + 17))
    with open(os.path.join(boot, "initrd.img-6.1.0-test"), "wb") as handle:
        handle.write(os.urandom(2 * 1024 * 1024 + 5))
    config = {
        "format": "stiefel-boot-config", "version": 1, "kernel": "vmlinuz-6.1.0-test",
        "initrd": ["initrd.img-6.1.0-test"], "cmdline": "root=UUID=1234-abcd ro quiet", "root": "UUID=1234-abcd",
    }
    with open(os.path.join(boot, "stiefel", "boot.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return boot
