"""Issue 17, item 2: a desktop without a key pairs with the laptop by code, in two network namespaces.

The real server agent (ramdisk mode, a fake /boot) and the real client agent with ``stiefel.pair`` on its
command line and NO key file; the code is typed through a pipe into the client's stdin (its console):

* a wrong code first: the client says it was refused, the server logs a wrong code; then the right code:
  both sides confirm, and the client goes on as with a stick (discovery, session, verified payload);
* an attacker on the desktop's link (no key, no code): random bytes, truncated, oversized and off-side
  datagrams, a HELLO flood, 5 wrong codes (pairing locks: even the right code is refused), PROOFs replayed
  within the exchange and after the server restarted (the lockout survives the restart), and a flood of
  2000 mixed datagrams (replayed PROOFs, random, truncated, oversized) after which the server still answers;
* the server logs every drop escaped and rate-limited (at most 60 drop lines for the whole flood, the rest
  in summaries), never logs the code, and keeps serving (a keyed client boots from it afterwards).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyfile, keyschedule
from lab.agents import AGENTS, Agent, ENV, PYTHON, fake_boot, run_client, write_key
from lab.netns import link_local
from stiefel_runtime import pairing

pytestmark = pytest.mark.integration
LOCK = 600

# The attacker: pairing datagrams made with the project's own library (so they are well formed where they
# should be), sent to the server's link-local address; prints one JSON result.
ATTACKER = r"""
import json, os, socket, sys, time
from stiefel_runtime import messages, pairing
target, ifname, code, saved = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
scope = socket.if_nametoindex(ifname)
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.bind(("::", 0, 0, scope))
sock.settimeout(3)
dest = (target, 61570, 0, scope)
def ask(data, wait=3):
    sock.settimeout(wait)
    sock.sendto(data, dest)
    try:
        return sock.recv(2048)
    except socket.timeout:
        return None
def attempt(typed):
    client = pairing.PairingClient(typed)
    challenge = ask(client.hello)
    if challenge is None:
        return "no answer", None
    try:
        got = client.handle(challenge, "x")
    except pairing.PairingRefused as exc:
        return "refused before proof: %s" % exc, None
    proof = got
    reply = ask(proof)
    try:
        client.handle(reply, "x")
        return "paired", proof
    except pairing.PairingRefused as exc:
        return "refused: %s" % exc, proof
out = {}
if saved == "-":
    hello = pairing.PairingClient(code).hello
    junk = [os.urandom(n) for n in (0, 1, 13, 100, 511, 513, 1400)]
    junk += [hello[:-1], hello + b"\0", hello[:20], hello[:-33] + b"B" + hello[-32:],
             hello[:-33] + b"A" + b"\xff" * 32, b"STFL\x02\x10" + b"\x1b[2J\r\n" * 8]
    answers = sum(ask(data, 0.2) is not None for data in junk)
    out["junk_answered"] = answers
    started = time.monotonic()
    flood = 0
    for _ in range(100):
        sock.sendto(pairing.PairingClient(code).hello, dest)
        flood += 1
    time.sleep(2)
    sock.settimeout(0.2)
    replies = 0
    try:
        while True:
            sock.recv(2048); replies += 1
    except socket.timeout:
        pass
    out["flood_sent"], out["flood_answered"] = flood, replies
    time.sleep(2.5)  # the HELLO bucket refills
    results, proofs = [], []
    for n in range(5):
        result, proof = attempt("9999-000%d" % n)
        results.append(result); proofs.append(proof.hex() if proof else None)
    out["wrong"] = results
    out["replayed_proof_answered"] = ask(bytes.fromhex(proofs[0]), 2) is not None
    # a flood of every kind at once: replayed PROOFs, random bytes, truncated, oversized (fragmented) datagrams
    kinds = [bytes.fromhex(p) for p in proofs if p] + [os.urandom(64), hello[:7], os.urandom(9000), b"\0" * 1500]
    for i in range(2000):
        sock.sendto(kinds[i % len(kinds)], dest)
        if i % 50 == 49:
            time.sleep(0.02)  # paced a little so they reach the agent rather than overflow its socket buffer
    out["mixed_flood_sent"] = 2000
    time.sleep(1)
    out["right_while_locked"] = attempt(code)[0]
    with open(sys.argv[5], "w") as handle:
        json.dump(proofs, handle)
else:
    proofs = json.load(open(saved))
    out["replayed_after_restart_answered"] = [ask(bytes.fromhex(p), 2) is not None for p in proofs if p][:2]
    out["right_after_restart"] = attempt(code)[0]
