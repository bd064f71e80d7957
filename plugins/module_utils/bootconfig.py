# -*- coding: utf-8 -*-
# Copyright: stiefel.system contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The laptop's boot config: what the desktop boots (kernel, initrd, cmdline).

Written at setup time by the ``boot_config`` module to ``/boot/stiefel/boot.json``
on the laptop; read by the server agent from the laptop's boot partition (or
from the root partition's ``boot/`` directory when /boot is not separate) to
build the boot payload.

File format (JSON object, UTF-8, at most ``MAX_BOOT_CONFIG_SIZE`` bytes)::

    {
      "format": "stiefel-boot-config",
      "version": 1,
      "kernel": "vmlinuz-6.1.0-28-amd64",          # relative to /boot
      "initrd": ["initrd.img-6.1.0-28-amd64"],     # relative to /boot, concatenated in order
      "cmdline": "root=UUID=... ro quiet",         # the laptop's own command line
      "kernel_version": "6.1.0-28-amd64",          # or null
      "root": "UUID=...",                          # root= of the installed system
      "boot_partition": "UUID=..." ,               # /boot filesystem, null when /boot is on root
      "luks_boot": null,                           # LUKS container holding /boot, or null
      "sources": {"kernel": "...", "cmdline": "..."}   # where each value came from (informational)
    }

