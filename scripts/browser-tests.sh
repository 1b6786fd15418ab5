#!/usr/bin/env bash
# Clicks through the playground in Debian's headless Chromium, driven by
# Playwright (tests/browser), against the real server binary. Set
# PLAYGROUND_SCREENSHOT=docs/playground.png to retake the README's
# screenshot (taken mid-SyncUsers, at 1280x800).
# scripts/install-test-tools.sh installs chromium and playwright.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
cargo build --locked --bin user-service
# pytest exits 5 when it collects no test: that fails this stage too.
"$python" -m pytest -q -p no:cacheprovider tests/browser