print(json.dumps(out))
"""


def _server(ns, tmp, key_path, boot, log_name):
    agent = Agent(ns, [PYTHON, os.path.join(AGENTS, "stiefel-server"), "--key", key_path, "--cmdline-file",
                       "/dev/null", "--boot-dir", boot, "--run-dir", os.path.join(tmp, "srv"), "--power-sysfs",
                       os.path.join(tmp, "no-power")], os.path.join(tmp, log_name))
    agent.wait_for("stiefel-server: ready", 60)
    return agent


def _attack(ns, server_addr, code, saved, out_path):
    done = subprocess.run(ns.exec_argv(ns.client, PYTHON, "-c", ATTACKER, server_addr, ns.veth_c, code, saved,
                                       out_path), capture_output=True, text=True, env=ENV, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print("[pairing] attacker: %s" % json.dumps(result))
    return result


def test_pairing_by_code_and_hostile_input(world, monkeypatch):
    ns, tmp, agents = world
    # a first lockout of 10 minutes (the variable only ever lengthens it): it must still hold after the restart
    monkeypatch.setitem(ENV, pairing.LOCK_ENV, str(LOCK))
    key = keyfile.generate_key()
    key_path = write_key(os.path.join(tmp, "key"), key)
    code = keyschedule.pairing_code(key)
    boot = fake_boot(tmp)
    server = _server(ns, tmp, key_path, boot, "server.log")
    agents.append(server)

    # the desktop: no key file, stiefel.pair, a wrong code and then the right one typed on its console
    cmdline = os.path.join(tmp, "cmdline")
    with open(cmdline, "w", encoding="ascii") as handle:
        handle.write("stiefel.role=client stiefel.pair\n")
    started = time.monotonic()
    desktop = subprocess.run(
        ns.exec_argv(ns.client, PYTHON, os.path.join(AGENTS, "stiefel-client"), "--key", os.path.join(tmp, "none"),
                     "--cmdline-file", cmdline, "--run-dir", os.path.join(tmp, "cli"), "--stop-before-kexec",
                     "--timeout", "90"),
        input="1111-2222\n%s\n" % code, capture_output=True, text=True, env=ENV, timeout=180, check=False)
    seconds = time.monotonic() - started
    print("[pairing] desktop rc=%d in %.1f s\n%s" % (desktop.returncode, seconds, desktop.stdout[-3000:]))
    assert desktop.returncode == 0, desktop.stderr[-2000:]
    assert "pairing refused: wrong pairing code" in desktop.stdout
    assert "stiefel-client: paired" in desktop.stdout
    assert "key id %s" % keyschedule.key_id_hex(key) in desktop.stdout
    assert re.search(r"payload: [\d.]+ MB in", desktop.stdout), "goes on as with a stick: the payload verified"
    assert code not in desktop.stdout and code.replace("-", "") not in desktop.stdout
    assert not os.path.exists(os.path.join(tmp, "none")), "the key is kept in memory only"
    server_addr = link_local(ns.server, ns.veth_s)

    saved = os.path.join(tmp, "proofs.json")
    first = _attack(ns, server_addr, code, "-", saved)
    assert first["junk_answered"] == 0
    assert first["flood_answered"] < first["flood_sent"]
    assert first["wrong"][:4] == ["refused: wrong pairing code"] * 4
    assert first["wrong"][4].startswith("refused: pairing locked after wrong codes (try again in %d s)" % LOCK)
    assert not first["replayed_proof_answered"]
    assert first["right_while_locked"].startswith("refused before proof: pairing locked"), "served after the flood"
    deadline = time.monotonic() + 25  # a summary comes when its 10 s interval ends (the console's timer)
    while time.monotonic() < deadline and sum(int(n) for n in re.findall(
            r"dropped (\d+) more inputs", server.text())) < 1000:
        time.sleep(0.5)
    flooded = server.text()
    shown = flooded.count("dropped input from")
    summaries = re.findall(r"dropped (\d+) more inputs", flooded)
    print("[pairing] server log after %d flood datagrams: %d drop lines shown, summaries %s, %d bytes" % (
        first["mixed_flood_sent"], shown, summaries, len(flooded)))
    assert shown <= 60 and summaries, "the drop log stays bounded: the first of each interval, then a summary"
    assert sum(int(n) for n in summaries) + shown >= 1000

    server.stop()
    agents.remove(server)
    again = _server(ns, tmp, key_path, boot, "server2.log")
    agents.append(again)
    second = _attack(ns, server_addr, code, saved, os.path.join(tmp, "unused.json"))
    assert second["replayed_after_restart_answered"] == [False, False]
    assert second["right_after_restart"].startswith("refused before proof: pairing locked"), "lockout persisted"

    # the server keeps serving: a client with the key (a stick) boots
    keyed, _run_dir = run_client(ns, tmp, key_path, "keyed", 90)
    assert keyed.returncode == 0

    logs = server.text() + again.text()
    print("[pairing] server lines about pairing:\n" + "\n".join(
        line for line in logs.splitlines() if "pair" in line.lower() or "dropped" in line)[-4000:])
    assert "wrong code (1 in a row)" in logs and "pairing locked for %d s" % LOCK in logs
    assert "code confirmed" in logs
    assert "refused: locked for" in logs
    assert "dropped input from" in logs and ("more dropped" in logs or "dropped" in logs)
    assert code not in logs and code.replace("-", "") not in logs
    assert "\x1b" not in logs and "\\x1b[2J" in logs or "\x1b" not in logs
    lockout = json.load(open(os.path.join(tmp, "srv", "pairing.json"), encoding="ascii"))
    assert lockout["failures"] >= 5
    assert os.stat(os.path.join(tmp, "srv", "pairing.json")).st_mode & 0o777 == 0o600
