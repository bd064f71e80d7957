# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What of this collection is installed on each target, and where.

The one list the ramdisk build, the ``laptop`` and ``standalone_server``
roles (through the ``stiefel.system.runtime_files`` lookup) and the test lab
use. A target gets the agents it runs (their shims from ``agents/``) and
exactly the Python modules those agents import, followed through
``stiefel_runtime`` and ``plugins/module_utils`` by reading the import
statements; controller-only code (the ramdisk and stick builders, the
modules) is never among them.

Destinations are relative to the target's library directory
(``/usr/lib/stiefel``); agents run with ``PYTHONPATH=<lib>/python``.
"""

from __future__ import annotations

import ast
import os
import shutil

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError

# target -> the agents it runs
TARGETS = {
    # One image for both roles: the server and the client agent (autokexec
    # too, so the image can be tried as a laptop in stiefelctl test-nspawn).
    "ramdisk": ("autokexec", "client", "server"),
    "laptop": ("autokexec",),
    "standalone": ("server",),
}

PYTHON_DIR = "python"
AGENTS_DIR = "agents"
RUNTIME_PACKAGE = "stiefel_runtime"
MODULE_UTILS_PACKAGE = "ansible_collections.stiefel.system.plugins.module_utils"
MODULE_UTILS_DEST = PYTHON_DIR + "/ansible_collections/stiefel/system/plugins/module_utils"
RUNTIME_DEST = PYTHON_DIR + "/" + RUNTIME_PACKAGE
# Modules every target gets whatever it imports: the package's own files.
ALWAYS = ("stiefel_runtime/__init__.py", "stiefel_runtime/__main__.py")
# Tools a target carries beside its agents: the laptop's OS, booted on a desktop, runs
# ``python3 -m stiefel_runtime.whendone`` (stiefelctl when-done) and the powerwatch unit's
# ``python3 -m stiefel_runtime.powerwatch`` from what the laptop role installed.
TOOLS = {"laptop": ("stiefel_runtime/whendone.py", "stiefel_runtime/powerwatch.py")}


class ManifestError(StiefelError):
    """The collection tree does not hold what the manifest names."""


class Entry(object):
    """One file to install: ``src`` (absolute), ``dest`` (relative to the library dir), ``mode``."""

    __slots__ = ("src", "dest", "mode")

    def __init__(self, src, dest, mode):
        self.src, self.dest, self.mode = src, dest, mode

    def as_dict(self):
        return {"src": self.src, "dest": self.dest, "mode": "%04o" % self.mode}

    def __repr__(self):
        return "Entry(%r, %r, %04o)" % (self.src, self.dest, self.mode)


def collection_root():
    """This collection's root, from this file's place (plugins/module_utils/)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _relpath(module):
    """A dotted module name of ours -> its path in the collection, or None for anything else."""
    if module == RUNTIME_PACKAGE or module.startswith(RUNTIME_PACKAGE + "."):
        return module.replace(".", "/") + ".py" if module != RUNTIME_PACKAGE else RUNTIME_PACKAGE + "/__init__.py"
    if module.startswith(MODULE_UTILS_PACKAGE + "."):
        return "plugins/module_utils/" + module[len(MODULE_UTILS_PACKAGE) + 1:].replace(".", "/") + ".py"
    return None


def _imports(root, relpath):
    """Collection-relative paths of our modules that ``relpath`` imports (any nesting level)."""
    path = os.path.join(root, relpath)
    try:
        with open(path, "r", encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ManifestError("cannot read %s: %s" % (path, exc)) from exc
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # "from pkg import name": name may be a module of pkg or an attribute of it.
            names = [node.module] + [node.module + "." + alias.name for alias in node.names]
        else:
            continue
        for name in names:
            rel = _relpath(name)
            if rel and os.path.isfile(os.path.join(root, rel)):
                found.append(rel)
    return found


def python_closure(root, start):
    """Every module of ours that the modules in ``start`` import, themselves included, sorted."""
    seen = set()
    todo = list(start)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        todo.extend(_imports(root, rel))
    return sorted(seen)


def _dest(rel):
    if rel.startswith(RUNTIME_PACKAGE + "/"):
        return PYTHON_DIR + "/" + rel
    return MODULE_UTILS_DEST + "/" + rel[len("plugins/module_utils/"):]


def entries(target, root=None):
    """The files of ``target`` (a key of TARGETS): Python modules 0644, agent shims 0755, sorted by dest."""
    if target not in TARGETS:
        raise ManifestError("unknown target %r (one of %s)" % (target, ", ".join(sorted(TARGETS))))
    root = root or collection_root()
    agents = TARGETS[target]
    start = list(ALWAYS) + ["%s/%s.py" % (RUNTIME_PACKAGE, name) for name in agents] + list(TOOLS.get(target, ()))
    for rel in start:
        if not os.path.isfile(os.path.join(root, rel)):
            raise ManifestError("%s is not in the collection at %s" % (rel, root))
    result = [Entry(os.path.join(root, rel), _dest(rel), 0o644) for rel in python_closure(root, start)]
    for name in agents:
        shim = os.path.join(root, AGENTS_DIR, "stiefel-" + name)
        if not os.path.isfile(shim):
            raise ManifestError("the agent shim %s is missing" % shim)
        result.append(Entry(shim, AGENTS_DIR + "/stiefel-" + name, 0o755))
    return sorted(result, key=lambda entry: entry.dest)


def directories(target_entries):
    """Every directory (relative, parents first) that ``target_entries`` need."""
    dirs = set()
    for entry in target_entries:
        parent = os.path.dirname(entry.dest)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    return sorted(dirs, key=lambda d: (d.count("/"), d))


SOURCE_DIRS = (RUNTIME_PACKAGE, "plugins/module_utils", AGENTS_DIR)


def copy_sources(dest, root=None):
    """Copy the directories the manifest reads from (``SOURCE_DIRS``) to ``dest``: a tree ``entries`` accepts.

    Tests and benchmarks change a file in such a copy to see what a rebuild does.
    """
    root = root or collection_root()
    for rel in SOURCE_DIRS:
        shutil.copytree(os.path.join(root, rel), os.path.join(dest, rel), symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dest
