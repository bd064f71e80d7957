"""netboot: dnsmasq's whole configuration is its argv, confined to the stiefel port and the link range."""

from __future__ import annotations

import os

import pytest

from stiefel_runtime import netboot


def test_argv_confines_dnsmasq_to_the_stiefel_port(tmp_path):
    argv = netboot.dnsmasq_argv("enp3s0", str(tmp_path), str(tmp_path))
    assert argv[0] == "dnsmasq"
    for option in ("--interface=enp3s0", "--bind-interfaces", "--except-interface=lo", "--conf-file=/dev/null",
                   "--port=0", "--listen-address=169.254.157.1", "--enable-tftp", "--tftp-root=%s" % tmp_path,
                   "--dhcp-range=169.254.157.2,169.254.157.6,255.255.255.248,10m",
                   "--dhcp-ignore=tag:!efi-pxe,tag:!efi-http", "--dhcp-option=option:router"):
        assert option in argv
    assert "--dhcp-match=set:efi-pxe,option:client-arch,7" in argv
    assert "--dhcp-match=set:efi-http,option:client-arch,16" in argv
    assert "--dhcp-boot=tag:efi-http,http://169.254.157.1:61572/netboot/shimx64.efi" in argv
    assert all(a.count("--interface=") <= 1 for a in argv)


@pytest.mark.parametrize("bad", ["", "a" * 16, "eth0,eth1", "../x", "eth 0", "x=y"])
def test_argv_refuses_odd_interface_names(tmp_path, bad):
    with pytest.raises(netboot.NetbootError):
        netboot.dnsmasq_argv(bad, str(tmp_path), str(tmp_path))


def test_link_range_is_link_local_and_excludes_the_server():
    assert netboot.LINK_NET.is_link_local
    assert netboot.RANGE[0] > netboot.SERVER_ADDRESS
    assert netboot.RANGE[1] < netboot.LINK_NET.broadcast_address


def test_tftp_root_holds_only_the_first_loader(tmp_path):
    shim = tmp_path / "shim"
    grub = tmp_path / "grub"
    shim.write_bytes(b"shim")
    grub.write_bytes(b"grub")
    http_mod = tmp_path / "http.mod"
    http_mod.write_bytes(b"mod")
    root = tmp_path / "tftp"
    (root / "old").mkdir(parents=True)
    (root / "old" / "initrd.img").write_bytes(b"stale")
    (root / "key").write_bytes(b"secret")
    netboot.prepare_tftp_root(str(root), shim=str(shim), grub=str(grub), http_mod=str(http_mod))
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _s, fs in os.walk(root) for f in fs)
    assert files == sorted(netboot.LOADER_FILES)
    assert "configfile (http,169.254.157.1:61572)/netboot/grub.cfg" in (root / "grub" / "grub.cfg").read_text()


def test_tftp_grub_cfg_falls_back_to_tftp_where_http_mod_is_refused(tmp_path):
    for name in ("shim", "grub", "http.mod", "vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(name.encode())
    root = tmp_path / "tftp"
    netboot.prepare_tftp_root(str(root), shim=str(tmp_path / "shim"), grub=str(tmp_path / "grub"),
                              http_mod=str(tmp_path / "http.mod"), kernel=str(tmp_path / "vmlinuz"),
                              initrd=str(tmp_path / "initrd.img"), cmdline="stiefel.role=client stiefel.pair")
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _s, fs in os.walk(root) for f in fs)
    assert files == sorted(netboot.TFTP_FILES)
    assert (root / "initrd.img").read_bytes() == b"initrd.img" and os.path.islink(root / "initrd.img")
    cfg = (root / "grub" / "grub.cfg").read_text()
    # HTTP first (its configfile does not return once a kernel boots), the TFTP entry only after it
    assert cfg.index("if insmod http; then") < cfg.index("configfile (http,") < cfg.index("linux (tftp,")
    assert "  linux (tftp,169.254.157.1)/vmlinuz stiefel.role=client stiefel.pair\n" in cfg
    assert "  initrd (tftp,169.254.157.1)/initrd.img\n" in cfg
    # a second prepare (agent restart) replaces the links instead of failing on them
    netboot.prepare_tftp_root(str(root), shim=str(tmp_path / "shim"), grub=str(tmp_path / "grub"),
                              http_mod=str(tmp_path / "http.mod"), kernel=str(tmp_path / "vmlinuz"),
                              initrd=str(tmp_path / "initrd.img"))


def test_netboot_refuses_an_initrd_with_a_key_before_anything_listens(tmp_path, monkeypatch):
    from ansible_collections.stiefel.system.plugins.module_utils import cpio
    from ansible_collections.stiefel.system.plugins.module_utils.keyfile import encode_key

    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(cpio.write_newc([cpio.CpioEntry.file("init", b"#!/bin/sh\n", 0o755)])
                       + cpio.key_archive(encode_key(b"\1" * 32)))
    touched = []
    monkeypatch.setattr(netboot, "add_link_address", lambda *a: touched.append(a))
    service = netboot.Netboot("eth0", str(tmp_path), str(tmp_path / "vmlinuz"), str(initrd), "stiefel.pair")
    with pytest.raises(netboot.NetbootError, match="refusing to serve .* holds etc/stiefel/key"):
        service.start(2)
    assert not touched and not (tmp_path / "netboot").exists()
    assert service.http is None and service.dnsmasq is None
    with pytest.raises(netboot.NetbootError, match="refusing to serve"):
        netboot.Netboot("eth0", str(tmp_path), "k", str(tmp_path / "missing"), "x").start(2)


def test_tftp_root_needs_the_signed_loaders(tmp_path):
    with pytest.raises(netboot.NetbootError, match="grub-efi-amd64-bin"):
        netboot.prepare_tftp_root(str(tmp_path), shim=str(tmp_path / "none"), grub=str(tmp_path / "none"))


def test_http_grub_cfg_refuses_a_cmdline_grub_would_interpret():
    assert "linux (http,169.254.157.1:61572)/netboot/vmlinuz stiefel.role=client" in netboot.http_grub_cfg(
        "stiefel.role=client")
    for bad in ("a\nb", "x; reboot", "$var", "}", "# rest"):
        with pytest.raises(netboot.NetbootError):
            netboot.http_grub_cfg(bad)


def test_dnsmasq_is_stopped_by_its_pid(tmp_path):
    service = netboot.Dnsmasq("eth0", str(tmp_path), str(tmp_path), dnsmasq="sleep")
    service.argv = ["sleep", "60"]  # the process seam: a child we own, stopped by PID
    pid = service.start()
    assert service.alive() and service.pid == pid
    assert service.stop() == -15
    assert not service.alive() and service.stop() is None


def test_dnsmasq_that_fails_its_setup_is_an_error_not_a_silent_nothing(tmp_path):
    service = netboot.Dnsmasq("eth0", str(tmp_path), str(tmp_path), dnsmasq="false")
    service.argv = ["sh", "-c", "echo 'dnsmasq: failed to set group' >&2; exit 5"]
    with pytest.raises(netboot.NetbootError, match=r"exited at start \(exit 5\)"):
        service.start()
    assert not service.alive() and service.stop() is None
