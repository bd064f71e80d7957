#!/bin/bash
# stiefel dracut module: attach the laptop disk over NBD when the kernel
# command line has stiefel.mac= (installed by the stiefel.system.laptop role).

check() {
    require_binaries nbd-client ip || return 1
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
    hostonly='' instmods =drivers/net
}

install() {
    inst_multiple nbd-client ip cat sleep
    inst_multiple -o blockdev udevadm modprobe
    inst_simple "$moddir/stiefel-nbd-attach" /sbin/stiefel-nbd-attach
    inst_hook cmdline 90 "$moddir/stiefel-cmdline.sh"
}
