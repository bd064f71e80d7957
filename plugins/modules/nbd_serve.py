#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: serve a block device or image file over NBD with nbdkit."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nbd_serve
short_description: Export a block device or image file over NBD (nbdkit)
description:
  - Ensures a block device or image file is exported over NBD by nbdkit's file plugin,
    with the settings of the stiefel library (C(nbd_export)). Flush and FUA are advertised,
    multi-connection where nbdkit deems it safe, the export name is strict, optionally
    read-only or copy-on-write, optionally TLS-PSK restricted to AES-GCM.
  - The server runs detached, so it outlives the playbook. It is supervised by systemd
    (a generated C(stiefel-nbd-<name>.service) unit) or by a pidfile under C(/run/stiefel/).
  - The desired settings are recorded next to the pidfile or unit; a run with the same
    settings changes nothing, a run with other settings restarts the server.
  - Refuses to export a device that is mounted (read-write, or at all for a writable export),
    used as swap, or has active device-mapper/md holders, on itself or its partitions.
    The running system's own disk is always refused.
version_added: "0.1.0"
author:
  - stiefel.system developers (@stiefel-system)
options:
  name:
    description: NBD export name. Clients must ask for exactly this name. It also names the unit and state files.
    type: str
    default: stiefel
  path:
    description: Absolute path of the block device or image file. Required with I(state=started).
    type: path
  address:
    description: IP address to listen on (IPv6 link-local needs a C(%scope)). C(::) listens on all addresses.
    type: str
    default: "::"
  port:
    description: TCP port.
    type: int
    default: 10809
  read_only:
    description: Export read-only.
    type: bool
    default: false
  copy_on_write:
    description: Writes go to a temporary overlay (nbdkit cow filter) and never reach I(path).
    type: bool
    default: false
  multi_conn:
    description: Advertise multi-connection consistency when nbdkit deems it safe; C(false) hides it.
    type: bool
    default: true
  tls_psk_file:
    description:
      - nbdkit/GnuTLS PSK file (C(user:hexkey) lines, mode 0600). When set, TLS is required
        (plaintext clients are refused).
    type: path
  tls_aes_gcm_only:
    description: With TLS, allow only AES-GCM suites (GnuTLS priority override); Debian 12 would pick ChaCha20.
    type: bool
    default: true
  threads:
    description: nbdkit worker threads.
    type: int
    default: 16
  state:
    description: Whether the export should be running.
    type: str
    choices: [started, stopped]
    default: started
  supervisor:
    description:
      - C(systemd) writes and starts a unit; C(pidfile) starts nbdkit detached and tracks its PID.
      - C(auto) uses systemd when C(/run/systemd/system) exists.
    type: str
    choices: [auto, systemd, pidfile]
    default: auto
  state_dir:
    description:
      - Where the recorded settings, GnuTLS override and (pidfile supervisor) pidfile and log live.
      - Defaults to C(/run/stiefel) with the pidfile supervisor and C(/etc/stiefel/nbd) with systemd.
    type: path
  unit_dir:
    description: Directory for the systemd unit.
    type: path
    default: /etc/systemd/system
  verify:
    description: After starting (and on every run), check the advertised flags with C(nbdinfo --json).
    type: bool
    default: true
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    description: A dry run that reports what would change and touches nothing.
    support: full
  diff_mode:
    description: Shows the recorded settings (pidfile) or the unit (systemd) before and after.
    support: full
  platform:
    platforms: posix
requirements:
  - nbdkit (Debian package nbdkit)
  - nbdinfo for I(verify) (Debian package libnbd-bin)
"""

EXAMPLES = r"""
- name: Serve the laptop disk to the desktop over TLS
  stiefel.system.nbd_serve:
    path: /dev/nvme0n1
    address: "fe80::1%stiefel0"
    tls_psk_file: /run/stiefel/nbd.psk

- name: Serve an image read-only on loopback, tracked by a pidfile
  stiefel.system.nbd_serve:
    name: test
    path: /srv/images/disk.img
    address: 127.0.0.1
    port: 10900
    read_only: true
    supervisor: pidfile

