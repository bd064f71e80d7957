#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: usb_target
short_description: Inspect a USB stick target and check that it is safe to overwrite
version_added: "0.1.0"
description:
  - Inspects a block device or image file that is about to receive the stiefel client stick.
  - Fails, with one reason per problem, when the target is refused (see the notes); a missing I(path)
    is refused unless I(create_size) allows creating an image file there.
  - Never changes anything.
options:
  path:
    description: The whole-disk block device (for example C(/dev/sdb)) or image file path.
    type: path
    required: true
  create_size:
    description:
      - Size of the image file to create if I(path) does not exist (for example C(2G)).
      - Empty means a missing I(path) is refused.
    type: str
    default: ""
  fail_on_refusal:
    description: Fail when the target is refused. With C(false), refusals are only returned.
    type: bool
    default: true
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - stiefel.system.write_target
author:
  - stiefel.system developers (@stiefel-system)
"""

EXAMPLES = r"""
- name: Check the stick target
  stiefel.system.usb_target:
    path: /dev/sdb
  register: stick_target

- name: Check an image file target that may be created
  stiefel.system.usb_target:
    path: /var/tmp/stiefel-stick.img
    create_size: 2G
"""

RETURN = r"""
target:
  description: What was found (also returned when the module fails on a refusal).
  returned: always
  type: dict
  contains:
    kind:
      description: C(disk), C(partition), C(file), C(missing) or C(other).
      type: str
    size:
      description: Size in bytes (for C(missing), the size the file would be created with).
      type: int
    mounted:
      description: C(<device> on <mountpoint>) for every mount on the disk or its partitions.
      type: list
      elements: str
    system_mounts:
      description: The system mount points (C(/), C(/boot), C(/boot/efi)) that live on this disk.
      type: list
      elements: str
    refusals:
      description: One sentence per reason the target must not be written; empty when it is safe.
      type: list
      elements: str
    ok:
      description: True when there is no refusal.
      type: bool
  sample:
    kind: disk
    size: 8019509248
    refusals: []
    ok: true
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.stiefel.system.plugins.module_utils.blockdev import inspect_target
from ansible_collections.stiefel.system.plugins.module_utils.usb_image import StickError, parse_size


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            create_size=dict(type="str", default=""),
            fail_on_refusal=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    try:
        create_size = parse_size(module.params["create_size"])
    except StickError as exc:
        module.fail_json(msg=str(exc))
    info = inspect_target(module.params["path"], create_size=create_size)
    result = dict(changed=False, target=info.as_dict())
    if info.refusals and module.params["fail_on_refusal"]:
        module.fail_json(msg="refusing to use %s as the stick target: %s"
                         % (module.params["path"], " | ".join(info.refusals)), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
