#!/usr/bin/env bash
# Sets up and runs Ballast's test suite: Debian packages, a debug build, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
swift build
swift test
