#!/usr/bin/env bash
# Sets up and runs Ballast's test suite: Debian packages, a debug build, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/check-syscalls.sh
swift build
# The static release binary (make release), which a test runs without the Swift toolchain visible.
swift build -c release --static-swift-stdlib --scratch-path .build-static --product ballast
swift test
