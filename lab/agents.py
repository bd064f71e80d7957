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
        wait_for_output(self.proc, self.text, lambda text: marker in text, marker, timeout)

    def stop(self):
        stop_process(self.proc, 10)
        self.log.close()


def wait_for_output(proc, text, seen, what, timeout):
    """Poll ``text()`` until ``seen(it)`` while ``proc`` runs; else AssertionError naming ``what``, with the output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if seen(text()):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError("%r not seen within %ss; output:\n%s" % (what, timeout, text()[-5000:]))


def stop_process(proc, timeout):
    """End ``proc`` by its PID: SIGTERM, SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


# Run with /usr/bin/python3 (Debian's python3-libnbd; the venv has no nbd module): argv[1] is the scoped server
# address, argv[2] a JSON spec. The socket is connected first and handed over because libnbd would send a URI's
# host as TLS SNI, which nbdkit's GnuTLS refuses for an IPv6 literal ("disallowed SNI server name").
NBD_PROBE = r"""
import json, socket, sys, nbd
host, spec = sys.argv[1], json.loads(sys.argv[2])

def connect(psk_file):
    sock = socket.create_connection((host, 10809), timeout=20)
    h = nbd.NBD()
    h.set_export_name("stiefel")
    if psk_file:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_username("stiefel")
        h.set_tls_psk_file(psk_file)
    else:
        h.set_tls(nbd.TLS_DISABLE)
    h.connect_socket(sock.detach())
    return h

out = {}
if spec["io_psk"]:
    h = connect(spec["io_psk"])
    out.update(size=h.get_size(), can_flush=h.can_flush(), can_fua=h.can_fua(), tls=h.get_tls_negotiated())
    block = b"stiefel" * 585 + b"!"
    h.pwrite(block, 4096, flags=nbd.CMD_FLAG_FUA)
    h.flush()
    out["readback"] = "ok" if h.pread(4096, 4096) == block else "mismatch"
    h.shutdown()
for name, psk_file in spec["attempts"]:
    try:
        out[name] = "accepted %d" % connect(psk_file).get_size()
    except (nbd.Error, OSError) as exc:
        out[name] = "refused: %s" % exc
print(json.dumps(out))
"""


def nbd_probe(ns, host, attempts, io_psk=None, netns=None):
    """libnbd against the server's export from the client namespace (unless ``netns`` names another).

    ``host`` is the scoped address (``fe80::…%veth``). With ``io_psk`` (a PSK file) it first opens the export over
    TLS and records size, flush/FUA, negotiated TLS and a FUA write read back; then each ``(name, psk_file or
    None)`` of ``attempts`` connects (None: plaintext) and is recorded as ``"accepted SIZE"`` or ``"refused: …"``.
    Returns that dict.
    """
    spec = json.dumps({"io_psk": io_psk, "attempts": [list(attempt) for attempt in attempts]})
    proc = subprocess.run(ns.exec_argv(netns or ns.client, "/usr/bin/python3", "-c", NBD_PROBE, host, spec),
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise AssertionError("the NBD probe failed (rc=%d):\n%s" % (proc.returncode, proc.stderr))
    return json.loads(proc.stdout)
