#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need
# from the distribution's packages when it is missing, then runs every test
# with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Redis tests start their own redis-server on a free 127.0.0.1 port.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        echo "redis-server is missing and neither root nor sudo is available to install it" >&2
        exit 1
    fi
    "${as_root[@]}" apt-get update
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
fi

# The store's TTL commands (GETEX) need Redis 6.2 or later.
version=$(redis-server --version | sed -n 's/.*v=\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r major minor <<<"${version:-0 0}"
if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 2 ]; }; then
    echo "redis-server $(redis-server --version | cut -d' ' -f3) is too old: the tests need Redis 6.2 or later" >&2
    exit 1
fi

cargo test --all-features --all-targets
cargo test --all-features --doc
