# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: runtime_files
author:
  - stiefel.system developers (@stiefel-system)
short_description: The files of this collection that a target runs (agents and their Python modules)
version_added: "0.2.0"
description:
  - Lists what the collection's runtime manifest (C(plugins/module_utils/runtime_manifest.py)) installs on a
    target, so that roles copy exactly that and nothing controller-only.
  - Each target gets the shims of the agents it runs and the Python modules those agents import, followed
    through C(stiefel_runtime) and C(plugins/module_utils).
options:
  _terms:
    description: The target, one of C(ramdisk), C(laptop) or C(standalone).
    required: true
    type: list
    elements: str
  kind:
    description:
      - C(files) returns one dict per file, C(directories) the directories they need (parents first).
    type: str
    default: files
    choices: [files, directories]
  content:
    description:
      - With O(kind=files), add each file's content, base64-encoded, as C(content).
      - That is the form M(stiefel.system.runtime_install) takes, which installs a whole target in one module run.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Create the library directories
  ansible.builtin.file:
    path: "/usr/lib/stiefel/{{ item }}"
    state: directory
    mode: "0755"
  loop: "{{ lookup('stiefel.system.runtime_files', 'laptop', kind='directories', wantlist=True) }}"

- name: Install the autokexec agent and its modules
  ansible.builtin.copy:
    src: "{{ item.src }}"
    dest: "/usr/lib/stiefel/{{ item.dest }}"
    mode: "{{ item.mode }}"
  loop: "{{ lookup('stiefel.system.runtime_files', 'laptop', wantlist=True) }}"

- name: The same in one module run
  stiefel.system.runtime_install:
    path: /usr/lib/stiefel
    files: "{{ lookup('stiefel.system.runtime_files', 'laptop', content=True, wantlist=True) }}"
"""

RETURN = r"""
_list:
  description:
    - With O(kind=files), dicts with C(src) (absolute path on the controller), C(dest) (relative to the
      target's library directory, e.g. C(agents/stiefel-autokexec)) and C(mode) (C(0644) or C(0755)),
      and with O(content=true) also C(content) (the file, base64-encoded).
    - With O(kind=directories), relative directory paths.
  type: list
  elements: raw
"""

import base64

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

from ansible_collections.stiefel.system.plugins.module_utils import runtime_manifest


class LookupModule(LookupBase):

    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        kind = self.get_option("kind")
        content = self.get_option("content")
        result = []
        for target in terms:
            try:
                files = runtime_manifest.entries(target)
            except runtime_manifest.ManifestError as exc:
                raise AnsibleLookupError(str(exc)) from exc
            if kind == "directories":
                result.extend(d for d in runtime_manifest.directories(files) if d not in result)
            else:
                result.extend(self._entry(entry, content) for entry in files)
        return result

    @staticmethod
    def _entry(entry, content):
        item = entry.as_dict()
        if content:
            try:
                with open(entry.src, "rb") as handle:
                    item["content"] = base64.b64encode(handle.read()).decode("ascii")
            except OSError as exc:
                raise AnsibleLookupError("cannot read %s: %s" % (entry.src, exc)) from exc
        return item
