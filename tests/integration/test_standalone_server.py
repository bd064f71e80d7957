"""Standalone server mode against the real client agent, in two network namespaces (no QEMU).

``stiefel-server --config`` (and ``stiefelctl server``) serves an image file
and a /boot directory of plain files in one namespace; the real
``stiefel-client`` (``--stop-before-kexec``) finds it over a veth pair like any
server and verifies the payload; the export is then read from the client's
namespace with nbdinfo and nbdcopy through the same TLS-PSK proxy shape the
laptop's NBD-root hook uses (nbdkit's nbd plugin on a socket bash opened to
the scoped link-local address). Interfaces the config does not name stay as
they were. The namespaces (the ``world`` fixture, tests/integration/conftest.py), the agent processes
and the fake /boot are lab/netns.py's and lab/agents.py's, shared with test_agents_netns.

Also here: the ``standalone_server`` role (playbooks/serve_standalone.yml) in
check mode, for real and again on a throwaway overlay of this machine's
/etc and /usr, and its unit file through ``systemd-analyze verify``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile, runtime_manifest
from ansible_collections.stiefel.system.plugins.module_utils.fileio import sha256_file as _sha
from lab import ansible_output
from lab.agents import AGENTS, ENV, PYTHON, Agent, fake_boot, run_client, write_key
from lab.netns import run as _run
from stiefel_runtime.server import PEERS_INTERVAL

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DISK_SIZE = 64 * 1024 * 1024


def _link(ns, name):
    """``(state, mtu)`` of a link in a namespace (``ip -j``)."""
    info = json.loads(_run("ip", "-j", "-n", ns, "link", "show", name).stdout)[0]
    return ("UP" if "UP" in info["flags"] else "DOWN"), info["mtu"]


def _mac(ns, name):
    return json.loads(_run("ip", "-j", "-n", ns, "link", "show", name).stdout)[0]["address"]


def _disk(tmp):
    """A 64 MiB image file with recognisable data at its start and end."""
    path = os.path.join(tmp, "desktop.img")
    with open(path, "wb") as handle:
        handle.write(os.urandom(1024 * 1024))
        handle.truncate(DISK_SIZE - 4096)
        handle.seek(DISK_SIZE - 4096)
        handle.write(b"stiefel-end" * 372 + b"!!!!")
    return path


def _pids(ns):
    """PIDs of every process in a namespace (``ip netns pids``)."""
    return {int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split()}


def _proc_name(pid):
    try:
        with open("/proc/%d/comm" % pid) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _read_export(ns, tmp, manifest, run_dir, name):
    """nbdinfo --json and nbdcopy of the export, from the client namespace, through an nbdkit TLS-PSK proxy."""
    entries = cpio.read_newc(open(os.path.join(run_dir, "nbd-psk.cpio"), "rb").read())
    psk = [e for e in entries if e.name == "etc/stiefel/nbd.psk"][0]
    psk_file = os.path.join(tmp, name + ".psk")
    fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(psk.data)
    copy = os.path.join(tmp, name + "-copy.img")
    info = os.path.join(tmp, name + "-info.json")
    # $0..$6: host, port, export, socket, psk file, info output, copy output; $uri is nbdkit --run's.
    script = ('exec 3<>"/dev/tcp/$0/$1" || exit 111\n'
              'exec nbdkit -f --log=stderr -U "$3" nbd socket-fd=3 export="$2" tls=require tls-username=stiefel '
              'tls-psk="$4" --run "nbdinfo --json \\"\\$uri\\" > $5 && nbdcopy --connections=1 \\"\\$uri\\" $6 '
              '&& sleep %d"' % (PEERS_INTERVAL + 2))
    argv = ["bash", "-c", script, "%s%%%s" % (manifest["server"], manifest["interface"]), "10809", "stiefel",
            os.path.join(tmp, name + ".sock"), psk_file, info, copy]
    proc = subprocess.run(ns.exec_argv(ns.client, *argv), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(info) as handle:
        return json.load(handle), copy


def _standalone_config(tmp, key_path, boot, disk, interfaces, mtu=None):
    path = os.path.join(tmp, "server.conf")
    lines = ["# written by test_standalone_server", "disk = %s" % disk, "boot_dir = %s" % boot,
             "key = %s" % key_path, "interfaces = %s" % interfaces, "run_dir = %s" % os.path.join(tmp, "srv")]
    if mtu:
        lines.append("mtu = %d" % mtu)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def test_standalone_server_serves_an_image_to_the_client(world):
    ns, tmp, agents = world
    key_path = write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    boot = fake_boot(tmp)
    disk = _disk(tmp)
    # A second link of the "laptop" that the config does not name: it must stay down at MTU 1500.
    other = "stfoa%x" % (os.getpid() & 0xFFFFF)  # no dummy module here: a veth pair inside the namespace
    _run("ip", "-n", ns.server, "link", "add", other, "type", "veth", "peer", "name",
               "stfob%x" % (os.getpid() & 0xFFFFF))
    before = _link(ns.server, other)
    conf = _standalone_config(tmp, key_path, boot, disk, _mac(ns.server, ns.veth_s), mtu=9000)
    server = Agent(ns, [PYTHON, os.path.join(AGENTS, "stiefel-server"), "--config", conf,
                        "--power-sysfs", os.path.join(tmp, "no-power")], os.path.join(tmp, "server.log"))
    agents.append(server)
    server.wait_for("stiefel-server: ready", 60)
    assert "standalone mode: listening on %s" % _mac(ns.server, ns.veth_s) in server.text()
    assert _link(ns.server, ns.veth_s) == ("UP", 9000)
    assert _link(ns.server, other) == before == ("DOWN", 1500)

    proc, run_dir = run_client(ns, tmp, key_path, "client", 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.text()
    assert "stiefel-client: payload verified" in proc.stdout
    line = [l for l in proc.stdout.splitlines() if l.startswith("stiefel-client: manifest ")][0]
    manifest = json.loads(line[len("stiefel-client: manifest "):])
    assert _sha(os.path.join(run_dir, "payload", "kernel")) == _sha(os.path.join(boot, "vmlinuz-6.1.0-test"))
    assert _sha(os.path.join(run_dir, "payload", "initrd")) == _sha(os.path.join(boot, "initrd.img-6.1.0-test"))
    cmdline = manifest["kexec_cmdline"]
    assert cmdline.startswith("root=UUID=1234-abcd ro quiet stiefel.blocksize=512 stiefel.mac=")
    assert "stiefel.tls=psk" in cmdline and "stiefel.export=stiefel" in cmdline

    info, copy = _read_export(ns, tmp, manifest, run_dir, "client")
    export = info["exports"][0]
    print("nbdinfo: %s" % json.dumps(export, sort_keys=True))
    assert export["export-size"] == DISK_SIZE
    assert export["can_flush"] and export["can_fua"] and export["can_multi_conn"]
    assert info["TLS"] is False  # the proxy's Unix socket is plain; its link to the server is TLS-only
    assert _sha(copy) == _sha(disk)
    server.wait_for(" connected", 15)
    text = server.text()
    assert re.search(r"NBD client fe80::\S+ connected", text), text
    assert "sending payload" in text and "payload sent" in text

    # SIGTERM stops the server and its nbdkit; the image is closed again.
    nbdkit = [p for p in _pids(ns.server) if _proc_name(p) == "nbdkit"]
    assert len(nbdkit) == 1, text
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 143
    time.sleep(0.5)
    assert not _pids(ns.server)


def test_stiefelctl_server_says_who_connected(world):
    ns, tmp, agents = world
    key_path = write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    boot = fake_boot(tmp)
    disk = _disk(tmp)
    ctl = Agent(ns, [sys.executable, os.path.join(REPO, "bin", "stiefelctl"), "server", "--disk", disk,
                     "--boot-dir", boot, "--key", key_path, "--interface", ns.veth_s],
                os.path.join(tmp, "stiefelctl.log"))
    agents.append(ctl)
    ctl.wait_for("stiefelctl: waiting for a client", 60)
    proc, run_dir = run_client(ns, tmp, key_path, "client", 60)
    assert proc.returncode == 0, proc.stdout + ctl.text()
    line = [l for l in proc.stdout.splitlines() if l.startswith("stiefel-client: manifest ")][0]
    manifest = json.loads(line[len("stiefel-client: manifest "):])
    ctl.wait_for("has its boot payload", 10)
    client = re.search(r"stiefelctl: client (\S+) connected: sending the boot payload", ctl.text()).group(1)
    assert client.startswith("fe80::")
    _read_export(ns, tmp, manifest, run_dir, "ctl")
    ctl.wait_for("attached the disk over NBD", 15)
    print(ctl.text()[-3000:])
    ctl.proc.send_signal(signal.SIGTERM)
    assert ctl.proc.wait(20) == 0
    time.sleep(0.5)
    assert not _pids(ns.server)


def _root_device():
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True, text=True,
                            check=False).stdout.strip()
    return source if source.startswith("/dev/") and os.path.exists(source) else None


def test_the_running_systems_disk_is_refused(world):
    ns, tmp, _agents = world
    root = _root_device()
    if root is None:
        pytest.skip("/ is not on a block device here")
    key_path = write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    boot = fake_boot(tmp)
    before = _link(ns.server, ns.veth_s)
    proc = subprocess.run(ns.exec_argv(ns.server, PYTHON, os.path.join(AGENTS, "stiefel-server"), "--standalone",
                                       "--disk", root, "--boot-dir", boot, "--key", key_path, "--interface",
                                       ns.veth_s, "--run-dir", os.path.join(tmp, "srv")),
                          capture_output=True, text=True, env=ENV, timeout=60, check=False)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 2
    assert "refused: refusing to export %s" % root in proc.stdout and "holds the running system" in proc.stdout
    assert "ready" not in proc.stdout
    assert _link(ns.server, ns.veth_s) == before  # refused before any link was touched


# --------------------------------------------------------------------------- the role and its unit

ANSIBLE_PLAYBOOK = ansible_output.ansible_bin("ansible-playbook")
PLAYBOOK = os.path.join(REPO, "playbooks", "serve_standalone.yml")


@pytest.fixture
def overlay_root():
    """A chroot whose /etc, /usr and /var are copy-on-write overlays of this machine's: the role's writes
    land in a temporary upper directory and vanish afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (overlay mounts, chroot)")
    if not os.path.exists(ANSIBLE_PLAYBOOK):
        pytest.skip("needs the virtualenv (scripts/bootstrap.sh)")
    tmp = tempfile.mkdtemp(prefix="stf-role-")
    root = os.path.join(tmp, "root")
    mounts = []
    try:
        for top in ("etc", "usr", "var"):
            upper, work, target = (os.path.join(tmp, d, top) for d in ("upper", "work", "root"))
            for path in (upper, work, target):
                os.makedirs(path)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            "lowerdir=/%s,upperdir=%s,workdir=%s" % (top, upper, work), target], check=True)
            mounts.append(target)
        for link in ("bin", "sbin", "lib", "lib64"):
            if os.path.islink("/" + link):
                os.symlink(os.readlink("/" + link), os.path.join(root, link))
        for path in ("proc", "dev", "tmp", "run", "srv"):
            os.makedirs(os.path.join(root, path))
        subprocess.run(["mount", "-t", "proc", "proc", os.path.join(root, "proc")], check=True)
        mounts.append(os.path.join(root, "proc"))
        subprocess.run(["mount", "--bind", "/dev", os.path.join(root, "dev")], check=True)
        mounts.append(os.path.join(root, "dev"))
        yield root, os.path.join(tmp, "upper")
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def _converge(root, *extra):
    run = ansible_output.run_playbook(
        PLAYBOOK, "-i", "%s," % root, "-c", "community.general.chroot",
        "-e", "stiefel_hosts=%s" % root, "-e", "ansible_become=false",
        "-e", "ansible_python_interpreter=/usr/bin/python3", "-e", "standalone_server_disk=/srv/desktop.img",
        "-e", "standalone_server_boot_dir=/srv/boot", "-e", '{"standalone_server_interfaces": ["52:54:00:ab:cd:02"]}',
        "-e", "standalone_server_mtu=9000", "-e", "standalone_server_install_packages=false", *extra, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    changed = run.changed()
    print("serve_standalone.yml %s: changed=%d (%s)" % (" ".join(extra), changed, ", ".join(
        sorted(set(run.changed_tasks())))))
    return changed, run.stdout


def _tree(upper):
    out = {}
    for base, _dirs, files in os.walk(upper):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, upper)] = _sha(path) if os.path.isfile(path) else None
    return out


