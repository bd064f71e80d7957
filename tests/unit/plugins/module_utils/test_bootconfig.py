"""Unit tests for plugins/module_utils/bootconfig.py (boot config derivation and loader)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import bootconfig as bc

FIXTURES = Path(__file__).resolve().parents[2] / 'fixtures' / 'bootconfig'
DEBIAN_ROOT_UUID = '5d3c4e2a-8f41-4b7a-9a57-2c8e1f0b9d11'
FEDORA_ROOT_UUID = '2a7c9b5e-51f0-4f8e-a4c6-6f2b0d8e1c33'
FEDORA_BOOT_UUID = 'c4e1f0a2-7d3b-4b9e-8a61-0f5e2d9c7b44'


def fixture(name):
    return (FIXTURES / name).read_text()


def put(root, path, content='x'):
    full = root / path.lstrip('/')
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(content)
    return full


@pytest.fixture
def debian_root(tmp_path):
    for ver in ('6.1.0-9-amd64', '6.1.0-10-amd64'):
        put(tmp_path, '/boot/vmlinuz-' + ver, 'kernel ' + ver)
        put(tmp_path, '/boot/initrd.img-' + ver, 'initrd ' + ver)
    put(tmp_path, '/boot/grub/grub.cfg', fixture('debian12-grub.cfg'))
    put(tmp_path, '/etc/fstab', fixture('debian12-fstab'))
    return tmp_path


@pytest.fixture
def fedora_root(tmp_path):
    ver = '6.5.6-300.fc39.x86_64'
    put(tmp_path, '/boot/vmlinuz-' + ver)
    put(tmp_path, '/boot/initramfs-%s.img' % ver)
    put(tmp_path, '/boot/vmlinuz-0-rescue-1c5b7f0e2a8d4e6f9b3a1c7d5e9f2b4a')
    put(tmp_path, '/boot/initramfs-0-rescue-1c5b7f0e2a8d4e6f9b3a1c7d5e9f2b4a.img')
    put(tmp_path, '/boot/loader/entries/1c5b-%s.conf' % ver, fixture('fedora39-entry.conf'))
    put(tmp_path, '/boot/loader/entries/1c5b-0-rescue.conf', fixture('fedora39-rescue.conf'))
    put(tmp_path, '/etc/fstab', fixture('fedora39-fstab'))
    return tmp_path


# --- derivation -------------------------------------------------------------

def test_debian_grub_layout(debian_root):
    cfg = bc.derive_boot_config(str(debian_root), cmdline_extra=['systemd.swap=0'])
    assert cfg['kernel'] == 'vmlinuz-6.1.0-10-amd64'          # 10 > 9: natural version order
    assert cfg['initrd'] == ['initrd.img-6.1.0-10-amd64']      # from the grub entry
    assert cfg['kernel_version'] == '6.1.0-10-amd64'
    assert cfg['cmdline'] == 'root=UUID=%s ro quiet systemd.swap=0' % DEBIAN_ROOT_UUID
    assert cfg['root'] == 'UUID=' + DEBIAN_ROOT_UUID
    assert cfg['boot_partition'] is None                       # /boot is on the root fs
    assert cfg['luks_boot'] is None
    assert cfg['sources']['cmdline'] == '/boot/grub/grub.cfg'


def test_fedora_bls_layout_with_separate_boot(fedora_root):
    cfg = bc.derive_boot_config(str(fedora_root))
    assert cfg['kernel'] == 'vmlinuz-6.5.6-300.fc39.x86_64'   # the rescue entry is skipped
    assert cfg['initrd'] == ['initramfs-6.5.6-300.fc39.x86_64.img']
    assert cfg['cmdline'] == 'root=UUID=%s ro rootflags=subvol=root rhgb quiet' % FEDORA_ROOT_UUID
    assert cfg['boot_partition'] == 'UUID=' + FEDORA_BOOT_UUID
    assert cfg['sources']['kernel'].startswith('/boot/loader/entries/')


def test_etc_kernel_cmdline_wins_over_bls_options(fedora_root):
    put(fedora_root, '/etc/kernel/cmdline', '# comment\nroot=UUID=%s ro quiet mitigations=auto\n' % FEDORA_ROOT_UUID)
    cfg = bc.derive_boot_config(str(fedora_root))
    assert cfg['cmdline'] == 'root=UUID=%s ro quiet mitigations=auto' % FEDORA_ROOT_UUID
    assert cfg['sources']['cmdline'] == '/etc/kernel/cmdline'


def test_proc_cmdline_fallback_is_cleaned(tmp_path):
    put(tmp_path, '/boot/vmlinuz-6.1.0-10-amd64')
    put(tmp_path, '/boot/initrd.img-6.1.0-10-amd64')
    put(tmp_path, '/etc/fstab', fixture('debian12-fstab'))
    proc = ('BOOT_IMAGE=/boot/vmlinuz-6.1.0-10-amd64 root=UUID=%s ro quiet initrd=\\initrd.img '
            'stiefel.mac=52:54:00:00:00:01 stiefel.server=fe80::1 splash\n' % DEBIAN_ROOT_UUID)
    cfg = bc.derive_boot_config(str(tmp_path), proc_cmdline=proc)
    assert cfg['cmdline'] == 'root=UUID=%s ro quiet splash' % DEBIAN_ROOT_UUID
    assert cfg['sources']['cmdline'] == '/proc/cmdline'


def test_generated_cmdline_from_fstab_only(tmp_path):
    put(tmp_path, '/boot/vmlinuz-6.1.0-10-amd64')
    put(tmp_path, '/boot/initrd.img-6.1.0-10-amd64')
    put(tmp_path, '/etc/fstab', 'UUID=abc / ext4 defaults 0 1\n')
    cfg = bc.derive_boot_config(str(tmp_path), cmdline_extra=['noresume', 'ro'])
    assert cfg['cmdline'] == 'root=UUID=abc ro noresume'        # 'ro' not repeated


def test_unstable_device_names_need_a_uuid(tmp_path):
    put(tmp_path, '/boot/vmlinuz-6.1.0-10-amd64')
    put(tmp_path, '/boot/initrd.img-6.1.0-10-amd64')
    put(tmp_path, '/etc/fstab', '/dev/nvme0n1p2 / ext4 defaults 0 1\n')
    with pytest.raises(bc.BootConfigError, match='changes when the disk'):
        bc.derive_boot_config(str(tmp_path))
    cfg = bc.derive_boot_config(str(tmp_path), uuid_lookup={'/dev/nvme0n1p2': 'u-1'}.get,
                                proc_cmdline='root=/dev/nvme0n1p2 ro')
    assert cfg['root'] == 'UUID=u-1'
    assert cfg['cmdline'] == 'root=UUID=u-1 ro'


def test_luks_boot_from_crypttab(tmp_path):
    put(tmp_path, '/boot/vmlinuz-6.1.0-10-amd64')
    put(tmp_path, '/boot/initrd.img-6.1.0-10-amd64')
    put(tmp_path, '/etc/fstab', fixture('luks-fstab'))
    put(tmp_path, '/etc/crypttab', fixture('luks-crypttab'))
    cfg = bc.derive_boot_config(str(tmp_path))
    assert cfg['root'] == '/dev/mapper/vg-root'
    assert cfg['boot_partition'] == '/dev/mapper/luks-boot'
    assert cfg['luks_boot'] == 'UUID=e1d2c3b4-a5f6-4789-9abc-def012345678'
    assert cfg['cmdline'].startswith('root=/dev/mapper/vg-root ro')


def test_kernel_on_a_separate_esp_is_refused(tmp_path):
    put(tmp_path, '/etc/fstab', fixture('debian12-fstab'))
    put(tmp_path, '/boot/efi/loader/entries/abc-6.1.conf',
        'title Debian\nversion 6.1\nlinux /abc/6.1/linux\ninitrd /abc/6.1/initrd\noptions root=UUID=x ro\n')
    put(tmp_path, '/boot/efi/abc/6.1/linux')
    put(tmp_path, '/boot/efi/abc/6.1/initrd')
    with pytest.raises(bc.BootConfigError, match='separate filesystem below /boot'):
        bc.derive_boot_config(str(tmp_path))


def test_no_kernel_is_a_clear_error(tmp_path):
    put(tmp_path, '/etc/fstab', fixture('debian12-fstab'))
    (tmp_path / 'boot').mkdir()
    put(tmp_path, '/boot/vmlinuz-6.1.0-10-amd64')            # no initrd: unusable
    with pytest.raises(bc.BootConfigError, match='no kernel with an initrd'):
        bc.derive_boot_config(str(tmp_path))


def test_overrides(debian_root):
    cfg = bc.derive_boot_config(str(debian_root), kernel='/boot/vmlinuz-6.1.0-9-amd64',
                                initrd=['/boot/initrd.img-6.1.0-9-amd64'], cmdline='root=LABEL=x rw',
                                cmdline_extra=['quiet'])
    assert cfg['kernel'] == 'vmlinuz-6.1.0-9-amd64'
    assert cfg['initrd'] == ['initrd.img-6.1.0-9-amd64']
    assert cfg['cmdline'] == 'root=LABEL=x rw quiet'
    with pytest.raises(bc.BootConfigError, match='does not exist'):
        bc.derive_boot_config(str(debian_root), kernel='/boot/vmlinuz-9')


def test_symlinked_kernel_resolves_inside_root(debian_root):
    os.symlink('boot/vmlinuz-6.1.0-9-amd64', debian_root / 'vmlinuz')
    cfg = bc.derive_boot_config(str(debian_root), kernel='/vmlinuz')
    assert cfg['kernel'] == 'vmlinuz-6.1.0-9-amd64'
    assert cfg['initrd'] == ['initrd.img-6.1.0-9-amd64']


# --- parsers ----------------------------------------------------------------

def test_parse_grub_cfg_entries_and_submenus():
    entries = bc.parse_grub_cfg(fixture('debian12-grub.cfg'))
    titles = [e['title'] for e in entries]
    assert titles[0] == 'Debian GNU/Linux'
    assert 'Debian GNU/Linux, with Linux 6.1.0-9-amd64' in titles
    assert entries[0]['linux'] == '/boot/vmlinuz-6.1.0-10-amd64'
    assert entries[0]['initrd'] == ['/boot/initrd.img-6.1.0-10-amd64']
    assert entries[-1]['title'] == 'UEFI Firmware Settings' and entries[-1]['linux'] is None


def test_parse_fstab_and_escapes():
    entries = bc.parse_fstab('LABEL=My\\040Disk /mnt/my\\040disk ext4 defaults 0 2\n#c\n\nbad\n')
    assert entries == [{'spec': 'LABEL=My Disk', 'file': '/mnt/my disk', 'vfstype': 'ext4', 'options': 'defaults'}]
    fedora = bc.parse_fstab(fixture('fedora39-fstab'))
    assert bc.fstab_mount(fedora, '/boot/')['spec'] == 'UUID=' + FEDORA_BOOT_UUID


def test_parse_bls_entry():
    entry = bc.parse_bls_entry(fixture('fedora39-entry.conf'))
    assert entry['linux'] == '/vmlinuz-6.5.6-300.fc39.x86_64'
    assert entry['initrd'] == ['/initramfs-6.5.6-300.fc39.x86_64.img']
    assert entry['version'] == '6.5.6-300.fc39.x86_64'


def test_version_key_orders_naturally():
    versions = ['6.1.0-9-amd64', '6.1.0-10-amd64', '5.10.0-23-amd64', '6.10.2-arch1-1', '6.1.0-10-rt-amd64']
    ordered = sorted(versions, key=bc.version_key, reverse=True)
    assert ordered[0] == '6.10.2-arch1-1'
    assert ordered.index('6.1.0-10-amd64') < ordered.index('6.1.0-9-amd64')
    assert ordered[-1] == '5.10.0-23-amd64'


@settings(max_examples=200)
@given(st.text(max_size=2000))
def test_text_parsers_never_raise(text):
    bc.parse_fstab(text)
    bc.parse_crypttab(text)
    bc.parse_bls_entry(text)
    bc.parse_grub_cfg(text)
    bc.parse_kernel_cmdline_file(text)
    bc.clean_cmdline(text)
    bc.version_key(text)


# --- the boot config file ---------------------------------------------------

def good_config():
    return {
        'format': 'stiefel-boot-config', 'version': 1,
        'kernel': 'vmlinuz-6.1.0-10-amd64', 'initrd': ['initrd.img-6.1.0-10-amd64'],
        'cmdline': 'root=UUID=abc ro quiet', 'root': 'UUID=abc',
        'kernel_version': '6.1.0-10-amd64', 'boot_partition': None, 'luks_boot': None,
        'sources': {'kernel': 'newest in /boot'},
    }


def test_roundtrip_and_load(tmp_path):
    text = bc.dump_boot_config(good_config())
    assert bc.parse_boot_config(text) == good_config()
    path = tmp_path / 'boot.json'
    path.write_text(text)
    assert bc.load_boot_config(str(path)) == good_config()
    assert bc.dump_boot_config(bc.load_boot_config(str(path))) == text   # stable text


def test_missing_file_is_a_boot_config_error(tmp_path):
    with pytest.raises(bc.BootConfigError, match='cannot read'):
        bc.load_boot_config(str(tmp_path / 'nope.json'))


@pytest.mark.parametrize('mutate, message', [
    (lambda c: c.update(kernel='/boot/vmlinuz'), 'relative'),
    (lambda c: c.update(kernel='../etc/shadow'), r'"\.\."'),
    (lambda c: c.update(initrd=['a', 'x/../../y']), r'"\.\."'),
    (lambda c: c.update(initrd=[]), 'list of 1'),
    (lambda c: c.update(initrd='initrd.img'), 'list of 1'),
    (lambda c: c.update(cmdline='root=x\nrm -rf /'), 'control'),
    (lambda c: c.update(cmdline='x' * 5000), 'longer'),
    (lambda c: c.update(version=2), 'unsupported'),
    (lambda c: c.update(version=True), 'integer'),
    (lambda c: c.update(format='other'), 'not a stiefel'),
    (lambda c: c.update(extra=1), 'unknown keys'),
    (lambda c: c.pop('root'), 'lacks'),
    (lambda c: c.update(sources={'a': 1}), 'string'),
    (lambda c: c.update(luks_boot=5), 'string or null'),
])
def test_invalid_configs_are_refused(mutate, message):
    config = good_config()
    mutate(config)
    with pytest.raises(bc.BootConfigError, match=message):
        bc.parse_boot_config(json.dumps(config))


def test_duplicate_keys_oversize_and_truncation():
    text = bc.dump_boot_config(good_config())
    with pytest.raises(bc.BootConfigError, match='duplicate'):
        bc.parse_boot_config(text.replace('"format"', '"kernel": "a", "format"', 1))
    with pytest.raises(bc.BootConfigError, match='larger than'):
        bc.parse_boot_config(text + ' ' * bc.MAX_BOOT_CONFIG_SIZE)
    for cut in range(0, len(text) - 2, 7):
        with pytest.raises(bc.BootConfigError):
            bc.parse_boot_config(text[:cut])
    with pytest.raises(bc.BootConfigError):
        bc.parse_boot_config('[' * 100000)


@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_boot_config_error(raw):
    try:
        bc.parse_boot_config(raw)
    except bc.BootConfigError:
        pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@given(st.sampled_from(sorted(good_config())), _json_values)
def test_wrong_types_raise_only_boot_config_error(key, value):
    config = good_config()
    config[key] = value
    try:
        result = bc.parse_boot_config(json.dumps(config))
    except bc.BootConfigError:
        return
    # accepted: then it must be a valid config again
    assert bc.validate_boot_config(result) == result


@given(st.dictionaries(st.text(max_size=20), _json_values, max_size=12))
def test_random_objects_raise_only_boot_config_error(data):
    try:
        bc.validate_boot_config(data)
    except bc.BootConfigError:
        pass


def test_resolve_boot_path_refuses_escapes(tmp_path):
    boot = tmp_path / 'boot'
    put(boot, '/vmlinuz-1')
    (tmp_path / 'secret').write_text('s')
    os.symlink('../secret', boot / 'evil')
    assert bc.resolve_boot_path(str(boot), 'vmlinuz-1') == str((boot / 'vmlinuz-1').resolve())
    with pytest.raises(bc.BootConfigError, match='leaves'):
        bc.resolve_boot_path(str(boot), 'evil')
    with pytest.raises(bc.BootConfigError):
        bc.resolve_boot_path(str(boot), '../secret')


def test_boot_config_path_in(tmp_path):
    assert bc.boot_config_path_in(str(tmp_path)) is None
    put(tmp_path, '/boot/stiefel/boot.json', '{}')                 # a root partition holding /boot
    assert bc.boot_config_path_in(str(tmp_path)) == str(tmp_path / 'boot/stiefel/boot.json')
    put(tmp_path, '/stiefel/boot.json', '{}')                      # a separate boot partition
    assert bc.boot_config_path_in(str(tmp_path)) == str(tmp_path / 'stiefel/boot.json')


def test_find_whole_disk_follows_partitions_and_dm(tmp_path):
    dev, sys_ = tmp_path / 'dev', tmp_path / 'sys'
    put(dev, '/nvme0n1')
    put(dev, '/nvme0n1p2')
    put(dev, '/dm-0')
    (dev / 'disk/by-uuid').mkdir(parents=True)
    (dev / 'disk/by-id').mkdir(parents=True)
    os.symlink('../../nvme0n1p2', dev / 'disk/by-uuid/u-plain')
    os.symlink('../../dm-0', dev / 'disk/by-uuid/u-lvm')
    os.symlink('../../nvme0n1', dev / 'disk/by-id/nvme-Samsung_SSD_980_S123')
    os.symlink('../../nvme0n1', dev / 'disk/by-id/nvme-eui.0025385')
    block = sys_ / 'devices/pci/nvme/nvme0n1'
    put(block, '/nvme0n1p2/partition', '2')
    put(sys_, '/devices/virtual/block/dm-0/slaves/.keep')
    os.unlink(sys_ / 'devices/virtual/block/dm-0/slaves/.keep')
    os.symlink(block / 'nvme0n1p2', sys_ / 'devices/virtual/block/dm-0/slaves/nvme0n1p2')
    (sys_ / 'class/block').mkdir(parents=True)
    for name, target in (('nvme0n1', block), ('nvme0n1p2', block / 'nvme0n1p2'),
                         ('dm-0', sys_ / 'devices/virtual/block/dm-0')):
        os.symlink(target, sys_ / 'class/block' / name)
    want = '/dev/disk/by-id/nvme-Samsung_SSD_980_S123'
    assert bc.find_whole_disk('UUID=u-plain', str(dev), str(sys_)) == want
    assert bc.find_whole_disk('UUID=u-lvm', str(dev), str(sys_)) == want
    assert bc.find_whole_disk('UUID=missing', str(dev), str(sys_)) is None
    assert bc.find_whole_disk('LABEL=x', str(dev), str(sys_)) is None
