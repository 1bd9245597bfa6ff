#!/usr/bin/env bash
# Install everything rampool needs, then run its main job: `rampool demo`.
#
#   usage: bash scripts/setup.sh [extra arguments for rampool demo, e.g. --keep]
#
# On a fresh Debian 12 host (as root) this installs the Debian packages and the
# project venv (see scripts/install-deps.sh); run again, it skips straight to the demo.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

bash scripts/install-deps.sh

# The demo and the clients it runs find the venv's python3 (which sees
# Debian's libnbd module) first.
export PATH="$REPO/.venv/bin:$PATH"
echo "setup: running rampool demo $*"
exec rampool demo "$@"
