"""The standalone server config file: the format, clear refusals, and hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from stiefel_runtime import server_config as sc
from stiefel_runtime.netlink import Link

GOOD = """\
# served to the desktop
disk = /srv/stiefel/desktop.img
boot_dir = /srv/stiefel/boot

key = /etc/stiefel/key
interfaces = enp0s31f6, 52-54-00-AB-CD-02
mtu = 9000
export_name = desk
"""


def test_example_config():
    config = sc.parse(GOOD)
    assert config == sc.ServerConfig(disk="/srv/stiefel/desktop.img", boot_dir="/srv/stiefel/boot",
                                     interfaces=("enp0s31f6", "52:54:00:ab:cd:02"), mtu=9000, export_name="desk")
    assert config.run_dir == "/run/stiefel-server" and config.nbd_port == 10809 and config.http_port == 61571
    assert not config.debug


def test_defaults_and_boot_partition():
    config = sc.parse(b"disk=/dev/sdb\nboot=UUID=0b8f-11\r\n")
    assert config.boot == "UUID=0b8f-11" and config.boot_dir is None
    assert config.key == "/etc/stiefel/key" and config.interfaces == () and config.mtu is None


def test_flags_override_the_file():
    config = sc.parse(GOOD, {"disk": "/dev/sdc", "interfaces": "eth1"})
    assert config.disk == "/dev/sdc" and config.interfaces == ("eth1",) and config.mtu == 9000


@pytest.mark.parametrize("text, message", [
    ("boot_dir = /b\n", "disk is missing"),
    ("disk = /d\n", "exactly one of boot_dir"),
    ("disk = /d\nboot_dir = /b\nboot = UUID=x\n", "exactly one of boot_dir"),
    ("disk = /d\nboot_dir = /b\ncolour = blue\n", "line 3: unknown key 'colour'"),
    ("disk = /d\ndisk = /e\nboot_dir = /b\n", "line 2: disk given twice"),
    ("disk /d\n", "line 1: expected 'key = value'"),
    ("disk = relative.img\nboot_dir = /b\n", "disk must be an absolute path"),
    ("disk = /srv/../etc/shadow\nboot_dir = /b\n", "must not contain '..'"),
    ("disk = /d\nboot = sdb1\n", "boot must be a device path"),
    ("disk = /d\nboot = SERIAL=abc\n", "boot must be a device path"),
    ("disk = /d\nboot_dir = /b\nmtu = 9000\n", "mtu needs interfaces"),
    ("disk = /d\nboot_dir = /b\ninterfaces = eth0\nmtu = 100\n", "mtu must be a number 1280-65535"),
    ("disk = /d\nboot_dir = /b\ninterfaces = eth0\nmtu = -9000\n", "mtu must be a number"),
    ("disk = /d\nboot_dir = /b\ninterfaces = eth0\nmtu = ９０００\n", "mtu must be a number"),
    ("disk = /d\nboot_dir = /b\ninterfaces = lo\n", "lo cannot reach a client"),
    ("disk = /d\nboot_dir = /b\ninterfaces = a/b\n", "neither an interface name nor a MAC"),
    ("disk = /d\nboot_dir = /b\ninterfaces = averyveryverylongname\n", "neither an interface name nor a MAC"),
    ("disk = /d\nboot_dir = /b\nexport_name = ../x\n", "export_name must be"),
    ("disk = /d\nboot_dir = /b\nnbd_port = 61571\n", "must differ"),
    ("disk = /d\nboot_dir = /b\nhttp_port = 70000\n", "http_port must be a number 1-65535"),
    ("disk = /d\nboot_dir = /b\ndebug = maybe\n", "debug must be yes or no"),
    ("disk = /d\x01\nboot_dir = /b\n", "line 1: control characters"),
    ("disk = /d\nboot_dir = /b\nnetboot = sometimes\n", "netboot must be yes or no"),
    ("disk = /d\nboot_dir = /b\ninterfaces = eth0\nnetboot = yes\n", "needs netboot_kernel and netboot_initrd"),
    ("disk = /d\nboot_dir = /b\nnetboot = yes\nnetboot_kernel = /k\nnetboot_initrd = /i\n", "netboot = yes needs interfaces"),
    ("disk = /d\nboot_dir = /b\nnetboot_kernel = /k\n", "netboot_kernel is set but netboot is not yes"),
    ("disk = /d\nboot_dir = /b\ninterfaces = eth0\nnetboot = yes\nnetboot_kernel = k\nnetboot_initrd = /i\n",
     "netboot_kernel must be an absolute path"),
])
def test_refusals_name_the_problem(text, message):
    with pytest.raises(sc.ServerConfigError) as info:
        sc.parse(text)
    assert message in str(info.value)


def test_not_utf8_and_oversized():
    with pytest.raises(sc.ServerConfigError, match="not UTF-8"):
        sc.parse(b"disk = /d\xff\n")
    with pytest.raises(sc.ServerConfigError, match="more than"):
        sc.parse(b"# " + b"x" * sc.MAX_CONFIG_SIZE + b"\n")
    with pytest.raises(sc.ServerConfigError, match="longer than"):
        sc.parse("disk = /" + "d" * sc.MAX_LINE + "\n")
    with pytest.raises(sc.ServerConfigError, match="more than 64 entries"):
        sc.parse("disk = /d\nboot_dir = /b\ninterfaces = %s\n" % " ".join("eth%d" % i for i in range(65)))


def test_load_names_the_file(tmp_path):
    with pytest.raises(sc.ServerConfigError, match="cannot read .*missing.conf"):
        sc.load(str(tmp_path / "missing.conf"))
    path = tmp_path / "server.conf"
    path.write_text("disk = /d\n")
    with pytest.raises(sc.ServerConfigError, match="server.conf: give exactly one"):
        sc.load(str(path))
    path.write_text(GOOD)
    assert sc.load(str(path), {"export_name": "other"}).export_name == "other"


def test_interface_filter_by_name_or_mac():
    assert sc.interface_filter(()) is None
    selected = sc.interface_filter(("eth1", "52:54:00:ab:cd:02"))
    assert selected(Link(2, "eth1", "52:54:00:00:00:01", 0, 1500))
    assert selected(Link(3, "enx0", "52:54:00:AB:CD:02", 0, 1500))
    assert not selected(Link(4, "wlan0", "52:54:00:00:00:04", 0, 1500))
    assert not selected(Link(5, "eth2", None, 0, 1500))


# ---------------------------------------------------------------- hostile input

@given(st.binary(max_size=4096))
def test_random_bytes_give_a_config_or_a_clear_error(data):
    try:
        config = sc.parse(data)
    except sc.ServerConfigError as exc:
        assert str(exc)
    else:
        assert config.disk.startswith("/")


_KEYS = st.sampled_from(sc.KEYS + ("Disk", "disk ", "", "unknown", "disk.x", "#disk"))
_VALUES = st.one_of(st.text(max_size=60), st.sampled_from(["/d", "/b", "UUID=1", "eth0", "9000", "yes", "lo"]))


@given(st.lists(st.tuples(_KEYS, st.sampled_from(["=", " = ", ":", "=="]), _VALUES), max_size=14))
def test_random_lines_give_a_config_or_a_clear_error(lines):
    text = "\n".join("%s%s%s" % line for line in lines)
    try:
        config = sc.parse(text)
    except sc.ServerConfigError as exc:
        assert str(exc)
    else:
        assert config.disk.startswith("/") and (config.boot_dir is None) != (config.boot is None)


@given(st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=40), st.integers(), st.none()), max_size=8))
def test_overrides_of_any_shape_are_checked(overrides):
    try:
        sc.parse(GOOD, overrides)
    except sc.ServerConfigError as exc:
        assert str(exc)


_PATHS = st.from_regex(r"\A(/[a-z0-9_-]{1,12}){1,4}\Z")


_BOOTS = st.one_of(_PATHS.map(lambda p: ("boot_dir", p)),
                   st.from_regex(r"\AUUID=[0-9a-f-]{4,36}\Z").map(lambda p: ("boot", p)))


@given(disk=_PATHS, boot=_BOOTS,
       interfaces=st.lists(st.from_regex(r"\A(eth|enp)[0-9]{1,3}\Z"), max_size=3, unique=True),
       mtu=st.integers(1280, 65535), name=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"),
       debug=st.booleans())
def test_render_parse_round_trip(disk, boot, interfaces, mtu, name, debug):
    config = sc.ServerConfig(disk=disk, interfaces=tuple(interfaces), mtu=mtu if interfaces else None,
                             export_name=name, debug=debug, **{boot[0]: boot[1]})
    assert sc.parse(sc.render(config)) == config


def test_netboot_config_round_trips():
    text = GOOD + "netboot = yes\nnetboot_kernel = /usr/lib/stiefel/ramdisk/vmlinuz\nnetboot_initrd = /r/initrd.img\n"
    config = sc.parse(text)
    assert config.netboot and config.netboot_initrd == "/r/initrd.img"
    assert sc.parse(sc.render(config)) == config
    assert not sc.parse(GOOD + "netboot = no\n").netboot and "netboot" not in sc.render(sc.parse(GOOD))


def test_check_entry_point_needs_no_agent_libraries(tmp_path, agent_env):
    """The standalone role validates its template with ``python3 -m stiefel_runtime.server_config``: it must
    run where pyroute2 and cryptography are not installed yet (a dry run, a fresh target)."""
    import subprocess
    import sys

    conf = tmp_path / "server.conf"
    conf.write_text("disk = /dev/sdb\nboot = UUID=0b8f\ninterfaces = 52-54-00-AB-CD-02\n")
    code = ("import runpy, sys; sys.modules['pyroute2'] = sys.modules['cryptography'] = None; "
            "sys.argv = ['server_config', %r]; runpy.run_module('stiefel_runtime.server_config', run_name='__main__')"
            % str(conf))
    out = subprocess.run([sys.executable, "-c", code], env=agent_env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "interfaces = 52:54:00:ab:cd:02\n" in out.stdout
    conf.write_text("disk = /dev/sdb\nboot = UUID=0b8f\nmtu = 9000\n")
    out = subprocess.run([sys.executable, "-c", code], env=agent_env, capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "stiefel-server: refused:" in out.stderr
