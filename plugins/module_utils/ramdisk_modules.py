# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which kernel modules the ramdisk keeps: the ones asked for and everything they depend on."""

from __future__ import annotations

import fnmatch


def parse_modules_dep(text):
    """Parse ``modules.dep`` into {module path: [dependency paths]}."""
    deps = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _sep, rest = line.partition(":")
        mod = mod.strip()
        if not mod:
            continue
        deps[mod] = rest.split()
    return deps


def select_modules(deps, include, exclude):
    """The modules to keep: matching ``include`` and not ``exclude`` (fnmatch on
    the path relative to the module directory), plus everything they need."""
    wanted = set()
    for mod in deps:
        if any(fnmatch.fnmatch(mod, p) for p in include) and not any(fnmatch.fnmatch(mod, p) for p in exclude):
            wanted.add(mod)
    todo = list(wanted)
    while todo:
        mod = todo.pop()
        for dep in deps.get(mod, ()):
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return wanted