All paths are relative to the directory that holds ``stiefel/boot.json``
(the laptop's /boot); they never start with ``/`` and never contain ``..``.
Use :func:`resolve_boot_path` to turn them into real paths safely.

Only the Python standard library is used here (the module also runs inside the
stiefel ramdisk with Debian 12's python3).
"""
from __future__ import annotations

import glob
import json
import os
import re

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError

BOOT_CONFIG_FORMAT = 'stiefel-boot-config'
BOOT_CONFIG_VERSION = 1
#: Where the file lives, relative to the root of the installed system.
BOOT_CONFIG_RELPATH = 'boot/stiefel/boot.json'
#: The same file relative to /boot (the boot partition's root when separate).
BOOT_CONFIG_BOOT_RELPATH = 'stiefel/boot.json'
MAX_BOOT_CONFIG_SIZE = 64 * 1024
MAX_CMDLINE_LEN = 4096
MAX_PATH_LEN = 1024
MAX_INITRDS = 8

# Bounds for the parsers of the installed system's files.
MAX_SOURCE_FILE_SIZE = 4 * 1024 * 1024

_REQUIRED_KEYS = ('format', 'version', 'kernel', 'initrd', 'cmdline', 'root')
_OPTIONAL_KEYS = ('kernel_version', 'boot_partition', 'luks_boot', 'sources')

# Kernel command line tokens never copied into the boot config: bootloader
# artefacts and the stiefel options the client adds itself.
_DROP_PREFIXES = ('BOOT_IMAGE=', 'initrd=', 'stiefel.')
_DROP_EXACT = ('stiefel',)

# Device paths whose names change when the disk is seen over NBD (nbd0pN).
_UNSTABLE_DEV = re.compile(r'^/dev/(sd[a-z]+|hd[a-z]+|vd[a-z]+|xvd[a-z]+|nvme\d+n\d+|mmcblk\d+)(p?\d+)?$')


class BootConfigError(StiefelError, ValueError):
    """A boot config (or the system it is derived from) is invalid or unsupported."""


# ---------------------------------------------------------------------------
# The boot config file itself


def _check_relpath(value, what):
    if not isinstance(value, str):
        raise BootConfigError('%s must be a string' % what)
    if not value or len(value) > MAX_PATH_LEN:
        raise BootConfigError('%s must be 1..%d characters' % (what, MAX_PATH_LEN))
    if value.startswith('/'):
        raise BootConfigError('%s must be relative to /boot: %r' % (what, value))
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
        raise BootConfigError('%s contains control characters' % what)
    parts = value.split('/')
    if any(p in ('', '.', '..') for p in parts):
        raise BootConfigError('%s must not contain empty, "." or ".." components: %r' % (what, value))
    return value


def _check_text(value, what, maxlen, allow_none=False):
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise BootConfigError('%s must be a string%s' % (what, ' or null' if allow_none else ''))
    if len(value) > maxlen:
        raise BootConfigError('%s is longer than %d characters' % (what, maxlen))
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
        raise BootConfigError('%s contains control characters' % what)
    return value


def validate_boot_config(data):
    """Check a decoded boot config and return a normalised copy (a new dict).

    Raises BootConfigError for anything that is not exactly a valid config.
    """
    if not isinstance(data, dict):
        raise BootConfigError('boot config must be a JSON object')
    unknown = sorted(str(k) for k in data if k not in _REQUIRED_KEYS + _OPTIONAL_KEYS)
    if unknown:
        raise BootConfigError('unknown keys in boot config: %s' % ', '.join(unknown)[:200])
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise BootConfigError('boot config lacks: %s' % ', '.join(missing))
    if data['format'] != BOOT_CONFIG_FORMAT:
        raise BootConfigError('not a stiefel boot config (format %r)' % (data['format'],))
    version = data['version']
    if not isinstance(version, int) or isinstance(version, bool):
        raise BootConfigError('version must be an integer')
    if version != BOOT_CONFIG_VERSION:
        raise BootConfigError('unsupported boot config version %r (this code reads %d)' % (version, BOOT_CONFIG_VERSION))
    out = {'format': BOOT_CONFIG_FORMAT, 'version': BOOT_CONFIG_VERSION}
    out['kernel'] = _check_relpath(data['kernel'], 'kernel')
    initrd = data['initrd']
    if not isinstance(initrd, list) or not initrd or len(initrd) > MAX_INITRDS:
        raise BootConfigError('initrd must be a list of 1..%d paths' % MAX_INITRDS)
    out['initrd'] = [_check_relpath(p, 'initrd') for p in initrd]
    cmdline = _check_text(data['cmdline'], 'cmdline', MAX_CMDLINE_LEN)
    if not cmdline.strip():
        raise BootConfigError('cmdline is empty')
    out['cmdline'] = cmdline
    root = _check_text(data['root'], 'root', 512)
    if not root:
        raise BootConfigError('root is empty')
    out['root'] = root
    out['kernel_version'] = _check_text(data.get('kernel_version'), 'kernel_version', 256, allow_none=True)
    out['boot_partition'] = _check_text(data.get('boot_partition'), 'boot_partition', 512, allow_none=True)
    out['luks_boot'] = _check_text(data.get('luks_boot'), 'luks_boot', 512, allow_none=True)
    sources = data.get('sources', {})
    if sources is None:
        sources = {}
    if not isinstance(sources, dict) or len(sources) > 16:
        raise BootConfigError('sources must be an object with at most 16 entries')
    out['sources'] = {}
    for key, value in sources.items():
        _check_text(key, 'sources key', 64)
        out['sources'][key] = _check_text(value, 'sources value', MAX_PATH_LEN)
    return out


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise BootConfigError('duplicate key %r in boot config' % (key[:64],))
        result[key] = value
    return result


def parse_boot_config(raw):
    """Parse the bytes (or text) of a boot config file; raise BootConfigError if invalid."""
    if isinstance(raw, str):
        raw = raw.encode('utf-8', 'surrogatepass')
    if not isinstance(raw, (bytes, bytearray)):
        raise BootConfigError('boot config must be bytes or text')
    if len(raw) > MAX_BOOT_CONFIG_SIZE:
        raise BootConfigError('boot config is larger than %d bytes' % MAX_BOOT_CONFIG_SIZE)
    try:
        text = bytes(raw).decode('utf-8')
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except BootConfigError:
        raise
    except (ValueError, RecursionError, TypeError) as exc:
        raise BootConfigError('boot config is not valid JSON: %s' % (str(exc)[:200],))
    return validate_boot_config(data)


def load_boot_config(path):
    """Read and validate the boot config at *path*; raise BootConfigError if invalid or unreadable."""
    try:
        with open(path, 'rb') as handle:
            raw = handle.read(MAX_BOOT_CONFIG_SIZE + 1)
    except OSError as exc:
        raise BootConfigError('cannot read boot config %s: %s' % (path, exc.strerror or exc))
    return parse_boot_config(raw)


def dump_boot_config(config):
    """Canonical text of a (validated) boot config: stable, so rewrites are idempotent."""
    config = validate_boot_config(config)
    return json.dumps(config, indent=2, sort_keys=True, ensure_ascii=True) + '\n'


def resolve_boot_path(boot_dir, relpath):
    """Join a boot config path to the directory holding /boot's content, refusing escapes.

    Symlinks are refused if they lead outside *boot_dir*.
    """
    _check_relpath(relpath, 'path')
    base = os.path.realpath(boot_dir)
    full = os.path.realpath(os.path.join(base, relpath))
    if full != base and not full.startswith(base + os.sep):
        raise BootConfigError('path %r leaves the boot directory' % (relpath,))
    return full


def boot_config_path_in(mount_dir):
    """Where boot.json is under a mounted partition: its root is /boot, or it holds boot/."""
    for rel in (BOOT_CONFIG_BOOT_RELPATH, BOOT_CONFIG_RELPATH):
        candidate = os.path.join(mount_dir, rel)
        if os.path.isfile(candidate):
            return candidate
    return None


# ---------------------------------------------------------------------------
# Parsers for the installed system's files (all tolerant: they never raise on
# odd content, they skip what they do not understand).


def _unescape_fstab(field):
    def repl(match):
        try:
            return chr(int(match.group(1), 8))
        except ValueError:
            return match.group(0)
    return re.sub(r'\\([0-7]{3})', repl, field)


def parse_fstab(text):
    """Return a list of dicts (spec, file, vfstype, options) from fstab text."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        entries.append({
            'spec': _unescape_fstab(fields[0]),
            'file': _unescape_fstab(fields[1]),
            'vfstype': fields[2] if len(fields) > 2 else '',
            'options': fields[3] if len(fields) > 3 else '',
        })
    return entries


