#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: key
short_description: Create, keep or rotate the stiefel key file
version_added: 0.1.0
description:
  - Ensures a 256-bit random stiefel key exists in O(path), in the v1 key file format
    (C(stiefel-key-v1:) followed by 64 hex digits).
  - A valid key is kept byte for byte; an invalid file (truncated, foreign, corrupted) is replaced
    by a new key and the reason is reported as a warning.
  - The key is written atomically (temporary file, fsync, rename) and is never readable by others
    while it is being written.
  - The key itself never appears in the module's output, diff or logs; only its key id does
    (an HKDF-derived identifier, not a hash of the key).
  - Rotating the key makes every USB stick and ramdisk made with the old key useless.
author:
  - stiefel.system developers (@stiefel-system)
options:
  path:
    description:
      - Where the key file lives.
    type: path
    required: true
  state:
    description:
      - V(present) creates a key if there is no valid one and otherwise keeps it.
      - V(rotated) always writes a new key (not idempotent by design).
    type: str
    choices: [present, rotated]
    default: present
  force:
    description:
      - Same as O(state=rotated) when V(true).
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.files
attributes:
  check_mode:
    description: A dry run that reports whether a key would be created or replaced and writes nothing.
    support: full
  diff_mode:
    description: Shows the key id (never the key) before and after, or V(absent) / V(invalid key file).
    support: full
  platform:
    platforms: posix
notes:
  - O(mode) defaults to V(0600). A mode that lets group or others read the key is refused.
"""

EXAMPLES = r"""
- name: Ensure the laptop has a stiefel key
  stiefel.system.key:
    path: /etc/stiefel/key
    owner: root
    group: root

- name: Rotate the key (old sticks stop working)
  stiefel.system.key:
    path: /etc/stiefel/key
    state: rotated
"""

RETURN = r"""
key_id:
  description: Identifier of the key now in O(path) (16 hex digits). Null in check mode when a new key would be made.
  returned: always
  type: str
  sample: 93f4310215ab9149
previous_key_id:
  description: Identifier of the key that was replaced, if a valid one was there.
  returned: always
  type: str
  sample: 0c1d2e3f40516273
action:
  description: What happened to the key material.
  returned: always
  type: str
  sample: kept
  choices: [kept, created, replaced_invalid, rotated]
path:
  description: The key file path.
  returned: always
  type: str
  sample: /etc/stiefel/key
pairing_code:
  description:
    - The code a person types on a desktop booted over the network without a stick (SPAKE2 pairing), derived
      from the key now in O(path); a new key (O(state=rotated)) brings a new code. C(stiefelctl pairing-code)
      prints it again later. Null in check mode when a new key would be made.
  returned: always
  type: str
  sample: 0421-7730
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.stiefel.system.plugins.module_utils import keyfile, keyschedule
from ansible_collections.stiefel.system.plugins.module_utils.errors import KeyFileError


def _mode_is_private(module, mode):
    if mode is None:
        return True
    if isinstance(mode, int):
        value = mode
    else:
        try:
            value = int(str(mode), 8)
        except ValueError:
            # Symbolic modes: let Ansible apply them, then check the result.
            return True
    return not value & 0o077


def run(module):
    params = module.params
    path = params["path"]
    rotate = params["state"] == "rotated" or params["force"]
    if params["mode"] is None:
        params["mode"] = "0600"
    if not _mode_is_private(module, params["mode"]):
        module.fail_json(msg="refusing mode %s for %s: the key must not be readable by group or others" % (params["mode"], path))

    result = dict(changed=False, path=path, key_id=None, previous_key_id=None, action="kept", pairing_code=None)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        if module.check_mode:
            # In a dry run an earlier task would have created the directory.
            result.update(changed=True, action="created")
            return result
        module.fail_json(msg="directory %s for the key file does not exist" % directory, **result)

    previous = None
    problem = None
    if os.path.lexists(path):
        try:
            previous = keyfile.read_key(path)
        except KeyFileError as exc:
            problem = str(exc)
    if previous is not None:
        result["previous_key_id"] = keyschedule.key_id_hex(previous)

    if previous is not None and not rotate:
        result["key_id"] = result["previous_key_id"]
        result["pairing_code"] = keyschedule.pairing_code(previous)
        new_key = None
    else:
        new_key = keyfile.generate_key()
        if rotate and previous is not None:
            result["action"] = "rotated"
        elif problem is not None and os.path.lexists(path):
            result["action"] = "replaced_invalid"
            module.warn("replacing invalid key file %s: %s" % (path, problem))
        else:
            result["action"] = "created"
        result["changed"] = True
        if not module.check_mode:
            keyfile.write_key_atomic(path, new_key, mode=0o600)
            result["key_id"] = keyschedule.key_id_hex(new_key)
            result["pairing_code"] = keyschedule.pairing_code(new_key)

    if module._diff:
        if previous is not None:
            before = "key id %s\n" % result["previous_key_id"]
        else:
            before = "invalid key file\n" if problem and os.path.lexists(path) else "absent\n"
        result["diff"] = dict(
            before_header=path,
            after_header=path,
            before=before,
            after="key id %s\n" % (result["key_id"] or "(new key)"),
        )

    if os.path.exists(path):
        file_args = module.load_file_common_arguments(params)
        result["changed"] = module.set_fs_attributes_if_different(file_args, result["changed"])
        if not module.check_mode and os.stat(path).st_mode & 0o077:
            module.fail_json(msg="key file %s ended up readable by group or others; fix mode" % path, **result)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            state=dict(type="str", choices=["present", "rotated"], default="present"),
            force=dict(type="bool", default=False),
        ),
        add_file_common_args=True,
        supports_check_mode=True,
    )
    try:
        result = run(module)
    except (KeyFileError, OSError) as exc:
        module.fail_json(msg="cannot manage key file %s: %s" % (module.params["path"], exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
