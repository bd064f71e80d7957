#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: runtime_install
short_description: Install a target's stiefel runtime files in one step
version_added: 0.2.0
description:
  - Writes the agents and Python modules a target runs (the list the lookup
    P(stiefel.system.runtime_files#lookup) gives with O(stiefel.system.runtime_files#lookup:content=true))
    below O(path), in one module run instead of one copy per file.
  - A file whose content and mode already match is left alone; a file that differs is replaced
    atomically (temporary file, fsync, rename), so an agent starting meanwhile never imports half a module.
  - Missing directories below O(path) are created with mode C(0755).
  - Files below O(path) that are not in O(files) are left in place.
author:
  - stiefel.system developers (@stiefel-system)
options:
  path:
    description:
      - The library directory of the target, for example C(/usr/lib/stiefel).
    type: path
    required: true
  files:
    description:
      - The files to install, as the lookup P(stiefel.system.runtime_files#lookup) returns them with
        O(stiefel.system.runtime_files#lookup:content=true).
    type: list
    elements: dict
    required: true
    suboptions:
      dest:
        description: Where the file goes, relative to O(path). No C(..) and no absolute paths.
        type: str
        required: true
      mode:
        description: The file's mode, in octal, for example C(0644).
        type: str
        required: true
      content:
        description: The file's content, base64-encoded.
        type: str
        required: true
      src:
        description: Where the file came from on the controller; not used, accepted so the lookup's dicts pass as they are.
        type: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    description: Reports which files would be written and writes nothing.
    support: full
  diff_mode:
    description: Lists the files that change with their SHA-256 before and after.
    support: full
  platform:
    platforms: posix
"""

EXAMPLES = r"""
- name: Install the autokexec agent and the modules it imports
  stiefel.system.runtime_install:
    path: /usr/lib/stiefel
    files: "{{ lookup('stiefel.system.runtime_files', 'laptop', content=true, wantlist=true) }}"
"""

RETURN = r"""
changed_files:
  description: The files (relative to O(path)) that were written, or would be in check mode.
  returned: always
  type: list
  elements: str
  sample: [python/stiefel_runtime/autokexec.py]
files:
  description: How many files O(files) named.
  returned: always
  type: int
  sample: 15
"""

import base64
import binascii
import hashlib
import os
import posixpath
import stat

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.stiefel.system.plugins.module_utils.fileio import write_atomic

MAX_MODE = 0o777


def _dest(path, rel):
    norm = posixpath.normpath(rel or "")
    if not rel or rel.startswith("/") or norm.startswith("..") or norm in (".", "") or norm != rel:
        raise ValueError("refusing destination %r: it must be a plain path relative to %s" % (rel, path))
    return os.path.join(path, norm)


def _mode(entry):
    try:
        value = int(str(entry["mode"]), 8)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_MODE:
        raise ValueError("refusing mode %r for %s: an octal mode up to 0777 is needed" % (entry["mode"], entry["dest"]))
    return value


def _content(entry):
    try:
        return base64.b64decode(entry["content"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("the content of %s is not base64" % entry["dest"]) from None


def _current(target):
    """``(content, mode)`` of a regular file there, or ``(None, None)``; a symlink counts as different."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None, None
    if not stat.S_ISREG(st.st_mode):
        return None, None
    with open(target, "rb") as handle:
        return handle.read(), stat.S_IMODE(st.st_mode)


def _sha(data):
    return hashlib.sha256(data).hexdigest() if data is not None else "absent"


def run(module):
    root = module.params["path"]
    if not os.path.isabs(root):
        module.fail_json(msg="path must be absolute, not %r" % root)
    plan = []
    for entry in module.params["files"]:
        target = _dest(root, entry["dest"])
        mode, data = _mode(entry), _content(entry)
        old, old_mode = _current(target)
        if old != data or old_mode != mode:
            plan.append((entry["dest"], target, data, mode, old))
    result = dict(changed=bool(plan), changed_files=[p[0] for p in plan], files=len(module.params["files"]))
    if module._diff:
        result["diff"] = dict(
            before_header=root, after_header=root,
            before="".join("%s %s\n" % (_sha(old), dest) for dest, _t, _d, _m, old in plan),
            after="".join("%s %s\n" % (_sha(data), dest) for dest, _t, data, _m, _o in plan))
    if module.check_mode:
        return result
    for _dest_rel, target, data, mode, _old in plan:
        directory = os.path.dirname(target)
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o755)
        write_atomic(target, data, mode=mode)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            files=dict(type="list", elements="dict", required=True, options=dict(
                dest=dict(type="str", required=True),
                mode=dict(type="str", required=True),
                content=dict(type="str", required=True),
                src=dict(type="str"),
            )),
        ),
        supports_check_mode=True,
    )
    try:
        result = run(module)
    except (ValueError, OSError) as exc:
        module.fail_json(msg="cannot install the runtime files below %s: %s" % (module.params["path"], exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
