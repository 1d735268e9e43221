#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report test opens the page in a real headless browser: install Debian's chromium where it is
# missing, and require it, so a machine without one fails that test instead of skipping it unseen.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for tests/test_report.py"
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root=sudo
  $as_root apt-get update -qq
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
export INNERLOOP_REQUIRE_BROWSER=1
exec .venv/bin/python -m pytest -q "$@"