def fstab_mount(entries, mountpoint):
    """The last fstab entry for *mountpoint* (normalised, trailing slash ignored), or None."""
    want = mountpoint.rstrip('/') or '/'
    found = None
    for entry in entries:
        if (entry['file'].rstrip('/') or '/') == want:
            found = entry
    return found


def parse_crypttab(text):
    """Return {name: source} from crypttab text."""
    result = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        fields = line.split()
        if len(fields) >= 2:
            result[fields[0]] = fields[1]
    return result


def parse_bls_entry(text):
    """Parse one Boot Loader Specification entry: dict with linux, initrd (list), options, version, title."""
    entry = {'initrd': []}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        parts = line.split(None, 1)
        key = parts[0]
        value = parts[1].strip() if len(parts) > 1 else ''
        if key == 'initrd':
            entry['initrd'].extend(value.split())
        elif key == 'options':
            entry['options'] = (entry.get('options', '') + ' ' + value).strip()
        elif key in ('linux', 'version', 'title', 'machine-id', 'architecture', 'sort-key'):
            entry[key] = value
    return entry


def _grub_words(line):
    """Split a grub.cfg line into words, honouring simple quotes."""
    words = []
    current = ''
    quote = None
    has_word = False
    for char in line:
        if quote:
            if char == quote:
                quote = None
            else:
                current += char
        elif char in ('"', "'"):
            quote = char
            has_word = True
        elif char in ' \t':
            if has_word or current:
                words.append(current)
            current = ''
            has_word = False
        else:
            current += char
    if has_word or current:
        words.append(current)
    return words


def parse_grub_cfg(text):
    """Return menu entries of a grub.cfg: list of dicts (title, linux, args, initrd)."""
    entries = []
    stack = []   # open blocks: an entry dict or None (submenu / if / function)
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith('#'):
            continue
        words = _grub_words(line)
        if not words:
            continue
        cmd = words[0]
        if cmd == 'menuentry' and line.endswith('{'):
            entry = {'title': words[1] if len(words) > 1 else '', 'linux': None, 'args': '', 'initrd': []}
            entries.append(entry)
            stack.append(entry)
            continue
        if line.endswith('{'):
            stack.append(None)
            continue
        if cmd in ('}', 'fi', 'done') or line == '}':
            if cmd == '}' and stack:
                stack.pop()
            continue
        current = next((block for block in reversed(stack) if block is not None), None)
        if current is None:
            continue
        if cmd in ('linux', 'linuxefi', 'linux16') and len(words) > 1:
            current['linux'] = words[1]
            current['args'] = ' '.join(words[2:])
        elif cmd in ('initrd', 'initrdefi', 'initrd16'):
            current['initrd'] = words[1:]
    return entries


