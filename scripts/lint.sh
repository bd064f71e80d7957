#!/usr/bin/env bash
# ansible-lint, production profile, over the whole collection: playbooks,
# roles, molecule scenarios, meta/, galaxy.yml (configuration: .ansible-lint,
# which excludes .cache/, .venv/, collections/, tests/output/).
#
#   bash scripts/lint.sh            # the whole collection
#   bash scripts/lint.sh roles/usb_stick playbooks/flash_usb.yml
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ ! -x .venv/bin/ansible-lint ]; then
    echo "lint: .venv/bin/ansible-lint missing; run: bash scripts/bootstrap.sh" >&2
    exit 1
fi
# ansible-lint runs ansible-playbook/ansible-galaxy: use the venv's.
export PATH="$here/.venv/bin:$PATH"
# Keep ansible-lint's own caches inside the checkout's ignored cache dir.
export XDG_CACHE_HOME="${STIEFEL_CACHE_DIR:-$here/.cache}/lint/xdg-cache"
mkdir -p "$XDG_CACHE_HOME"

printf '[lint] ansible-lint --profile production %s\n' "${*:-(whole collection)}"
exec ansible-lint --profile production --nocolor "$@"
