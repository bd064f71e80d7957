from __future__ import annotations

import os
import subprocess

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio
from stiefel_runtime import autokexec, lockdown, server, wayback
from stiefel_runtime.common import Console

KEY = bytes(range(32))


@pytest.fixture(autouse=True)
def not_locked_down(tmp_path, monkeypatch):
    state = tmp_path / "lockdown"
    state.write_text("none [integrity] confidentiality\n")
    monkeypatch.setattr(lockdown, "LOCKDOWN_PATH", str(state))


def test_laptop_cmdline_drops_every_stiefel_word():
    line = "BOOT_IMAGE=/vmlinuz root=UUID=r ro stiefel.role=server stiefel.disk=/dev/vda quiet stiefel.debug"
    assert wayback.laptop_cmdline(line) == "BOOT_IMAGE=/vmlinuz root=UUID=r ro quiet"
    assert wayback.laptop_cmdline("a\0b\nc") == "a b c"
    assert wayback.laptop_cmdline("x" * 5000) == ""


def test_read_return_cmdline(tmp_path):
    path = tmp_path / "return-cmdline"
    assert wayback.read_return_cmdline(str(path)) is None
    path.write_text("root=/dev/sda1 stiefel.mac=aa quiet\n")
    assert wayback.read_return_cmdline(str(path)) == "root=/dev/sda1 quiet"


@pytest.mark.parametrize("options,expected", [
    ({}, ("return", 120)),
    ({"when_done": "poweroff", "return_wait": "15"}, ("poweroff", 15)),
    ({"when_done": "stay"}, ("stay", 120)),
    ({"when_done": "explode", "return_wait": "soon"}, ("return", 120)),
    ({"when_done": True, "return_wait": True}, ("return", 120)),
    ({"return_wait": "-5"}, ("return", 120)),
    ({"return_wait": "99999999"}, ("return", wayback.MAX_WAIT)),
])
def test_policy_from(options, expected):
    lines = []
    assert wayback.policy_from(options, log=lines.append) == expected


def test_nothing_happens_before_a_client_was_attached():
    lines = []
    watcher = wayback.DoneWatcher("return", 10, log=lines.append)
    assert not any(watcher.observe(t, 0) for t in range(0, 100, 5))
    assert lines == []


def test_dropped_client_gets_the_configured_wait_with_countdown_lines():
    lines = []
    watcher = wayback.DoneWatcher("return", 60, log=lines.append)
    assert not watcher.observe(0, 1)
    due = [t for t in range(5, 200, 5) if watcher.observe(t, 0)]
    assert due == [65]
    assert "connection dropped" in lines[0] and "in 60 s" in lines[0]
    countdown = [line for line in lines if line.startswith("way back: return to the laptop's OS in")]
    assert 3 <= len(countdown) <= 6  # a line every 10 s, not every poll
    assert "stopping the export" in lines[-1]
    assert not watcher.observe(300, 0) and watcher.state == "done"


def test_clean_disconnect_waits_less_even_when_its_log_line_came_a_poll_early():
    watcher = wayback.DoneWatcher("poweroff", 120, log=lambda s: None)
    watcher.observe(0, 1)
    watcher.observe(5, 1, clean=True)  # NBD_CMD_DISC logged, the socket not closed yet
    due = [t for t in range(10, 300, 5) if watcher.observe(t, 0)]
    assert due == [10 + wayback.CLEAN_WAIT]


def test_client_coming_back_cancels_and_a_new_attach_forgets_an_old_clean_disconnect():
    lines = []
    watcher = wayback.DoneWatcher("return", 60, log=lines.append)
    watcher.observe(0, 1)
    watcher.observe(5, 0, clean=True)
    assert watcher.state == "waiting"
    watcher.observe(10, 1)
    assert "cancelled" in lines[-1] and watcher.state == "serving"
    # the connection now drops without NBD_CMD_DISC: the long wait again
    watcher.observe(15, 0)
    assert watcher.deadline == 75
    # a rebooting desktop opens a discovery session before it attaches again
    watcher.observe(20, 0, activity=True)
    assert watcher.state == "idle" and "discovery session" in lines[-1]
    assert not any(watcher.observe(t, 0) for t in range(25, 300, 5))


def test_stay_never_acts():
    lines = []
    watcher = wayback.DoneWatcher("stay", 0, log=lines.append)
    watcher.observe(0, 2)
    assert not any(watcher.observe(t, 0) for t in range(5, 100, 5))
    assert "policy stay" in lines[0]


def test_zero_wait_acts_at_once():
    watcher = wayback.DoneWatcher("return", 0, log=lambda s: None)
    watcher.observe(0, 1)
    assert watcher.observe(5, 0)


class Recorder(object):
    def __init__(self, rcs=()):
        self.rcs = list(rcs)
        self.calls = []

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, self.rcs.pop(0) if self.rcs else 0, stdout=b"")


def _files(tmp_path):
    kernel, initrd, disk = tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "disk.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    disk.write_bytes(b"\0" * 4096)
    return str(kernel), str(initrd), str(disk)