def parse_kernel_cmdline_file(text):
    """Content of /etc/kernel/cmdline: non-comment lines joined by spaces."""
    parts = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith('#'):
            parts.append(line)
    return ' '.join(parts)


def clean_cmdline(cmdline):
    """Tokens of *cmdline* without bootloader artefacts and stiefel options."""
    tokens = []
    for token in cmdline.split():
        if token in _DROP_EXACT or token.startswith(_DROP_PREFIXES):
            continue
        tokens.append(token)
    return tokens


def version_key(version):
    """Sort key for kernel versions ("6.1.0-10-amd64" > "6.1.0-9-amd64")."""
    key = []
    for part in re.split(r'([0-9]+)', version):
        if part.isascii() and part.isdigit():
            key.append((1, int(part), ''))
        elif part:
            key.append((0, 0, part))
    return key


# ---------------------------------------------------------------------------
# Deriving the boot config of an installed system (root may be a chroot)


def _read(path, limit=MAX_SOURCE_FILE_SIZE):
    try:
        with open(path, 'rb') as handle:
            return handle.read(limit).decode('utf-8', 'replace')
    except OSError:
        return None


def _in_root(root, path):
    return os.path.join(root, path.lstrip('/'))


def _real_path(root, path, boot_only=False):
    """Where the in-root *path* is on this host; with *boot_only*, *root* holds only /boot's content
    (a mounted /boot partition) and nothing outside /boot exists."""
    if not boot_only:
        return _in_root(root, path)
    if path == '/boot' or path.startswith('/boot/'):
        return _in_root(root, path[len('/boot'):])
    return None


def _inside(root, full):
    base = os.path.realpath(root)
    real = os.path.realpath(full)
    # rstrip: root '/' must not become '//' (nothing would be inside it)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _resolve_in_root(root, path, hops=20, boot_only=False):
    """Follow symlinks of the absolute in-root *path* inside *root*; return the in-root path or None.

    A file reached through a directory symlink that leads out of *root* is not
    found: the server reads a /boot it must not trust.
    """
    path = os.path.normpath('/' + path.lstrip('/'))
    for _hop in range(hops):
        full = _real_path(root, path, boot_only)
        if full is None:
            return None
        if os.path.islink(full):
            target = os.readlink(full)
            if target.startswith('/'):
                path = os.path.normpath(target)
            else:
                path = os.path.normpath(os.path.join(os.path.dirname(path), target))
            continue
        if os.path.isfile(full) and _inside(root, full):
            return path
        return None
    return None


_INITRD_PATTERNS = ('initrd.img-%s', 'initramfs-%s.img', 'initrd-%s', 'initrd-%s.img', 'initramfs-%s')


def find_kernels(root='/'):
    """Kernels in <root>/boot with a matching initrd, newest first: list of (version, kernel, initrd) in-root paths."""
    found = []
    for full in glob.glob(_in_root(root, '/boot/vmlinuz-*')) + glob.glob(_in_root(root, '/boot/vmlinux-*')):
        name = os.path.basename(full)
        version = name.split('-', 1)[1]
        if 'rescue' in version or name.endswith(('.old', '.bak', '.sig')) or not os.path.isfile(full):
            continue
        for pattern in _INITRD_PATTERNS:
            initrd = '/boot/' + pattern % version
            if os.path.isfile(_in_root(root, initrd)):
                found.append((version, '/boot/' + name, initrd))
                break
    found.sort(key=lambda item: version_key(item[0]), reverse=True)
    return found


_BLS_DIRS = ('/boot/loader/entries', '/efi/loader/entries', '/boot/efi/loader/entries')
_GRUB_CFGS = ('/boot/grub/grub.cfg', '/boot/grub2/grub.cfg')


