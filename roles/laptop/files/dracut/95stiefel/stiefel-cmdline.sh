#!/bin/sh
# stiefel: queue the NBD attach once udev has settled (the NIC is then known).
# Does nothing without stiefel.mac= on the kernel command line.
if getarg stiefel.mac= > /dev/null; then
    info "stiefel: will attach the laptop disk over NBD"
    /sbin/initqueue --settled --onetime --unique --name stiefel-nbd /sbin/stiefel-nbd-job
fi
