#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ramdisk_build
short_description: Build one stage of the stiefel ramdisk (kernel + zstd initramfs)
description:
  - Builds the stiefel ramdisk in cached stages. Each stage is keyed by a hash of
    its inputs (APT sources, package list, strip lists, kernel module patterns,
    the project's library, agents and init script) and does nothing when its
    output already matches, so a second run reports no change.
  - C(plan) only hashes the inputs and reports whether the ramdisk is up to date.
    C(bootstrap) runs mmdebstrap. C(strip) removes documentation, package state and
    the kernel modules not selected. C(pack_base) packs the base root with cpio and
    zstd. C(overlay) packs C(/init), the library and the agents. C(assemble) writes
    C(vmlinuz), C(initrd.img) and C(manifest.json) to O(output_dir).
  - The mirror and suite are read from the host's APT configuration unless
    O(mirror) and O(suite) are given.
  - Each stage writes the output of the tools it runs to C(<output_dir>/logs/<stage>.log).
version_added: "0.1.0"
author:
  - stiefel.system developers (@stiefel-system)
options:
  step:
    description: The stage to run.
    type: str
    required: true
    choices: [plan, bootstrap, strip, pack_base, overlay, assemble]
  output_dir:
    description: Where C(vmlinuz), C(initrd.img), C(manifest.json), C(logs/) and the C(work/) cache go.
    type: path
    required: true
  mirror:
    description: Debian mirror URI. Empty means the host's APT sources.
    type: str
    default: ""
  suite:
    description: Debian suite. Empty means the host's main suite.
    type: str
    default: ""
  components:
    description: Archive components. Empty means those of the host's APT source.
    type: list
    elements: str
    default: []
  variant:
    description: mmdebstrap variant.
    type: str
    default: essential
  packages:
    description: Packages installed into the ramdisk root (with their dependencies).
    type: list
    elements: str
    required: true
  extra_packages:
    description: More packages (for example firmware packages).
    type: list
    elements: str
    default: []
  dpkg_excludes:
    description: Paths dpkg does not unpack (C(--path-exclude) globs).
    type: list
    elements: str
    default: []
  strip_paths:
    description: Globs (relative to the root) removed after installation.
    type: list
    elements: str
    default: []
  modules_include:
    description: Kernel modules kept (fnmatch globs on the path below C(/usr/lib/modules/<version>/)).
    type: list
    elements: str
    required: true
  modules_exclude:
    description: Kernel modules removed even if they match O(modules_include) (unless another kept module needs them).
    type: list
    elements: str
    default: []
  compress_modules:
    description:
      - Compress the kept kernel modules one by one (C(xz)); kmod decompresses them when loading.
        Saves about 100 MB of RAM in the running ramdisk and makes the kernel unpack it faster.
    type: str
    choices: [none, xz]
    default: none
  zstd_level:
    description: zstd compression level for the initrd archives.
    type: int
    default: 9
  zstd_long:
    description:
      - zstd long-distance matching window as a power of two (C(--long=N)); 0 turns it off.
      - At most 27, the window the zstd tool and the kernel decompress without being asked
        for more memory (the kernel allocates it while unpacking the initrd).
    type: int
    default: 0
  hwdb_exclude:
    description:
      - udev hwdb source files (fnmatch on the name in C(/usr/lib/udev/hwdb.d)) left out when
        C(hwdb.bin) is recompiled in the root with its own C(systemd-hwdb). Empty keeps Debian's C(hwdb.bin).
    type: list
    elements: str
    default: []
  icu_data_stub:
    description:
      - Replace the ICU data library by ICU's empty stub data (same SONAME and symbol), built with
        C(as) and C(ld). For roots where ICU is only linked in, never asked for data.
    type: bool
    default: false
  smoke_commands:
    description:
      - Commands (split like a shell, no shell) run in the stripped root with C(chroot); the strip
        stage fails when one exits non-zero.
    type: list
    elements: str
    default: []
  runtime_root:
    description:
      - A tree laid out like this collection (C(stiefel_runtime/), C(plugins/module_utils/), C(agents/));
        the runtime manifest's C(ramdisk) target is read from it and installed to C(/usr/lib/stiefel).
    type: path
    required: true
  init_path:
    description: The C(/init) script of the ramdisk.
    type: path
    required: true
  role_version:
    description: A version string that is part of the input hash (bump it to force a rebuild).
    type: str
    default: ""
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    description: Reports which stages would run and builds nothing.
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
notes:
  - Needs root, mmdebstrap, cpio, zstd, depmod, chroot and binutils (readelf, as, ld) on the build host.
"""

EXAMPLES = r"""
- name: Bootstrap the ramdisk base root
  stiefel.system.ramdisk_build:
    step: bootstrap
    output_dir: /var/cache/stiefel/ramdisk
    packages: [linux-image-amd64, python3, kexec-tools, nbd-client]
    modules_include: ["kernel/drivers/net/*"]
    runtime_root: /path/to/collection
    init_path: /path/to/collection/roles/ramdisk/files/init
"""

RETURN = r"""
msg:
  description: What the stage did or would do.
  type: str
  returned: always
base_hash:
  description: Hash of the inputs of the base root.
  type: str
  returned: always
input_hash:
  description: Hash of all inputs (base and overlay files); recorded in the manifest.
  type: str
  returned: always
up_to_date:
  description: (plan) whether the manifest matches the inputs and the output files.
  type: bool
  returned: when step is plan
sources:
  description: (plan) the APT source lines mmdebstrap uses.
  type: list
  elements: str
  returned: when step is plan
manifest:
  description: (assemble) the manifest written (or found up to date).
  type: dict
  returned: when step is assemble and not in check mode
log:
  description: The log file of the stage.
  type: str
  returned: when the stage ran
"""

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
from ansible_collections.stiefel.system.plugins.module_utils.ramdisk_build import STEPS, RamdiskBuilder


def main():
    module = AnsibleModule(
        argument_spec=dict(
            step=dict(type="str", required=True, choices=list(STEPS)),
            output_dir=dict(type="path", required=True),
            mirror=dict(type="str", default=""),
            suite=dict(type="str", default=""),
            components=dict(type="list", elements="str", default=[]),
            variant=dict(type="str", default="essential"),
            packages=dict(type="list", elements="str", required=True),
            extra_packages=dict(type="list", elements="str", default=[]),
            dpkg_excludes=dict(type="list", elements="str", default=[]),
            strip_paths=dict(type="list", elements="str", default=[]),
            modules_include=dict(type="list", elements="str", required=True),
            modules_exclude=dict(type="list", elements="str", default=[]),
            compress_modules=dict(type="str", default="none", choices=["none", "xz"]),
            zstd_level=dict(type="int", default=9),
            zstd_long=dict(type="int", default=0),
            hwdb_exclude=dict(type="list", elements="str", default=[]),
            icu_data_stub=dict(type="bool", default=False),
            smoke_commands=dict(type="list", elements="str", default=[]),
            runtime_root=dict(type="path", required=True),
            init_path=dict(type="path", required=True),
            role_version=dict(type="str", default=""),
        ),
        supports_check_mode=True,
    )
    params = dict(module.params)
    step = params.pop("step")
    if not 1 <= params["zstd_level"] <= 22:
        module.fail_json(msg="zstd_level must be between 1 and 22, got %d" % params["zstd_level"])
    if params["zstd_long"] and not 10 <= params["zstd_long"] <= 27:
        module.fail_json(msg="zstd_long must be 0 or between 10 and 27, got %d" % params["zstd_long"])
    try:
        builder = RamdiskBuilder(params, check=module.check_mode)
        result = builder.run(step)
    except StiefelError as exc:  # RamdiskBuildError, or ToolError from a build step
        module.fail_json(msg="ramdisk %s: %s" % (step, exc))
    except OSError as exc:
        module.fail_json(msg="ramdisk %s: %s" % (step, exc), exception=traceback.format_exc())
    module.exit_json(**result)


if __name__ == "__main__":
    main()
