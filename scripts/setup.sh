#!/usr/bin/env bash
# Install everything rampool needs, then run its main job: `rampool demo`.
#
#   usage: bash scripts/setup.sh [extra arguments for rampool demo]
#
# On a fresh Debian 12 host (as root) this installs the Debian packages and the
# project venv (see scripts/install-deps.sh); run again, it skips straight to the demo.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

bash scripts/install-deps.sh

# pip generates .venv/bin/rampool from setup.cfg even before ctl/cli.py has a
# `demo` command, so ask the CLI itself whether the command exists.
demo=(.venv/bin/rampool demo "$@")
if .venv/bin/rampool demo --help >/dev/null 2>&1; then
    echo "setup: running ${demo[*]}"
    exec "${demo[@]}"
fi
echo "setup: installed. 'rampool demo' is not available yet; once it is, this" \
    "script runs: ${demo[*]}"
