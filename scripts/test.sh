#!/usr/bin/env bash
# Sets up and runs Ballast's test suite: Debian packages, a debug build, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/check-syscalls.sh
# The code's layout (.swift-format: 120 columns); `swift format -i -r Sources Tests` fixes it.
swift format lint --strict -r Sources Tests Package.swift Benchmarks/Sources Benchmarks/Package.swift
swift build
# The static release binary (make release), which a test runs without the Swift toolchain visible.
swift build -c release --static-swift-stdlib --scratch-path .build-static --product ballast
swift test
# The proxy-mode integration tests again with the io_uring engine (nat and dsr mode have no
# proxy workers; the static build was checked above).
BALLAST_ENGINE=io_uring swift test --skip-build --filter IntegrationTests \
    --skip 'NatTests|NatPairTests|DSRTests|EcmpTests|StaticBuildTests'
