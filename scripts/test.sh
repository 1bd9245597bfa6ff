#!/usr/bin/env bash
# Install everything rampool needs, then run every check CI runs, in this order:
# ruff check, ruff format --check, mypy, and the whole pytest suite with coverage of
# memserver/. Stops at the first failure with a non-zero exit.
#
#   usage: bash scripts/test.sh [extra pytest arguments, e.g. -k wire -x]
#
# The pytest run fails when it collects no tests, and also when any test is
# skipped or xfailed: a test that cannot run because a tool is missing is a
# failure here, not a pass.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
JUNIT=build/test-results/pytest.xml

bash scripts/install-deps.sh

export PATH="$REPO/.venv/bin:$PATH:/usr/sbin:/sbin"

step() { printf '\n== %s\n' "$*"; }

step "ruff check ."
ruff check .
step "ruff format --check ."
ruff format --check .
step "mypy memserver nbdplugin ctl"
mypy memserver nbdplugin ctl

step "pytest"
mkdir -p "$(dirname "$JUNIT")"
rm -f "$JUNIT"
status=0
pytest --cov=memserver --cov=ctl --cov-report=term-missing:skip-covered \
    --junitxml="$JUNIT" "$@" || status=$?

if [[ $status -eq 5 ]]; then
    echo "test: FAILED: pytest collected no tests" >&2
    exit 5
fi
if [[ $status -ne 0 ]]; then
    echo "test: FAILED: pytest exited with status $status" >&2
    exit "$status"
fi

# pytest's own exit status is 0 with skipped and xfailed tests; read the JUnit
# report, which records both as <skipped>, and fail on any.
python - "$JUNIT" <<'PY'
import sys
import xml.etree.ElementTree as ET

report = sys.argv[1]
try:
    root = ET.parse(report).getroot()
except (OSError, ET.ParseError) as exc:
    sys.exit(f"test: FAILED: cannot read pytest's JUnit report {report}: {exc}")

skipped = []
total = 0
for case in root.iter("testcase"):
    total += 1
    for mark in case.findall("skipped"):
        name = "::".join(filter(None, [case.get("classname"), case.get("name")]))
        kind = "xfailed" if mark.get("type") == "pytest.xfail" else "skipped"
        skipped.append(f"  {kind}: {name}: {mark.get('message', '')}")

if total == 0:
    sys.exit(f"test: FAILED: {report} lists no tests")
if skipped:
    print(f"test: FAILED: {len(skipped)} test(s) did not run:", file=sys.stderr)
    print("\n".join(skipped), file=sys.stderr)
    sys.exit(1)
print(f"test: OK: {total} tests ran, none skipped")
PY

# The NBD state machine is tested in memory to full branch coverage; a branch
# that no test reaches fails the run.
step "coverage of the NBD state machine"
coverage report --include='memserver/nbd/server.py' --show-missing --fail-under=100
