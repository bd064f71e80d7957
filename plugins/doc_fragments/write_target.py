# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every module that writes a disk says about the targets it refuses (blockdev.inspect_target), and
the attributes they share (a full dry run; no diff)."""

from __future__ import annotations


class ModuleDocFragment(object):

    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
notes:
  - A target is refused, with one reason per problem, when it is a partition instead of a whole disk, is
    neither a block device nor a regular file, is mounted or has a mounted partition, is used as swap or
    by device-mapper/RAID/loop, holds the running system's C(/), C(/boot) or C(/boot/efi), is read-only
    or empty, or does not exist and no image file may be created there (never below C(/dev), C(/proc),
    C(/sys)).
"""