def find_bls_entries(root='/', boot_only=False):
    """BLS entries as (in-root entries base dir, file, parsed entry), newest first; rescue entries skipped.

    With *boot_only*, *root* is the content of a /boot partition (see :func:`locate_boot_file`).
    """
    result = []
    for entries_dir in _BLS_DIRS:
        base = os.path.dirname(os.path.dirname(entries_dir))
        real_dir = _real_path(root, entries_dir, boot_only)
        if real_dir is None:
            continue
        for full in sorted(glob.glob(os.path.join(glob.escape(real_dir), '*.conf'))):
            text = _read(full)
            if text is None:
                continue
            entry = parse_bls_entry(text)
            if not entry.get('linux') or 'rescue' in os.path.basename(full) or 'rescue' in entry.get('linux', ''):
                continue
            result.append((base, entries_dir + '/' + os.path.basename(full), entry))
    result.sort(key=lambda item: version_key(item[2].get('version') or os.path.basename(item[1])), reverse=True)
    return result


def find_grub_entries(root='/', boot_only=False):
    """``(in-root grub.cfg, its menu entries)`` of the first grub.cfg in /boot, or ``(None, [])``."""
    for grub_cfg in _GRUB_CFGS:
        full = _real_path(root, grub_cfg, boot_only)
        text = _read(full) if full else None
        if text is not None:
            return grub_cfg, parse_grub_cfg(text)
    return None, []


def _locate(root, base, path, boot_only=False):
    """Find a bootloader path (relative to the partition at in-root *base*) in the installed system."""
    if not path or '$' in path:
        return None
    path = '/' + path.lstrip('/')
    if path.startswith('(') or ')' in path:
        path = '/' + path.split(')', 1)[1].lstrip('/')
    for candidate in (os.path.normpath(base + path), os.path.normpath('/boot' + path), os.path.normpath(path)):
        resolved = _resolve_in_root(root, candidate, boot_only=boot_only)
        if resolved:
            return resolved
    return None


def locate_boot_file(boot_dir, base, path):
    """The real path in *boot_dir* (the content of a /boot: a partition's root, or a root's ``boot/``) of a
    path from a BLS entry under in-root *base* or from grub.cfg (base ``/boot``); None when it names no
    file there. Symlinks are followed as the laptop would see them and never lead out of *boot_dir*."""
    located = _locate(boot_dir, base, path, boot_only=True)
    return _real_path(boot_dir, located, boot_only=True) if located else None


def _boot_relative(inroot_path, fstab_entries):
    """In-root path -> path relative to /boot; refuse paths outside /boot or on another filesystem."""
    path = os.path.normpath(inroot_path)
    if not path.startswith('/boot/'):
        raise BootConfigError('%s is not under /boot: this boot layout is not supported '
                              '(the server reads kernel and initrd from /boot)' % path)
    for entry in fstab_entries:
        mnt = entry['file'].rstrip('/')
        if mnt.startswith('/boot/') and (path == mnt or path.startswith(mnt + '/')):
            raise BootConfigError('%s is on %s, a separate filesystem below /boot: this boot layout '
                                  'is not supported' % (path, mnt))
    return path[len('/boot/'):]


def _spec_uuid(spec):
    if spec.startswith('UUID='):
        return spec[5:]
    if spec.startswith('/dev/disk/by-uuid/'):
        return spec[len('/dev/disk/by-uuid/'):]
    return None


def stable_spec(spec, uuid_lookup=None):
    """A device spec that still names the device when the disk appears over NBD."""
    uuid = _spec_uuid(spec)
    if uuid:
        return 'UUID=' + uuid
    if _UNSTABLE_DEV.match(spec):
        uuid = uuid_lookup(spec) if uuid_lookup else None
        if not uuid:
            raise BootConfigError('%s is named by its kernel device name, which changes when the disk '
                                  'is served over NBD, and its UUID is unknown: use UUID= in /etc/fstab '
                                  'or set the value explicitly' % spec)
        return 'UUID=' + uuid
    return spec