def test_finish_return_stops_then_flushes_then_kexecs(tmp_path):
    kernel, initrd, disk = _files(tmp_path)
    order = []
    run = Recorder([0, 0])

    def recording_run(argv, **kwargs):
        order.append(" ".join(argv[:3]))
        return run(argv, **kwargs)

    def flush(path, log):
        order.append("flush " + path)
        wayback.flush_disk(path, log=log)  # the real one, on a file (no BLKFLSBUF there)

    lines = []
    with pytest.raises(Exception, match="kexec -e returned"):
        wayback.finish("return", lambda: order.append("stop"), disk, kernel, initrd, "root=UUID=r ro",
                       log=lines.append, run=recording_run, flush=flush,
                       poweroff=lambda: pytest.fail("no poweroff"))
    assert order == ["stop", "flush " + disk, "kexec -s -l", "kexec -e"]
    assert run.calls[0] == ["kexec", "-s", "-l", "--initrd=" + initrd, "--command-line=root=UUID=r ro", kernel]
    assert any("flushed (fsync)" in line for line in lines)


def test_finish_poweroff_and_no_kernel(tmp_path):
    kernel, initrd, disk = _files(tmp_path)
    order = []
    wayback.finish("poweroff", lambda: order.append("stop"), disk, None, None, "", run=Recorder(),
                   flush=lambda path, log: order.append("flush"), poweroff=lambda: order.append("off"))
    assert order == ["stop", "flush", "off"]
    with pytest.raises(wayback.WayBackError, match="never read"):
        wayback.finish("return", lambda: None, disk, None, None, "", run=Recorder(), flush=lambda p, log: None)


def test_autokexec_archive_carries_the_laptop_cmdline():
    archive = autokexec.server_archive("stiefel-key-v1:" + "ab" * 32 + "\n", "root=UUID=r ro quiet")
    assert len(archive) % 4 == 0
    first = cpio.key_archive("stiefel-key-v1:" + "ab" * 32 + "\n")
    assert archive.startswith(first)
    entries = {e.name: e for e in cpio.read_newc(archive[len(first):])}
    assert entries["etc/stiefel/return-cmdline"].data == b"root=UUID=r ro quiet\n"
    assert autokexec.server_archive("k", "") == cpio.key_archive("k")


class FakeSource(object):
    def __init__(self, kernel, initrd):
        self.paths = {"kernel": kernel, "initrd": initrd}

        class Manifest(object):
            cmdline = "root=UUID=r ro stiefel.blocksize=512"
        self.manifest = Manifest()


def test_agent_follows_the_policy_and_serves_again_when_kexec_fails(tmp_path, capsys):
    kernel, initrd, disk = _files(tmp_path)
    console = Console("stiefel-server")
    agent = server.ServerAgent(KEY, console, run_dir=str(tmp_path / "run"))
    server.setup_way_back(agent, {"when_done": "return", "return_wait": "10"}, str(tmp_path / "none"))
    agent.state.source = FakeSource(kernel, initrd)
    agent._nbd_disk = disk
    stops, syncs = [], []
    agent._stop_nbd = lambda: stops.append(1)
    agent._sync_nbd = syncs.append
    agent._nbd_peers = {"fe80::1"}
    agent.check_way_back(now=0)
    agent._nbd_peers = set()
    agent.check_way_back(now=5)
    assert agent.way_back.state == "waiting"
    with agent.state.lock:
        agent.state.clients["fe80::2"] = "fetching payload"  # a desktop booting again
    agent.check_way_back(now=10)
    assert agent.way_back.state == "idle"
    agent._nbd_peers = {"fe80::2"}
    agent.check_way_back(now=15)
    agent._nbd_peers = set()
    agent.check_way_back(now=20)
    run = Recorder([1])  # kexec -s -l refused
    agent.way_back_seams = {"run": run}
    agent.check_way_back(now=30)
    assert stops == [1] and syncs == [{}]
    out = capsys.readouterr().out
    assert "laptop command line '(the served one)'" in out
    assert "--command-line=root=UUID=r ro" in run.calls[0]
    assert "way back failed" in out and "serving the disk again" in out
    assert agent.way_back.state == "idle"
    assert os.path.exists(disk)


def test_nbd_connections_inherit_keepalive_from_the_listener():
    """A desktop gone without FIN must be seen gone: accepted sockets (nbdkit's) carry the listener's probes."""
    import socket
    listener = server.listening_socket("::1", 0, 0)
    client = socket.create_connection(("::1", listener.getsockname()[1]))
    conn, _peer = listener.accept()
    try:
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == server.KEEPALIVE_IDLE
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == server.KEEPALIVE_INTERVAL
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == server.KEEPALIVE_COUNT
    finally:
        for sock in (conn, client, listener):
            sock.close()


def test_a_clean_disconnect_long_before_the_last_client_left_does_not_count():
    # the attach's TLS check ends cleanly at boot while the real connections stay up; hours later
    # the desktop loses power: that is a dropped connection, with the full wait
    lines = []
    watcher = wayback.DoneWatcher(wayback.RETURN, wait=120, log=lines.append)
    watcher.observe(0, 1)
    watcher.observe(5, 4, clean=True)
    watcher.observe(10, 4)
    watcher.observe(3600, 0)
    assert watcher.deadline == 3600 + 120
    assert "connection dropped" in lines[-1]


def test_a_clean_disconnect_logged_a_poll_late_shortens_the_wait():
    lines = []
    watcher = wayback.DoneWatcher(wayback.RETURN, wait=120, log=lines.append)
    watcher.observe(0, 4)
    watcher.observe(5, 0)
    assert watcher.deadline == 125
    watcher.observe(10, 0, clean=True)
    assert watcher.deadline == 10 + wayback.CLEAN_WAIT and "clean disconnect" in lines[-1]
    due = [t for t in range(15, 200, 5) if watcher.observe(t, 0)]
    assert due == [10 + wayback.CLEAN_WAIT]
