#!/usr/bin/env bash
# Checks that the library builds, with every feature, against the lowest
# versions its Cargo.toml allows of its direct dependencies: a user whose
# lock file already holds an older release that the requirement admits gets
# that release. Works on a copy, so the project's Cargo.lock is untouched.
# Needs a nightly toolchain for `-Z direct-minimal-versions`.
set -euo pipefail
cd "$(dirname "$0")/.."

copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$copy"
cd "$copy"
cargo +nightly update -Z direct-minimal-versions
CARGO_TARGET_DIR="$copy/target" cargo check --locked --lib --all-features