def _kernel_version_of(kernel_relpath):
    name = os.path.basename(kernel_relpath)
    for prefix in ('vmlinuz-', 'vmlinux-'):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def derive_boot_config(root='/', proc_cmdline=None, kernel=None, initrd=None, cmdline=None,
                       cmdline_extra=(), root_spec=None, boot_partition=None, luks_boot=None,
                       uuid_lookup=None):
    """Derive the boot config of the system installed at *root*.

    Explicit arguments override what is derived. *kernel* and *initrd* are
    in-root paths (``/boot/vmlinuz-...``); *proc_cmdline* is the running
    kernel's command line (pass it only when *root* is the running system).
    Returns a validated boot config dict; raises BootConfigError with a clear
    message when the layout is not understood.
    """
    sources = {}
    fstab_text = _read(_in_root(root, '/etc/fstab')) or ''
    fstab = parse_fstab(fstab_text)

    # root= and /boot
    if root_spec is None:
        entry = fstab_mount(fstab, '/')
        if entry is None:
            root_spec_found = None
        else:
            root_spec_found = stable_spec(entry['spec'], uuid_lookup)
            sources['root'] = '/etc/fstab'
    else:
        root_spec_found = root_spec
        sources['root'] = 'override'
    if boot_partition is None:
        entry = fstab_mount(fstab, '/boot')
        if entry is not None:
            boot_partition = stable_spec(entry['spec'], uuid_lookup)
            sources['boot_partition'] = '/etc/fstab'
    if luks_boot is None:
        crypttab = parse_crypttab(_read(_in_root(root, '/etc/crypttab')) or '')
        holder = fstab_mount(fstab, '/boot') or fstab_mount(fstab, '/')
        if holder is not None and holder['spec'].startswith('/dev/mapper/'):
            name = holder['spec'][len('/dev/mapper/'):]
            if name in crypttab:
                luks_boot = stable_spec(crypttab[name], uuid_lookup)
                sources['luks_boot'] = '/etc/crypttab'

    # kernel and initrd
    bls = find_bls_entries(root)
    grub_cfg, grub_entries = find_grub_entries(root)
    if grub_cfg:
        sources['grub'] = grub_cfg
    bls_entry = None
    if kernel is None:
        for base, entry_file, entry in bls:
            located = _locate(root, base, entry['linux'])
            if located:
                kernel = located
                bls_entry = (base, entry)
                sources['kernel'] = entry_file
                break
    if kernel is None:
        kernels = find_kernels(root)
        if kernels:
            kernel = kernels[0][1]
            sources['kernel'] = 'newest in /boot'
    else:
        sources.setdefault('kernel', 'override')
    if kernel is None:
        raise BootConfigError('no kernel with an initrd found in %s (looked at BLS entries and '
                              '/boot/vmlinuz-*): set the kernel explicitly' % _in_root(root, '/boot'))
    resolved = _resolve_in_root(root, kernel)
    if resolved is None:
        raise BootConfigError('kernel %s does not exist in %s' % (kernel, root))
    kernel = resolved
    kernel_rel = _boot_relative(kernel, fstab)
    version = _kernel_version_of(kernel_rel)

    grub_entry = None
    for entry in grub_entries:
        if entry['linux'] and os.path.basename(entry['linux']) == os.path.basename(kernel):
            grub_entry = entry
            break

    if initrd is None:
        candidates = []
        if bls_entry is not None and bls_entry[1]['initrd']:
            candidates = [_locate(root, bls_entry[0], p) for p in bls_entry[1]['initrd']]
            sources['initrd'] = sources.get('kernel', 'bls')
        elif grub_entry is not None and grub_entry['initrd']:
            candidates = [_locate(root, '/boot', p) for p in grub_entry['initrd']]
            sources['initrd'] = sources.get('grub', 'grub.cfg')
        if not candidates or None in candidates:
            candidates = []
            if version:
                for pattern in _INITRD_PATTERNS:
                    path = '/boot/' + pattern % version
                    if os.path.isfile(_in_root(root, path)):
                        candidates = [path]
                        sources['initrd'] = 'matching ' + os.path.basename(kernel)
                        break
        if not candidates:
            raise BootConfigError('no initrd found for %s: set the initrd explicitly' % kernel)
        initrd = candidates
    else:
        if isinstance(initrd, str):
            initrd = [initrd]
        sources['initrd'] = 'override'
        checked = []
        for path in initrd:
            found = _resolve_in_root(root, path)
            if found is None:
                raise BootConfigError('initrd %s does not exist in %s' % (path, root))
            checked.append(found)
        initrd = checked
    initrd_rel = [_boot_relative(p, fstab) for p in initrd]

    # command line
    if cmdline is not None:
        sources['cmdline'] = 'override'
    else:
        text = _read(_in_root(root, '/etc/kernel/cmdline'))
        if text is not None and parse_kernel_cmdline_file(text):
            cmdline = parse_kernel_cmdline_file(text)
            sources['cmdline'] = '/etc/kernel/cmdline'
        elif bls_entry is not None and bls_entry[1].get('options') and '$' not in bls_entry[1]['options']:
            cmdline = bls_entry[1]['options']
            sources['cmdline'] = sources['kernel']
        elif grub_entry is not None and grub_entry['args']:
            cmdline = ' '.join(t for t in grub_entry['args'].split() if '$' not in t)
            sources['cmdline'] = sources.get('grub', 'grub.cfg')
        elif proc_cmdline:
            cmdline = proc_cmdline
            sources['cmdline'] = '/proc/cmdline'
        else:
            cmdline = ''
            sources['cmdline'] = 'generated'
    tokens = clean_cmdline(cmdline)

    cmd_root = None
    for token in tokens:
        if token.startswith('root='):
            cmd_root = token[5:]
    if cmd_root and sources.get('cmdline') != 'override':
        if _spec_uuid(cmd_root):
            stable = 'UUID=' + _spec_uuid(cmd_root)
        elif _UNSTABLE_DEV.match(cmd_root):
            stable = root_spec_found or stable_spec(cmd_root, uuid_lookup)
        else:
            stable = cmd_root
        tokens = ['root=' + stable if t == 'root=' + cmd_root else t for t in tokens]
        cmd_root = stable
    if root_spec_found is None:
        root_spec_found = cmd_root
    if not root_spec_found:
        raise BootConfigError('cannot tell the root filesystem: no root= on the kernel command line and '
                              'no "/" in /etc/fstab; set the root explicitly')
    if not cmd_root:
        tokens = ['root=' + root_spec_found] + tokens
        if 'ro' not in tokens and 'rw' not in tokens:
            tokens.insert(1, 'ro')
    for token in cmdline_extra or ():
        for part in str(token).split():
            if part not in tokens:
                tokens.append(part)
    config = {
        'format': BOOT_CONFIG_FORMAT,
        'version': BOOT_CONFIG_VERSION,
        'kernel': kernel_rel,
        'initrd': initrd_rel,
        'cmdline': ' '.join(tokens),
        'kernel_version': version,
        'root': root_spec_found,
        'boot_partition': boot_partition,
        'luks_boot': luks_boot,
        'sources': sources,
    }
    return validate_boot_config(config)


