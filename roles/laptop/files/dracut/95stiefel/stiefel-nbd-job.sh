#!/bin/sh
# stiefel: the initqueue job. A failed attach stops the boot at once with its
# reason (dracut's die: emergency shell with rd.shell, else halt) instead of
# dracut waiting rd.retry for a root device that cannot appear.
type die > /dev/null 2>&1 || . /lib/dracut-lib.sh
/sbin/stiefel-nbd-attach || die "stiefel: could not attach the laptop disk over NBD (see the stiefel-nbd messages above)"
