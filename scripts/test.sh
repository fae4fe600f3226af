#!/usr/bin/env bash
# Installs what the tests need (Debian packages, only where missing) and runs every test suite.
# Usage: scripts/test.sh            # everything
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2")
}
need thin_check thin-provisioning-tools
need qemu-io qemu-utils; need qemu-img qemu-utils   # NBD client tests
need nbdinfo libnbd-bin; need nbdcopy libnbd-bin; need fio fio

if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi

step() { echo; echo "=== $*" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings

step "cargo test --workspace --release"
cargo test --workspace --release

step "scripts/vm-e2e.sh (QEMU guests over vhost-user-blk)"
scripts/vm-e2e.sh
