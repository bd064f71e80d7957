# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``python3 -m stiefel_runtime AGENT [ARGS]``: run one agent (server, client, autokexec)."""

import importlib
import sys

AGENTS = ("autokexec", "client", "server")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in AGENTS:
        sys.stderr.write("usage: python3 -m stiefel_runtime {%s} [ARGS]\n" % ",".join(AGENTS))
        return 2
    try:
        # By name, so a target that was given one agent (the laptop: autokexec) needs only its modules.
        agent = importlib.import_module("stiefel_runtime." + argv[0])
    except ImportError as exc:
        sys.stderr.write("stiefel: the %s agent is not installed here (%s)\n" % (argv[0], exc))
        return 2
    return agent.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