def test_role_check_mode_converge_idempotence_and_unit(overlay_root):
    root, upper = overlay_root
    unit = os.path.join(root, "etc", "systemd", "system", "stiefel-server-standalone.service")
    conf = os.path.join(root, "etc", "stiefel", "server.conf")
    before = _tree(upper)
    changed, _out = _converge(root, "--check")
    assert changed > 0
    assert _tree(upper) == before and not os.path.exists(unit)  # check mode wrote nothing
    changed, _out = _converge(root)
    assert changed > 0
    assert os.path.exists(unit) and os.path.exists(conf)
    assert oct(os.stat(conf).st_mode & 0o777) == "0o644"
    with open(conf) as handle:
        text = handle.read()
    from stiefel_runtime import server_config

    config = server_config.parse(text)
    assert config.disk == "/srv/desktop.img" and config.boot_dir == "/srv/boot"
    assert config.interfaces == ("52:54:00:ab:cd:02",) and config.mtu == 9000
    agent = os.path.join(root, "usr", "lib", "stiefel", "agents", "stiefel-server")
    lib = os.path.join(root, "usr", "lib", "stiefel", "python", "stiefel_runtime", "server_config.py")
    assert os.access(agent, os.X_OK) and os.path.exists(lib)
    # exactly the manifest's standalone target, nothing controller-only
    installed = {os.path.relpath(os.path.join(d, f), os.path.join(root, "usr", "lib", "stiefel"))
                 for d, _dirs, files in os.walk(os.path.join(root, "usr", "lib", "stiefel")) for f in files}
    assert installed == {entry.dest for entry in runtime_manifest.entries("standalone", REPO)}
    after = _tree(upper)
    changed, _out = _converge(root)
    assert changed == 0 and _tree(upper) == after
    changed, _out = _converge(root, "--check")
    assert changed == 0
    # A changed setting is one change (the config), the unit unchanged.
    changed, out = _converge(root, "-e", "standalone_server_export_name=desk")
    assert ansible_output.changed_tasks(out) == ["Write the standalone server config"]
    assert changed == 1 and "export_name = desk" in open(conf).read()

    with open(unit) as handle:
        unit_text = handle.read()
    print(unit_text)
    assert "ExecStart=/usr/bin/python3 /usr/lib/stiefel/agents/stiefel-server --config /etc/stiefel/server.conf" \
        in unit_text
    assert "Conflicts=stiefel-autokexec.service" in unit_text
    assert "ReadWritePaths=-/srv/desktop.img" in unit_text
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", "--root=%s" % root,
                                 "/etc/systemd/system/stiefel-server-standalone.service"],
                                capture_output=True, text=True, check=False)
        print("systemd-analyze verify: rc=%d %s%s" % (verify.returncode, verify.stdout, verify.stderr))
        problems = [l for l in (verify.stdout + verify.stderr).splitlines() if "stiefel-server-standalone" in l]
        assert verify.returncode == 0 and not problems, verify.stdout + verify.stderr
