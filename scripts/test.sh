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
need mkfs.xfs xfsprogs   # copy-on-write by shared extents (xfs_tests below)

if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi

step() { echo; echo "=== $*" >&2; }

# The tests of copy-on-write by shared extents, again with their files on XFS (reflink), where
# a copy on write clones the old block (FICLONERANGE) instead of copying it: the data file's
# clone tests (which must then clone) and the volume proptest against its model. Needs root,
# XFS in the kernel, mkfs.xfs and a loop device; says so and skips otherwise.
XFS_MNT=$PWD/target/xfs-test
XFS_IMG=$PWD/target/xfs-test.img
xfs_cleanup() {
    if mountpoint -q "$XFS_MNT" 2>/dev/null; then umount "$XFS_MNT" || true; fi
    rm -f "$XFS_IMG"
}
xfs_tests() {
    if [ "$(id -u)" -ne 0 ] || ! command -v mkfs.xfs >/dev/null || ! grep -qw xfs /proc/filesystems; then
        echo "test.sh: XFS tests SKIPPED (they need root, mkfs.xfs and XFS in the kernel)" >&2
        return 0
    fi
    xfs_cleanup
    mkdir -p "$XFS_MNT"
    truncate -s 3G "$XFS_IMG"
    mkfs.xfs -q -m reflink=1 "$XFS_IMG"
    if ! mount -o loop "$XFS_IMG" "$XFS_MNT"; then
        echo "test.sh: XFS tests SKIPPED (no loop device to mount $XFS_IMG)" >&2
        xfs_cleanup
        return 0
    fi
    trap xfs_cleanup EXIT
    UTHIN_TEST_DIR=$XFS_MNT UTHIN_TEST_EXPECT_CLONES=1 cargo test --release --lib -- clone
    UTHIN_TEST_DIR=$XFS_MNT cargo test --release --test volume_model
    xfs_cleanup
    trap - EXIT
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings

step "cargo test --workspace --release"
cargo test --workspace --release

step "copy-on-write by shared extents: tests on XFS (loop device)"
xfs_tests

step "scripts/vm-e2e.sh (QEMU guests over vhost-user-blk)"
scripts/vm-e2e.sh