- name: Stop it
  stiefel.system.nbd_serve:
    name: test
    state: stopped
    supervisor: pidfile
"""

RETURN = r"""
uri:
  description: The export's NBD URI (C(nbds://) with TLS; no secrets).
  returned: state is started
  type: str
  sample: nbd://127.0.0.1:10809/stiefel
supervisor:
  description: The supervisor used (systemd or pidfile).
  returned: always
  type: str
pid:
  description: PID of the nbdkit server (pidfile supervisor, not in check mode).
  returned: when running under the pidfile supervisor
  type: int
argv:
  description: The nbdkit command line.
  returned: state is started
  type: list
  elements: str
export:
  description: Flags advertised by the running export (from nbdinfo).
  returned: when verify is true and the export runs
  type: dict
  sample: {can_flush: true, can_fua: true, can_multi_conn: true, read_only: false, size: 1073741824, tls: false}
unit_file:
  description: Path of the generated systemd unit.
  returned: with the systemd supervisor
  type: str
state_file:
  description: Path of the recorded settings.
  returned: always
  type: str
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.stiefel.system.plugins.module_utils.blockdev import check_exportable
from ansible_collections.stiefel.system.plugins.module_utils.errors import NbdExportError
from ansible_collections.stiefel.system.plugins.module_utils.nbd_export import (
    ExportSettings,
    GNUTLS_AES_GCM_ONLY,
    NAME_RE,
    atomic_write,
    export_uri,
    pid_matches,
    probe_export,
    read_pidfile,
    read_state,
    render_systemd_unit,
    server_argv,
    source_size,
    start_daemon,
    state_to_json,
    stop_pid,
    unit_name,
    verify_export,
)


