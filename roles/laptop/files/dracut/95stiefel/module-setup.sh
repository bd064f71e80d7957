#!/bin/bash
# stiefel dracut module: attach the laptop disk over NBD when the kernel
# command line has stiefel.mac= (installed by the stiefel.system.laptop role).

check() {
    require_binaries nbd-client ip nbdkit bash || return 1
    return 0
}

depends() {
    echo udev-rules
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

# dracut sets $moddir (this module's directory) before it calls install():
# shellcheck disable=SC2154
install() {
    inst_multiple nbd-client ip cat sleep bash nbdkit tr
    # NBD over TLS-PSK: the local TLS proxy is nbdkit's nbd plugin (libnbd,
    # GnuTLS: libraries are resolved by dracut-install); the PSK is appended
    # by the client as an extra cpio, it is not part of this image.
    inst_libdir_file "nbdkit/plugins/nbdkit-nbd-plugin.so"
    inst_multiple -o blockdev udevadm modprobe timeout
    inst_simple "$moddir/stiefel-nbd-attach" /sbin/stiefel-nbd-attach
    inst_hook cmdline 90 "$moddir/stiefel-cmdline.sh"
}
