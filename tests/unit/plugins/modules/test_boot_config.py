"""Unit tests for the boot_config module: check mode, real run, idempotence, diff, failures."""
from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import bootconfig
from ansible_collections.stiefel.system.plugins.modules import boot_config as module
from lab import ansible_output

UUID = '5d3c4e2a-8f41-4b7a-9a57-2c8e1f0b9d11'


def run_module(capsys, **args):
    return ansible_output.run_module_main(module, capsys, **args)


@pytest.fixture
def system(tmp_path):
    root = tmp_path / 'root'
    (root / 'boot').mkdir(parents=True)
    (root / 'etc').mkdir()
    (root / 'boot/vmlinuz-6.1.0-10-amd64').write_text('k')
    (root / 'boot/initrd.img-6.1.0-10-amd64').write_text('i')
    (root / 'etc/fstab').write_text('UUID=%s / ext4 errors=remount-ro 0 1\n' % UUID)
    return root


def test_check_real_idempotent_and_idempotent_check(system, capsys):
    path = system / 'boot/stiefel/boot.json'
    args = dict(root=str(system), path=str(path), cmdline_extra=['systemd.swap=0'], use_proc_cmdline=False)
    result = run_module(capsys, _ansible_check_mode=True, _ansible_diff=True, **args)
    assert result['rc'] == 0 and result['changed'] and not path.exists()
    assert '"kernel": "vmlinuz-6.1.0-10-amd64"' in result['diff']['after']
    assert result['config']['cmdline'] == 'root=UUID=%s ro systemd.swap=0' % UUID

    result = run_module(capsys, **args)
    assert result['changed'] and path.exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert bootconfig.load_boot_config(str(path)) == result['config']
    before = path.read_bytes()

    for check in (False, True):
        result = run_module(capsys, _ansible_check_mode=check, **args)
        assert not result['changed']
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ['boot.json']      # no temp files left


def test_change_is_detected_and_invalid_file_replaced(system, capsys):
    path = system / 'boot/stiefel/boot.json'
    args = dict(root=str(system), path=str(path), use_proc_cmdline=False)
    run_module(capsys, **args)
    result = run_module(capsys, cmdline_extra=['quiet'], **args)
    assert result['changed'] and 'quiet' in bootconfig.load_boot_config(str(path))['cmdline']
    path.write_bytes(b'\x00garbage')
    result = run_module(capsys, cmdline_extra=['quiet'], **args)
    assert result['changed'] and bootconfig.load_boot_config(str(path))['cmdline'].endswith('quiet')


def test_unknown_layout_fails_clearly_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / 'boot.json'
    result = run_module(capsys, root=str(tmp_path), path=str(path), use_proc_cmdline=False)
    assert result['rc'] == 1 and result['failed']
    assert 'cannot derive the boot config' in result['msg'] and 'no kernel' in result['msg']
    assert not path.exists()


def test_overrides_reach_the_file(system, capsys):
    path = system / 'boot/stiefel/boot.json'
    result = run_module(capsys, root=str(system), path=str(path), use_proc_cmdline=False,
                        cmdline='root=UUID=%s rw' % UUID, boot_partition='UUID=b', luks_boot='UUID=l')
    cfg = bootconfig.load_boot_config(str(path))
    assert cfg['cmdline'] == 'root=UUID=%s rw' % UUID
    assert (cfg['boot_partition'], cfg['luks_boot']) == ('UUID=b', 'UUID=l')
    assert result['root_disk'] is None          # not the running system