def find_whole_disk(spec, dev_root='/dev', sys_root='/sys'):
    """The whole disk that holds the filesystem *spec* (UUID=... or /dev path) on the running system.

    Follows partitions and device-mapper slaves. Returns a stable path
    (/dev/disk/by-id/... when one exists, else /dev/<disk>) or None.
    """
    uuid = _spec_uuid(spec)
    if uuid:
        dev = os.path.join(dev_root, 'disk/by-uuid', uuid)
    elif spec.startswith('/dev/'):
        dev = os.path.join(dev_root, spec[len('/dev/'):])
    else:
        return None
    if not os.path.exists(dev):
        return None
    name = os.path.basename(os.path.realpath(dev))
    for _level in range(8):
        block = os.path.join(sys_root, 'class/block', name)
        if not os.path.exists(block):
            return None
        slaves = sorted(os.listdir(os.path.join(block, 'slaves'))) if os.path.isdir(os.path.join(block, 'slaves')) else []
        if slaves:
            name = slaves[0]
            continue
        if os.path.exists(os.path.join(block, 'partition')):
            name = os.path.basename(os.path.dirname(os.path.realpath(block)))
            continue
        break
    disk = os.path.join(dev_root, name)
    by_id = os.path.join(dev_root, 'disk/by-id')
    links = []
    if os.path.isdir(by_id):
        for link in sorted(os.listdir(by_id)):
            if os.path.realpath(os.path.join(by_id, link)) == os.path.realpath(disk):
                links.append(link)
    preferred = [l for l in links if not l.startswith(('wwn-', 'nvme-eui.', 'nvme-nvme.'))] or links
    if preferred:
        return '/dev/disk/by-id/' + preferred[0]
    return '/dev/' + name
