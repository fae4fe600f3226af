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
need mkfs.xfs xfsprogs   # copy-on-write by shared extents (clone_fs_tests below)
need mkfs.btrfs btrfs-progs

if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi

step() { echo; echo "=== $*" >&2; }

# The tests of copy-on-write by shared extents, again with their files on a file system that
# shares extents (XFS with reflink, btrfs), where a copy on write clones the old block
# (FICLONERANGE) instead of copying it: the data file's clone tests (which must then clone)
# and the volume proptest against its model. Needs root, the file system in the kernel, its
# mkfs and a loop device; says so and skips otherwise.
# Usage: clone_fs_tests FS MKFS [MKFS_ARGS...]   (the image path is added after MKFS_ARGS)
CLONE_MNT=""
CLONE_IMG=""
clone_fs_cleanup() {
    if [ -n "$CLONE_MNT" ] && mountpoint -q "$CLONE_MNT" 2>/dev/null; then
        umount "$CLONE_MNT" || true
    fi
    [ -z "$CLONE_IMG" ] || rm -f "$CLONE_IMG"
}
clone_fs_tests() {
    local fs=$1 mkfs=$2
    shift 2
    if [ "$(id -u)" -ne 0 ] || ! command -v "$mkfs" >/dev/null || ! grep -qw "$fs" /proc/filesystems; then
        echo "test.sh: $fs tests SKIPPED (they need root, $mkfs and $fs in the kernel)" >&2
        return 0
    fi
    CLONE_MNT=$PWD/target/$fs-test
    CLONE_IMG=$PWD/target/$fs-test.img
    clone_fs_cleanup
    mkdir -p "$CLONE_MNT"
    truncate -s 3G "$CLONE_IMG"
    "$mkfs" "$@" "$CLONE_IMG" >/dev/null
    if ! mount -o loop "$CLONE_IMG" "$CLONE_MNT"; then
        echo "test.sh: $fs tests SKIPPED (no loop device to mount $CLONE_IMG)" >&2
        clone_fs_cleanup
        return 0
    fi
    trap clone_fs_cleanup EXIT
    UTHIN_TEST_DIR=$CLONE_MNT UTHIN_TEST_EXPECT_CLONES=1 cargo test --release --lib -- clone
    UTHIN_TEST_DIR=$CLONE_MNT cargo test --release --test volume_model
    clone_fs_cleanup
    trap - EXIT
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings

step "cargo test --workspace --release"
cargo test --workspace --release

step "copy-on-write by shared extents: tests on XFS (loop device)"
clone_fs_tests xfs mkfs.xfs -q -m reflink=1

step "copy-on-write by shared extents: tests on btrfs (loop device)"
clone_fs_tests btrfs mkfs.btrfs -q

step "scripts/vm-e2e.sh (QEMU guests over vhost-user-blk)"
scripts/vm-e2e.sh
