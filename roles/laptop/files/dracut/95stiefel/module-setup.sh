#!/bin/bash
# stiefel dracut module: attach the laptop disk over NBD when the kernel
# command line has stiefel.mac= (installed by the stiefel.system.laptop role).
#
# Self-contained on purpose: the hook brings up its own link-local link and
# runs nbd-client itself, so it needs neither dracut's "network" module (in
# Debian's separate dracut-network package, and its DHCP/NetworkManager
# handlers would fight over the NIC) nor "nbd" (its nbdroot= parser wants a
# server address at build time). It works in hostonly and generic images,
# with the classic and the systemd-based initrd, with or without crypt.
#
# dracut sets $moddir (this module's directory) and $dracutsysrootdir before
# it calls these functions:
# shellcheck disable=SC2154

check() {
    require_binaries nbd-client ip nbdkit bash socat setsid || return 1
    return 0
}

# udev-rules: coldplug loads the NIC driver and publishes /dev/nbd0pN by UUID;
# rootfs-block: root=UUID=... on the attached disk is waited for and mounted.
depends() {
    echo udev-rules rootfs-block
    return 0
}

installkernel() {
    # The desktop's NIC is unknown when this image is built: all network
    # drivers, even in hostonly mode.
    hostonly='' instmods nbd
    # "=drivers/net" is dracut's syntax for a whole kernel module directory,
    # not an assignment:
    # shellcheck disable=SC2283
    hostonly='' instmods =drivers/net
}

# Install ELF files that are not executables (nbdkit plugins are 0644 in
# Debian) with every library they load: dracut-install -l resolves libraries
# only for files it installs as executables, so the nbd plugin came without
# libnbd.so.0 and failed to load at boot. ldd lists the whole closure.
stiefel_inst_elf_with_libs() {
    local _file _lib _ldd
    for _file in "$@"; do
        inst_simple "$_file" || { derror "stiefel: cannot install $_file"; return 1; }
        _ldd=$(ldd "$dracutsysrootdir$_file" 2>&1) || { derror "stiefel: ldd $_file: $_ldd"; return 1; }
        if [[ $_ldd == *"not found"* ]]; then
            derror "stiefel: $_file needs libraries this system lacks: $_ldd"
            return 1
        fi
        while read -r _lib; do
            inst_library "${_lib#"$dracutsysrootdir"}" || { derror "stiefel: cannot install $_lib"; return 1; }
        done < <(sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p' <<< "$_ldd")
    done
}

install() {
    local _plugin _kind _name
    inst_multiple nbd-client ip cat sleep bash nbdkit tr kill socat setsid mount mkdir grep || return 1
    # NBD over TLS-PSK: the local TLS proxy is nbdkit's nbd plugin (libnbd,
    # GnuTLS) with its retry filter (reopens a connection a cable cut or a
    # server restart broke), socat its TCP relay. The PSK is appended by the
    # client as an extra cpio, it is not part of this image.
    for _kind in plugins/nbdkit-nbd-plugin filters/nbdkit-retry-filter; do
        _name=${_kind#*/}
        for _plugin in "$dracutsysrootdir"/usr/lib/*/nbdkit/"$_kind".so \
            "$dracutsysrootdir"/usr/lib*/nbdkit/"$_kind".so; do
            [[ -e $_plugin ]] || continue
            stiefel_inst_elf_with_libs "${_plugin#"$dracutsysrootdir"}" || return 1
            break
        done
        [[ -e $_plugin ]] || { derror "stiefel: nbdkit's ${_name#nbdkit-} (the TLS proxy) is not installed"; return 1; }
    done
    inst_multiple -o blockdev udevadm modprobe timeout
    inst_simple "$moddir/stiefel-nbd-attach" /sbin/stiefel-nbd-attach
    inst_simple "$moddir/stiefel-nbd-job.sh" /sbin/stiefel-nbd-job
    inst_hook cmdline 90 "$moddir/stiefel-cmdline.sh"
    # the systemd-based initrd starts dracut-initqueue.service only when a
    # module asks for it; without another network module nobody else does
    dracut_need_initqueue
}
