#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stiefel.system contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
---
module: boot_config
short_description: Write the laptop's stiefel boot config (kernel, initrd, command line)
description:
  - Derives what the desktop must boot from the installed system (BLS loader entries,
    C(grub.cfg), C(/etc/kernel/cmdline), C(/proc/cmdline), C(/etc/fstab), the newest kernel
    in C(/boot)) and writes it as JSON to O(path), by default C(/boot/stiefel/boot.json).
  - Every derived value can be overridden. Paths in the file are relative to C(/boot).
  - The stiefel server agent reads the same file through the same library
    (C(plugins/module_utils/bootconfig.py)), see its docstring for the format.
  - Fails, changing nothing, when the boot layout is not understood.
version_added: "0.1.0"
author:
  - stiefel.system developers (@stiefel-system)
options:
  path:
    description: Where to write the boot config (in the target system).
    type: path
    default: /boot/stiefel/boot.json
  root:
    description:
      - Root of the installed system to derive from (C(/) for the running system).
      - The boot config is still written to O(path) as seen by the target.
    type: path
    default: /
  kernel:
    description: Kernel to boot, an absolute path inside O(root) (for example C(/boot/vmlinuz-6.1.0-28-amd64)).
    type: str
  initrd:
    description: Initrd(s) to boot, absolute paths inside O(root), concatenated in order.
    type: list
    elements: str
  cmdline:
    description: The whole kernel command line, instead of the derived one.
    type: str
  cmdline_extra:
    description: Options appended to the (derived or given) command line unless already present.
    type: list
    elements: str
    default: []
  root_spec:
    description: The root filesystem (C(UUID=...)) instead of the one from C(/etc/fstab).
    type: str
  boot_partition:
    description: The /boot filesystem (C(UUID=...)) instead of the one from C(/etc/fstab).
    type: str
  luks_boot:
    description: The LUKS container holding /boot (C(UUID=...)) instead of the one from C(/etc/crypttab).
    type: str
  use_proc_cmdline:
    description:
      - Use C(/proc/cmdline) as the last source of the command line.
      - By default only when O(root=/) and the target is not a chroot.
    type: bool
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    description: Reports what would be written and writes nothing.
    support: full
  diff_mode:
    description: Shows the boot config before and after.
    support: full
  platform:
    platforms: posix
'''

EXAMPLES = r'''
- name: Write the boot config of the running system
  stiefel.system.boot_config:

- name: Add options for the stiefel boots only
  stiefel.system.boot_config:
    cmdline_extra:
      - systemd.swap=0
      - noresume
'''

RETURN = r'''
config:
  description: The boot config (as written or as it would be written).
  returned: always
  type: dict
  sample:
    format: stiefel-boot-config
    version: 1
    kernel: vmlinuz-6.1.0-28-amd64
    initrd: [initrd.img-6.1.0-28-amd64]
    cmdline: root=UUID=0a1b... ro quiet
    root: UUID=0a1b...
    boot_partition: null
    luks_boot: null
path:
  description: The file written.
  returned: always
  type: str
root_disk:
  description:
    - The whole disk holding the root filesystem on the running system (a C(/dev/disk/by-id/) path
      when one exists), or null when it cannot be found (for example in a chroot).
  returned: always
  type: str
'''

import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.facts.system.chroot import is_chroot

from ansible_collections.stiefel.system.plugins.module_utils.bootconfig import (
    BootConfigError,
    derive_boot_config,
    dump_boot_config,
    find_whole_disk,
    load_boot_config,
)
from ansible_collections.stiefel.system.plugins.module_utils.fileio import write_atomic


def _uuid_lookup(module):
    blkid = module.get_bin_path('blkid')

    def lookup(device):
        if not blkid:
            return None
        rc, out, dummy = module.run_command([blkid, '-s', 'UUID', '-o', 'value', device])
        out = out.strip()
        return out if rc == 0 and out else None
    return lookup


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type='path', default='/boot/stiefel/boot.json'),
            root=dict(type='path', default='/'),
            kernel=dict(type='str'),
            initrd=dict(type='list', elements='str'),
            cmdline=dict(type='str'),
            cmdline_extra=dict(type='list', elements='str', default=[]),
            root_spec=dict(type='str'),
            boot_partition=dict(type='str'),
            luks_boot=dict(type='str'),
            use_proc_cmdline=dict(type='bool'),
        ),
        supports_check_mode=True,
    )
    params = module.params
    root = params['root']
    running = os.path.realpath(root) == '/' and not is_chroot(module)
    use_proc = params['use_proc_cmdline']
    if use_proc is None:
        use_proc = running
    proc_cmdline = None
    if use_proc:
        try:
            with open('/proc/cmdline') as handle:
                proc_cmdline = handle.read()
        except OSError:
            proc_cmdline = None

    try:
        config = derive_boot_config(
            root=root,
            proc_cmdline=proc_cmdline,
            kernel=params['kernel'],
            initrd=params['initrd'],
            cmdline=params['cmdline'],
            cmdline_extra=params['cmdline_extra'],
            root_spec=params['root_spec'],
            boot_partition=params['boot_partition'],
            luks_boot=params['luks_boot'],
            uuid_lookup=_uuid_lookup(module),
        )
        new_text = dump_boot_config(config)
    except BootConfigError as exc:
        module.fail_json(msg='cannot derive the boot config of %s: %s' % (root, exc))

    root_disk = find_whole_disk(config['root']) if running else None
    path = params['path']
    old_text = ''
    if os.path.exists(path):
        try:
            old_text = dump_boot_config(load_boot_config(path))
        except BootConfigError:
            with open(path, 'rb') as handle:
                old_text = handle.read(64 * 1024).decode('utf-8', 'replace')
    changed = old_text != new_text
    result = dict(changed=changed, config=config, path=path, root_disk=root_disk)
    if module._diff:
        result['diff'] = dict(before=old_text, after=new_text, before_header=path, after_header=path)
    if changed and not module.check_mode:
        try:
            directory = os.path.dirname(path)
            if not os.path.isdir(directory):
                os.makedirs(directory, 0o755)
            write_atomic(path, new_text, 0o644)
        except OSError as exc:
            module.fail_json(msg='cannot write %s: %s' % (path, exc), **result)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