def _read_text(path):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def _remove(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class Paths:
    def __init__(self, params, supervisor):
        name = params["name"]
        default_dir = "/run/stiefel" if supervisor == "pidfile" else "/etc/stiefel/nbd"
        self.state_dir = params["state_dir"] or default_dir
        self.state = os.path.join(self.state_dir, "nbd-%s.json" % name)
        self.priority = os.path.join(self.state_dir, "nbd-%s.gnutls.conf" % name)
        self.log = os.path.join(self.state_dir, "nbd-%s.log" % name)
        if supervisor == "pidfile":
            self.pidfile = os.path.join(self.state_dir, "nbd-%s.pid" % name)
        else:
            self.pidfile = "/run/stiefel-nbd-%s.pid" % name
        self.unit = os.path.join(params["unit_dir"], unit_name(name))


def _settings(module):
    p = module.params
    try:
        return ExportSettings(path=p["path"], name=p["name"], address=p["address"], port=p["port"],
                              read_only=p["read_only"], copy_on_write=p["copy_on_write"],
                              multi_conn=p["multi_conn"], tls_psk_file=p["tls_psk_file"],
                              tls_aes_gcm_only=p["tls_aes_gcm_only"], threads=p["threads"])
    except NbdExportError as exc:
        module.fail_json(msg=str(exc))
    return None


def _preflight(module, settings):
    if not os.path.exists(settings.path):
        module.fail_json(msg="path %s does not exist" % settings.path)
    try:
        check_exportable(settings.path, writable_export=settings.writable)
    except NbdExportError as exc:
        module.fail_json(msg=str(exc))
    if settings.tls_psk_file:
        try:
            mode = os.stat(settings.tls_psk_file).st_mode
        except OSError as exc:
            module.fail_json(msg="tls_psk_file %s: %s" % (settings.tls_psk_file, exc.strerror))
        if mode & 0o077:
            module.fail_json(msg="tls_psk_file %s must not be accessible by group or others (mode %04o)"
                             % (settings.tls_psk_file, mode & 0o7777))
    if module.get_bin_path("nbdkit") is None:
        module.fail_json(msg="nbdkit is not installed (Debian package nbdkit)")


def _verify(module, settings, result):
    if not module.params["verify"] or module.check_mode:
        return
    if module.get_bin_path("nbdinfo") is None:
        module.warn("nbdinfo not found (Debian package libnbd-bin): export flags not verified")
        return
    uri = export_uri(settings, for_client=True)
    info = None
    last = None
    for _attempt in range(50):
        try:
            info = probe_export(uri)
            break
        except NbdExportError as exc:
            last = exc
            time.sleep(0.1)
    if info is None:
        module.fail_json(msg="export started but nbdinfo cannot read it: %s" % last, **result)
    problems = verify_export(settings, info, source_size(settings.path))
    result["export"] = {"size": info.size, "read_only": info.read_only, "can_flush": info.can_flush,
                        "can_fua": info.can_fua, "can_multi_conn": info.can_multi_conn, "tls": info.tls}
    if problems:
        module.fail_json(msg="export does not advertise what was asked: %s" % "; ".join(problems), **result)


def _priority_needed(settings):
    return bool(settings.tls_psk_file and settings.tls_aes_gcm_only)


def _write_priority(settings, paths):
    if _priority_needed(settings):
        atomic_write(paths.priority, GNUTLS_AES_GCM_ONLY, 0o644)
        return paths.priority
    _remove(paths.priority)
    return None


def _priority_ok(settings, paths):
    if _priority_needed(settings):
        return _read_text(paths.priority) == GNUTLS_AES_GCM_ONLY
    return True


# ------------------------------------------------------------ pidfile supervisor

def pidfile_started(module, settings, paths, result):
    nbdkit = module.get_bin_path("nbdkit", required=True)
    argv = server_argv(settings, foreground=False, pidfile=paths.pidfile, nbdkit=nbdkit)
    result["argv"] = argv
    recorded = read_state(paths.state)
    pid = read_pidfile(paths.pidfile)
    running_recorded = recorded is not None and pid_matches(pid, recorded[1])
    up_to_date = (running_recorded and recorded[0] == settings and recorded[1] == argv
                  and _priority_ok(settings, paths))
    if up_to_date:
        result["pid"] = pid
        return False
    result["diff"] = {"before": state_to_json(*recorded) if recorded else "",
                      "after": state_to_json(settings, argv)}
    if module.check_mode:
        return True
    os.makedirs(paths.state_dir, mode=0o755, exist_ok=True)
    if running_recorded:
        stop_pid(pid)
    try:
        priority = _write_priority(settings, paths)
        result["pid"] = start_daemon(settings, paths.pidfile, priority, logfile=paths.log, nbdkit=nbdkit)
    except NbdExportError as exc:
        _remove(paths.state)
        module.fail_json(msg=str(exc), **result)
    atomic_write(paths.state, state_to_json(settings, argv), 0o600)
    return True


def pidfile_stopped(module, paths, result):
    recorded = read_state(paths.state)
    pid = read_pidfile(paths.pidfile)
    running = recorded is not None and pid_matches(pid, recorded[1])
    leftovers = [p for p in (paths.state, paths.pidfile, paths.priority, paths.log) if os.path.exists(p)]
    if not running:
        if leftovers and not module.check_mode:
            for path in leftovers:
                _remove(path)
        return False
    result["diff"] = {"before": state_to_json(*recorded), "after": ""}
    if module.check_mode:
        return True
    stop_pid(pid)
    for path in leftovers:
        _remove(path)
    return True


# ------------------------------------------------------------ systemd supervisor

def _systemctl(module, *args, check=True):
    rc, out, err = module.run_command([module.get_bin_path("systemctl", required=True)] + list(args))
    if check and rc != 0:
        module.fail_json(msg="systemctl %s failed: %s" % (" ".join(args), (err or out).strip()))
    return rc, out.strip()


def systemd_started(module, settings, paths, result):
    nbdkit = module.get_bin_path("nbdkit") or "/usr/bin/nbdkit"
    priority = paths.priority if _priority_needed(settings) else None
    unit_text = render_systemd_unit(settings, paths.pidfile, priority, nbdkit=nbdkit)
    result["argv"] = server_argv(settings, foreground=False, pidfile=paths.pidfile, nbdkit=nbdkit)
    result["unit_file"] = paths.unit
    unit = unit_name(settings.name)
    current = _read_text(paths.unit)
    unit_changed = current != unit_text or not _priority_ok(settings, paths)
    active = _systemctl(module, "is-active", unit, check=False)[0] == 0
    enabled = _systemctl(module, "is-enabled", unit, check=False)[0] == 0
    if not unit_changed and active and enabled:
        return False
    result["diff"] = {"before": current or "", "after": unit_text}
    if module.check_mode:
        return True
    os.makedirs(paths.state_dir, mode=0o755, exist_ok=True)
    _write_priority(settings, paths)
    atomic_write(paths.unit, unit_text, 0o644)
    atomic_write(paths.state, state_to_json(settings, result["argv"]), 0o600)
    _systemctl(module, "daemon-reload")
    if not enabled:
        _systemctl(module, "enable", unit)
    _systemctl(module, "restart" if (unit_changed and active) else "start", unit)
    return True


def systemd_stopped(module, paths, result):
    unit = os.path.basename(paths.unit)
    result["unit_file"] = paths.unit
    exists = os.path.exists(paths.unit)
    active = exists and _systemctl(module, "is-active", unit, check=False)[0] == 0
    if not exists:
        return False
    result["diff"] = {"before": _read_text(paths.unit) or "", "after": ""}
    if module.check_mode:
        return True
    if active:
        _systemctl(module, "stop", unit)
    _systemctl(module, "disable", unit, check=False)
    for path in (paths.unit, paths.state, paths.priority):
        _remove(path)
    _systemctl(module, "daemon-reload")
    return True


def resolve_supervisor(choice, systemd_dir="/run/systemd/system"):
    if choice == "auto":
        return "systemd" if os.path.isdir(systemd_dir) else "pidfile"
    return choice


def run_module():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", default="stiefel"),
            path=dict(type="path"),
            address=dict(type="str", default="::"),
            port=dict(type="int", default=10809),
            read_only=dict(type="bool", default=False),
            copy_on_write=dict(type="bool", default=False),
            multi_conn=dict(type="bool", default=True),
            tls_psk_file=dict(type="path"),
            tls_aes_gcm_only=dict(type="bool", default=True),
            threads=dict(type="int", default=16),
            state=dict(type="str", choices=["started", "stopped"], default="started"),
            supervisor=dict(type="str", choices=["auto", "systemd", "pidfile"], default="auto"),
            state_dir=dict(type="path"),
            unit_dir=dict(type="path", default="/etc/systemd/system"),
            verify=dict(type="bool", default=True),
        ),
        required_if=[("state", "started", ["path"])],
        mutually_exclusive=[("read_only", "copy_on_write")],
        supports_check_mode=True,
    )
    params = module.params
    supervisor = resolve_supervisor(params["supervisor"])
    paths = Paths(params, supervisor)
    result = {"changed": False, "supervisor": supervisor, "state_file": paths.state}

    if params["state"] == "stopped":
        if not NAME_RE.match(params["name"]):
            module.fail_json(msg="invalid export name %r" % params["name"])
        if supervisor == "pidfile":
            result["changed"] = pidfile_stopped(module, paths, result)
        else:
            result["changed"] = systemd_stopped(module, paths, result)
        module.exit_json(**result)

    settings = _settings(module)
    _preflight(module, settings)
    result["uri"] = export_uri(settings)
    if supervisor == "pidfile":
        result["changed"] = pidfile_started(module, settings, paths, result)
    else:
        result["changed"] = systemd_started(module, settings, paths, result)
    _verify(module, settings, result)
    if not module._diff:  # pylint: disable=protected-access
        result.pop("diff", None)
    module.exit_json(**result)


def main():
    run_module()


if __name__ == "__main__":
    main()
