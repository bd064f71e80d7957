# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""stiefel.system's runtime: the agents that run in the ramdisk, on the laptop and on a standalone server.

It builds on the collection's ``plugins/module_utils`` (key files, key
schedule, errors, cpio, boot config, NBD export settings, block devices),
which the Ansible modules share; nothing here is imported by a module.
What each target gets of both is listed by
``plugins/module_utils/runtime_manifest.py``. Entry points:
``python3 -m stiefel_runtime server|client|autokexec`` or the shims in
``agents/``; both need ``PYTHONPATH`` to hold ``ansible_collections`` and
this package (``/usr/lib/stiefel/python`` on a target, ``<repo>/collections``
in a checkout).
"""
