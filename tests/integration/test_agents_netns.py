"""The runtime agents against each other in two network namespaces joined by a veth pair.

Real sockets, real netlink, real nbdkit with TLS-PSK; nothing leaves the
namespaces. Server and client run as separate processes (the agents' own
entry points) with ``--boot-dir``/``--disk`` and ``--stop-before-kexec``;
autokexec runs with ``--dry-run``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import textwrap
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile
from ansible_collections.stiefel.system.plugins.module_utils.fileio import sha256_file as _sha
from lab.agents import AGENTS, ENV, PYTHON, Agent, nbd_probe
from lab.agents import fake_boot as _fake_boot
from lab.agents import run_client as _client
from lab.agents import write_key as _write_key
from lab.netns import run as _run

# The tests assert each command's return code themselves (check= would only turn a refusal they expect into an
# exception), and `_` is the value a test does not look at.
# pylint: disable=subprocess-run-check,disallowed-name

pytestmark = pytest.mark.integration


def test_server_and_client(world):
    ns, tmp, agents = world
    key = keyfile.generate_key()
    key_path = _write_key(os.path.join(tmp, "key"), key)
    boot = _fake_boot(tmp)
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    # a laptop on battery (fake sysfs) and jumbo frames from the kernel command line
    bat = os.path.join(tmp, "power", "BAT0")
    os.makedirs(bat)
    for name, value in (("type", "Battery"), ("capacity", "64"), ("status", "Discharging")):
        with open(os.path.join(bat, name), "w") as handle:
            handle.write(value + "\n")
    with open(os.path.join(tmp, "cmdline"), "w") as handle:
        handle.write("console=ttyS0 stiefel.role=server stiefel.mtu=9000\n")
    server = Agent(ns, [PYTHON, os.path.join(AGENTS, "stiefel-server"), "--key", key_path, "--cmdline-file",
                        os.path.join(tmp, "cmdline"), "--boot-dir", boot, "--disk", disk, "--run-dir",
                        os.path.join(tmp, "srv"), "--power-sysfs", os.path.join(tmp, "power")],
                   os.path.join(tmp, "server.log"))
    agents.append(server)
    server.wait_for("stiefel-server: ready", 60)
    server.wait_for("runs on battery (64%)", 10)
    link = _run("ip", "-n", ns.server, "link", "show", ns.veth_s).stdout
    assert " mtu 9000 " in link, link

    # 1. the right key: discovered, fetched, verified
    proc, run_dir = _client(ns, tmp, key_path, "client1", 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stiefel-client: discovery started" in proc.stdout
    assert "stiefel-client: payload verified" in proc.stdout
    line = [l for l in proc.stdout.splitlines() if l.startswith("stiefel-client: manifest ")][0]
    manifest = json.loads(line[len("stiefel-client: manifest "):])
    got = {f["name"]: f for f in manifest["files"]}
    assert _sha(os.path.join(run_dir, "payload", "kernel")) == _sha(os.path.join(boot, "vmlinuz-6.1.0-test"))
    assert _sha(os.path.join(run_dir, "payload", "initrd")) == _sha(os.path.join(boot, "initrd.img-6.1.0-test"))
    assert got["kernel"]["sha256"] == _sha(os.path.join(boot, "vmlinuz-6.1.0-test"))
    cmdline = manifest["kexec_cmdline"]
    assert cmdline.startswith("root=UUID=1234-abcd ro quiet stiefel.blocksize=512 stiefel.mac=")
    assert "stiefel.server=fe80::" in cmdline and "stiefel.tls=psk" in cmdline
    assert "stiefel.port=10809" in cmdline and "stiefel.export=stiefel" in cmdline

    # 2. the session PSK the client would append opens the NBD export over TLS (and only it)
    entries = cpio.read_newc(open(os.path.join(run_dir, "nbd-psk.cpio"), "rb").read())
    psk = [e for e in entries if e.name == "etc/stiefel/nbd.psk"][0]
    assert psk.perm == 0o600 and psk.data.startswith(b"stiefel:")
    psk_file = os.path.join(tmp, "client.psk")
    with open(psk_file, "wb") as handle:
        handle.write(psk.data)
    os.chmod(psk_file, 0o600)
    with open(psk_file + ".wrong", "w") as handle:
        handle.write("stiefel:" + "ab" * 32 + "\n")
    server_addr = manifest["server"]
    # Exactly the hook's addressing: the server's scoped link-local address.
    try:
        doc = nbd_probe(ns, "%s%%%s" % (server_addr, manifest["interface"]),
                        [("plaintext", None), ("wrong_psk", psk_file + ".wrong")], io_psk=psk_file)
    except AssertionError as exc:
        raise AssertionError("%s\nserver:\n%s" % (exc, server.text())) from exc
    assert doc["size"] == 64 * 1024 * 1024
    assert doc["can_flush"] and doc["can_fua"] and doc["tls"]
    assert doc["readback"] == "ok"
    assert doc["plaintext"].startswith("refused")
    assert doc["wrong_psk"].startswith("refused")

    # 3. a client with another key gets nothing; the server logs the drops and keeps serving
    wrong_path = _write_key(os.path.join(tmp, "wrong-key"), keyfile.generate_key())
    proc, _ = _client(ns, tmp, wrong_path, "client-wrong", 6)
    assert proc.returncode == 1
    assert "payload verified" not in proc.stdout
    assert "WrongKey" in server.text()
    assert server.proc.poll() is None

    # 4. hostile bytes at the HTTP port and the discovery port do not stop the server
    hostile = textwrap.dedent("""
        import socket, os, http.client
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        for n in (0, 1, 60, 200, 513, 2000):
            s.sendto(os.urandom(n), ("ff02::1", 61570, 0, socket.if_nametoindex("%s")))
        c = http.client.HTTPConnection("%s%%%s", 61571, timeout=10)
        c.request("GET", "/payload/" + "00" * 16 + "/" + "11" * 16)
        print("http", c.getresponse().status)
        c = http.client.HTTPConnection("%s%%%s", 61571, timeout=10)
        c.request("GET", "/../../etc/shadow")
        print("http", c.getresponse().status)
    """) % (ns.veth_c, server_addr, ns.veth_c, server_addr, ns.veth_c)
    out = subprocess.run(ns.exec_argv(ns.client, PYTHON, "-c", hostile), capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["http", "403", "http", "404"], out.stdout + out.stderr

    # 5. the right key afterwards still succeeds
    proc, run_dir = _client(ns, tmp, key_path, "client2", 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _sha(os.path.join(run_dir, "payload", "initrd")) == _sha(os.path.join(boot, "initrd.img-6.1.0-test"))
    text = server.text()
    print(text[-4000:])
    assert server.proc.poll() is None
    assert text.count("dropped input") >= 6


PROBE = """
import json, os, socket, sys, time
from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from stiefel_runtime import messages
key = keyfile.read_key(sys.argv[1])
wrong = keyfile.read_key(sys.argv[2])
ifindex = socket.if_nametoindex(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(2)
def offer():
    cn = messages.new_nonce()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s.sendto(messages.build_discover(key, cn), ("ff02::1", 61570, 0, ifindex))
        try:
            data, addr = s.recvfrom(600)
        except socket.timeout:
            continue
        msg = messages.parse(key, data)
        return msg, addr
    raise SystemExit("no offer")
def ack(expect_none=False):
    try:
        data, _ = s.recvfrom(600)
    except socket.timeout:
        return None
    return messages.parse(key, data).type_name
msg, addr = offer()
print("offer role", msg.role)
# forged: a valid request with one bit flipped in its MAC
req = bytearray(messages.build_kexec_request(key, msg.client_nonce, msg.server_nonce)); req[-1] ^= 1
s.sendto(bytes(req), addr); print("forged ->", ack())
# wrong key, answering the right challenge
s.sendto(messages.build_kexec_request(wrong, msg.client_nonce, msg.server_nonce), addr); print("wrongkey ->", ack())
# a made-up challenge
s.sendto(messages.build_kexec_request(key, msg.client_nonce, messages.new_nonce()), addr); print("unknown ->", ack())
# the valid request
good = messages.build_kexec_request(key, msg.client_nonce, msg.server_nonce)
s.sendto(good, addr); print("valid ->", ack())
# the same request again: replayed
s.sendto(good, addr); print("replayed ->", ack())
"""


def test_autokexec_dry_run(world):
    ns, tmp, agents = world
    key = keyfile.generate_key()
    key_path = _write_key(os.path.join(tmp, "key"), key)
    wrong_path = _write_key(os.path.join(tmp, "wrong"), keyfile.generate_key())
    for name in ("vmlinuz", "initrd.img"):
        with open(os.path.join(tmp, name), "wb") as handle:
            handle.write(os.urandom(4096))
    config = {"format": "stiefel-autokexec-config", "version": 1, "key_path": key_path,
              "ramdisk_kernel": os.path.join(tmp, "vmlinuz"), "ramdisk_initrd": os.path.join(tmp, "initrd.img"),
              "server_cmdline": "stiefel.role=server stiefel.disk=UUID=aaaa stiefel.boot=UUID=bbbb console=ttyS0",
              "server": {}, "trigger_macs": ["52:54:00:5f:ef:01"]}
    with open(os.path.join(tmp, "autokexec.json"), "w") as handle:
        json.dump(config, handle)
    with open(os.path.join(tmp, "cmdline"), "w") as handle:
        handle.write("root=/dev/sda1 ro quiet\n")
    # Autokexec does not manage links it has no MAC for: the laptop's network setup brings the link up.
    _run("ip", "-n", ns.server, "link", "set", ns.veth_s, "up")
    _run("ip", "-n", ns.client, "link", "set", ns.veth_c, "up")
    agent = Agent(ns, [PYTHON, os.path.join(AGENTS, "stiefel-autokexec"), "--config", os.path.join(tmp, "autokexec.json"),
                       "--run-dir", os.path.join(tmp, "run"), "--proc-cmdline", os.path.join(tmp, "cmdline"),
                       "--dry-run"], os.path.join(tmp, "autokexec.log"))
    agents.append(agent)
    agent.wait_for("listening for stiefel clients", 30)
    time.sleep(2.5)  # IPv6 DAD on the fresh veth (link-local addresses become usable)
    probe = subprocess.run(ns.exec_argv(ns.client, PYTHON, "-c", PROBE, key_path, wrong_path, ns.veth_c),
                           capture_output=True, text=True, env=ENV, timeout=90)
    print(probe.stdout, probe.stderr)
    lines = probe.stdout.splitlines()
    assert "offer role 2" in lines
    assert "forged -> None" in lines
    assert "wrongkey -> None" in lines
    assert "unknown -> None" in lines
    assert "valid -> KEXEC_ACK" in lines
    assert "replayed -> None" in lines
    agent.wait_for("dry-run: would run: kexec -e", 10)
    assert agent.text().count("dry-run: would run: kexec -s -l") == 1
    # a configured NIC appearing triggers too (netlink event); another NIC does not
    suffix = "%x" % (os.getpid() & 0xFFFF)
    _run("ip", "-n", ns.server, "link", "add", "stfot" + suffix, "address", "52:54:00:5f:ef:99",
         "type", "veth", "peer", "name", "stfop" + suffix)
    _run("ip", "-n", ns.server, "link", "add", "stftr" + suffix, "address", "52:54:00:5f:ef:01",
         "type", "veth", "peer", "name", "stftp" + suffix)
    agent.wait_for("stiefel NIC stftr", 10)
    time.sleep(0.5)
    text = agent.text()
    print(text)
    assert text.count("dry-run: would run: kexec -s -l") == 2
    assert "stiefel NIC stfot" not in text
    assert "'--command-line=stiefel.role=server stiefel.disk=UUID=aaaa stiefel.boot=UUID=bbbb console=ttyS0'" in text
    assert "AuthenticationFailed" in text and "WrongKey" in text and "ReplayedMessage" in text
    # the initrd handed to kexec is the ramdisk plus the key cpio
    initrd = os.path.join(tmp, "run", "ramdisk-with-key.img")
    data = open(initrd, "rb").read()
    assert data.startswith(open(os.path.join(tmp, "initrd.img"), "rb").read())
    # the key archive, then one with the laptop's own command line for the way back (no stiefel.* words)
    extra = data[4096:]
    spans = cpio.newc_archive_spans(io.BytesIO(extra))
    entries = [e for start, length in spans for e in cpio.read_newc(extra[start:start + length]) if e.is_file]
    assert [(e.name, e.perm) for e in entries] == [("etc/stiefel/key", 0o600), ("etc/stiefel/return-cmdline", 0o644)]
    assert keyfile.decode_key(entries[0].data) == key
    assert entries[1].data == b"root=/dev/sda1 ro quiet\n"
    assert os.stat(initrd).st_mode & 0o777 == 0o600


def test_autokexec_refuses_when_stiefeled(world):
    ns, tmp, _agents = world
    key_path = _write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    config = {"format": "stiefel-autokexec-config", "version": 1, "key_path": key_path,
              "ramdisk_kernel": "/nonexistent/vmlinuz", "ramdisk_initrd": "/nonexistent/initrd",
              "server_cmdline": "stiefel.role=server", "trigger_macs": []}
    with open(os.path.join(tmp, "autokexec.json"), "w") as handle:
        json.dump(config, handle)
    with open(os.path.join(tmp, "cmdline"), "w") as handle:
        handle.write("root=/dev/nbd0 stiefel.mac=52:54:00:12:34:56 stiefel.server=fe80::1\n")
    proc = subprocess.run(ns.exec_argv(ns.server, PYTHON, os.path.join(AGENTS, "stiefel-autokexec"), "--config",
                                       os.path.join(tmp, "autokexec.json"), "--proc-cmdline",
                                       os.path.join(tmp, "cmdline"), "--dry-run"),
                          capture_output=True, text=True, env=ENV, timeout=30)
    assert proc.returncode == 0
    assert "stays idle" in proc.stdout


def test_luks_boot_unlocked_by_the_client(world):
    """/boot in LUKS: the OFFER asks for the passphrase, a wrong one is refused, the right one unlocks."""
    if not shutil.which("cryptsetup"):
        pytest.skip("needs cryptsetup (Debian package cryptsetup-bin)")
    if not os.path.exists("/sys/class/misc/device-mapper"):
        pytest.skip("needs device-mapper in the host kernel (dm_mod) for LUKS")
    ns, tmp, agents = world
    key_path = _write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    boot = _fake_boot(tmp)
    suffix = "%x" % (os.getpid() & 0xFFFF)
    image = os.path.join(tmp, "luks-boot.img")
    with open(image, "wb") as handle:
        handle.truncate(48 * 1024 * 1024)
    passphrase = b"correct horse battery staple"
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", "-", image], input=passphrase, check=True)
    loop = _run("losetup", "--find", "--show", image).stdout.strip()
    setup_name = "stfsetup" + suffix
    laptop_name = "stfboot" + suffix
    try:
        subprocess.run(["cryptsetup", "open", "--key-file", "-", loop, setup_name], input=passphrase, check=True)
        try:
            _run("mkfs.ext4", "-q", "-d", boot, "/dev/mapper/" + setup_name)
        finally:
            _run("cryptsetup", "close", setup_name, check=False)
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as handle:
            handle.truncate(16 * 1024 * 1024)
        with open(os.path.join(tmp, "cmdline"), "w") as handle:
            handle.write("stiefel.role=server stiefel.luksboot=%s stiefel.boot=/dev/mapper/%s\n" % (loop, laptop_name))
        server = Agent(ns, [PYTHON, os.path.join(AGENTS, "stiefel-server"), "--key", key_path, "--cmdline-file",
                            os.path.join(tmp, "cmdline"), "--disk", disk, "--run-dir", os.path.join(tmp, "srv"),
                            "--power-sysfs", os.path.join(tmp, "no-power")], os.path.join(tmp, "server.log"))
        agents.append(server)
        server.wait_for("stiefel-server: ready", 60)
        assert "waiting for the client to send the passphrase" in server.text()
        answers = os.path.join(tmp, "answers")
        with open(answers, "wb") as handle:
            handle.write(b"wrong passphrase\n" + passphrase + b"\n")
        run_dir = os.path.join(tmp, "client-luks")
        proc = subprocess.run(ns.exec_argv(ns.client, PYTHON, os.path.join(AGENTS, "stiefel-client"), "--key",
                                           key_path, "--cmdline-file", "/dev/null", "--run-dir", run_dir,
                                           "--stop-before-kexec", "--timeout", "90", "--passphrase-file", answers),
                              capture_output=True, text=True, env=ENV, timeout=150)
        print(proc.stdout, proc.stderr, server.text())
        assert proc.returncode == 0
        assert "/boot locked" in proc.stdout and "unlock refused" in proc.stdout and "/boot unlocked" in proc.stdout
        assert "stiefel-client: payload verified" in proc.stdout
        assert _sha(os.path.join(run_dir, "payload", "kernel")) == _sha(os.path.join(boot, "vmlinuz-6.1.0-test"))
        text = server.text()
        assert "cryptsetup refused the passphrase" in text and "/boot unlocked" in text
        # the server read what it needed and closed the container again
        assert not os.path.exists("/dev/mapper/" + laptop_name)
    finally:
        for name in (setup_name, laptop_name):
            _run("cryptsetup", "close", name, check=False)
        _run("losetup", "-d", loop, check=False)
