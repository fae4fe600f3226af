#!/usr/bin/env bash
# End-to-end test of vhost-user-blk with a real VM: QEMU (TCG) boots Debian's kernel and a tiny
# initramfs built here, on volumes served over vhost-user-blk. The guest makes an ext4 file
# system, writes files and their checksums and powers off; the server restarts; the next boot
# checks the file system with e2fsck and the files with their checksums. Then a snapshot is
# taken, the origin is modified in another boot, and both the snapshot (old contents) and the
# origin (new contents) are verified, again across a server restart.
#
# Usage: scripts/vm-e2e.sh [--keep]
#   UTHIN_E2E_BACKEND=auto|uthin|file   who serves the volumes (default auto: `uthin serve` when
#                                       the uthin binary has it, else the file-backed
#                                       examples/vhost-serve, which proves the vhost layer alone)
#   UTHIN_VM_CACHE=DIR                  where QEMU, firmware, kernel and busybox are unpacked
#                                       (default ~/.cache/uthin-vm-e2e; reused between runs)
#   UTHIN_E2E_TIMEOUT=SECONDS           per boot (default 300)
#
# QEMU is NOT installed (installing qemu-system-x86 would remove qemu-utils 10): its packages
# are fetched with `apt-get download`, unpacked with `dpkg -x` into the cache, and only their
# library dependencies are installed with apt-get (refusing any removal). The extracted binary
# runs with -L pointing at the extracted firmware.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${UTHIN_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/uthin-vm-e2e}
BACKEND=${UTHIN_E2E_BACKEND:-auto}
BOOT_TIMEOUT=${UTHIN_E2E_TIMEOUT:-300}
VOLUME_SIZE=1G
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

log() { echo "vm-e2e: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        $SUDO apt-get update -qq || log "apt-get update failed; trying with the lists we have"
        APT_UPDATED=1
    fi
}

# Downloads the named packages' .debs (current candidates) into $CACHE/debs and unpacks them
# into $2.
fetch_and_unpack() { # fetch_and_unpack "pkg..." DEST
    local pkgs=$1 dest=$2 p deb
    mkdir -p "$CACHE/debs" "$dest"
    for p in $pkgs; do
        deb=$(ls "$CACHE/debs/${p}_"*.deb 2>/dev/null | head -1 || true)
        if [ -z "$deb" ]; then
            apt_update_once
            (cd "$CACHE/debs" && apt-get download -q "$p" >/dev/null 2>&1) ||
                (apt_update_once && cd "$CACHE/debs" && apt-get download "$p") ||
                die "cannot download $p"
            deb=$(ls "$CACHE/debs/${p}_"*.deb | head -1)
        fi
        dpkg -x "$deb" "$dest"
    done
}

# Installs the library packages that `pkg` depends on (only those missing), never removing
# anything.
install_library_deps() { # install_library_deps PKG
    local libs missing=() l
    apt-cache show "$1" >/dev/null 2>&1 || apt_update_once
    libs=$(apt-cache depends --no-recommends --no-suggests "$1" |
        awk '/^ *Depends: lib|^ *Depends: zlib/ {print $2}' | tr -d '<>' | sort -u)
    for l in $libs; do
        dpkg -s "$l" >/dev/null 2>&1 || missing+=("$l")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt_update_once
        log "installing QEMU's libraries: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            --no-remove "${missing[@]}" >&2
    fi
}

ensure_qemu() {
    QEMU_ROOT=$CACHE/qemu
    QEMU=$QEMU_ROOT/usr/bin/qemu-system-x86_64
    if [ ! -x "$QEMU" ] || [ ! -f "$QEMU_ROOT/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so" ]; then
        log "unpacking QEMU into $QEMU_ROOT"
        rm -rf "$QEMU_ROOT"
        fetch_and_unpack "qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu" "$QEMU_ROOT"
    fi
    install_library_deps qemu-system-x86
    local f
    for f in "$QEMU" "$QEMU_ROOT"/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so; do
        if ldd "$f" | grep -q "not found"; then
            ldd "$f" | grep "not found" >&2
            die "$f is missing libraries"
        fi
    done
    # Debian builds TCG and devices as loadable modules; load ours, not the host's (qemu-utils
    # 10 has its own in the default directory).
    export QEMU_MODULE_DIR=$QEMU_ROOT/usr/lib/x86_64-linux-gnu/qemu
    # Firmware: SeaBIOS, option ROMs and keymaps, as -L search paths.
    QEMU_FW=(-L "$QEMU_ROOT/usr/share/qemu" -L "$QEMU_ROOT/usr/share/seabios"
        -L "$QEMU_ROOT/usr/lib/ipxe/qemu")
}

ensure_kernel() {
    local pkg
    KERNEL_ROOT=$CACHE/kernel
    if ! ls "$KERNEL_ROOT"/boot/vmlinuz-* >/dev/null 2>&1; then
        apt_update_once
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
        [ -n "$pkg" ] || die "cannot find Debian's kernel package"
        log "unpacking $pkg"
        rm -rf "$KERNEL_ROOT"
        fetch_and_unpack "$pkg" "$KERNEL_ROOT"
    fi
    VMLINUZ=$(ls "$KERNEL_ROOT"/boot/vmlinuz-* | head -1)
    KVER=${VMLINUZ##*/vmlinuz-}
    MODDIR=$KERNEL_ROOT/lib/modules/$KVER
}

ensure_busybox() {
    BUSYBOX=$CACHE/busybox/bin/busybox
    if [ ! -x "$BUSYBOX" ]; then
        rm -rf "$CACHE/busybox"
        fetch_and_unpack busybox-static "$CACHE/busybox"
    fi
    [ -x "$BUSYBOX" ] || die "busybox-static has no bin/busybox"
}

# Prints the module files (relative to $MODDIR) needed for NAMES, dependencies first, skipping
# built-in ones. The kernel package has no modules.dep (depmod runs at install time), so the
# dependencies come from each module's own modinfo "depends=" string.
modules_for() {
    declare -A seen=()
    visit() {
        local name=$1 path deps d
        [ -n "${seen[$name]:-}" ] && return 0
        seen[$name]=1
        path=$(awk -v n="$name" '{ m=$0; sub(/.*\//, "", m); sub(/\.ko.*/, "", m); gsub(/-/, "_", m); if (m == n) {print; exit} }' "$MODDIR/modules.order")
        if [ -z "$path" ]; then
            if awk '{ m=$0; sub(/.*\//, "", m); sub(/\.ko.*/, "", m); gsub(/-/, "_", m); print m }' \
                "$MODDIR/modules.builtin" | grep -qx "$name"; then
                return 0
            fi
            die "kernel module $name not found"
        fi
        [ -f "$MODDIR/$path" ] || die "kernel module file $path missing"
        deps=$(grep -a -o 'depends=[a-zA-Z0-9_,-]*' "$MODDIR/$path" | head -1 | cut -d= -f2 | tr ',' ' ')
        for d in $deps; do visit "${d//-/_}"; done
        echo "$path"
    }
    local name
    for name in "$@"; do visit "$name"; done
}

# Copies a host binary and the shared libraries it needs into the initramfs tree.
copy_with_libs() { # copy_with_libs BINARY DESTROOT
    local bin=$1 root=$2 lib
    install -D "$bin" "$root/usr/sbin/$(basename "$bin")"
    for lib in $(ldd "$bin" | awk '/=>/ {print $3} /^[ \t]*\// {print $1}'); do
        [ -f "$lib" ] && install -D "$lib" "$root$lib"
    done
}

build_initramfs() {
    local tree=$WORK/initramfs m
    INITRD=$WORK/initrd.cpio.gz
    rm -rf "$tree"
    mkdir -p "$tree"/{bin,dev,proc,sys,mnt,lib/modules,tmp}
    cp "$BUSYBOX" "$tree/bin/busybox"
    copy_with_libs "$(command -v mke2fs)" "$tree"
    copy_with_libs "$(command -v e2fsck)" "$tree"
    : >"$tree/modules.order"
    local mods
    mods=$(modules_for crc32c_generic virtio_pci virtio_blk ext4) || die "kernel modules"
    for m in $mods; do
        mkdir -p "$tree/lib/modules/$(dirname "$m")"
        case "$m" in
        *.ko.xz) xz -dc "$MODDIR/$m" >"$tree/lib/modules/${m%.xz}"; m=${m%.xz} ;;
        *.ko.zst) zstd -qdc "$MODDIR/$m" >"$tree/lib/modules/${m%.zst}"; m=${m%.zst} ;;
        *) cp "$MODDIR/$m" "$tree/lib/modules/$m" ;;
        esac
        echo "$m" >>"$tree/modules.order"
    done
    cat >"$tree/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m 2>/dev/null; done
phase=$(sed -n 's/.*uthin\.phase=\([a-z]*\).*/\1/p' /proc/cmdline)
result() { echo "UTHIN-E2E-RESULT $*"; sync; poweroff -f; }
# e2fsprogs from the host, by full path: busybox's shell prefers its own (older) applets.
MKFS=/usr/sbin/mke2fs
FSCK=/usr/sbin/e2fsck
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 100 ] && result fail "no /dev/vda"
    sleep 0.1
done
echo "UTHIN-E2E-SERIAL $(cat /sys/block/vda/serial 2>/dev/null)"
sums() { (cd /mnt && find . -type f ! -name SUMS | sort | xargs sha256sum) | sed 's/^/UTHIN-E2E-SUM /'; }
case "$phase" in
create)
    $MKFS -t ext4 -q -F /dev/vda || result fail "mkfs.ext4"
    mount -t ext4 /dev/vda /mnt || result fail "mount after mkfs"
    dd if=/dev/urandom of=/mnt/big bs=1M count=24 2>/dev/null || result fail "write big"
    mkdir -p /mnt/small
    for n in $(seq 1 60); do
        dd if=/dev/urandom of=/mnt/small/f$n bs=1k count=$((n % 13 + 1)) 2>/dev/null || result fail "write f$n"
    done
    dd if=/dev/urandom of=/mnt/doomed bs=64k count=8 2>/dev/null
    (cd /mnt && find . -type f ! -name SUMS | sort | xargs sha256sum >SUMS)
    sums
    umount /mnt || result fail "umount"
    $FSCK -fn /dev/vda >/tmp/fsck 2>&1 || { cat /tmp/fsck; result fail "e2fsck after create"; }
    result ok
    ;;
modify)
    mount -t ext4 /dev/vda /mnt || result fail "mount"
    # The host restarts the server while these synchronous writes run (QEMU reconnects).
    echo "UTHIN-E2E-WRITING"
    for n in $(seq 1 16); do
        dd if=/dev/urandom of=/mnt/churn$n bs=256k count=4 conv=fsync 2>/dev/null || result fail "write churn$n"
    done
    dd if=/dev/urandom of=/mnt/big bs=1M count=4 seek=10 conv=notrunc 2>/dev/null || result fail "overwrite big"
    dd if=/dev/urandom of=/mnt/small/f7 bs=1k count=3 2>/dev/null
    rm -f /mnt/doomed
    dd if=/dev/urandom of=/mnt/new bs=1M count=3 2>/dev/null || result fail "write new"
    fstrim /mnt 2>/dev/null
    (cd /mnt && find . -type f ! -name SUMS | sort | xargs sha256sum >SUMS)
    sums
    umount /mnt || result fail "umount"
    $FSCK -fn /dev/vda >/tmp/fsck 2>&1 || { cat /tmp/fsck; result fail "e2fsck after modify"; }
    result ok
    ;;
verify)
    $FSCK -fn /dev/vda >/tmp/fsck 2>&1 || { cat /tmp/fsck; result fail "e2fsck"; }
    mount -t ext4 -o ro /dev/vda /mnt || result fail "mount"
    (cd /mnt && sha256sum -c -s SUMS) || result fail "checksums differ"
    sums
    umount /mnt
    result ok
    ;;
*) result fail "unknown phase '$phase'" ;;
esac
INIT
    chmod +x "$tree/init"
    (cd "$tree" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1 >"$INITRD")
}

# --- who serves the volumes -----------------------------------------------------------------
# Each backend defines: backend_setup (create vol0), backend_start (serve every volume in
# $VOLUMES on $WORK/NAME.sock), backend_stop, backend_snapshot ORIGIN NAME.
VOLUMES="vol0"
SERVER_PID=""

wait_for_sockets() {
    local v i
    for v in $VOLUMES; do
        i=0
        while [ ! -S "$WORK/$v.sock" ]; do
            i=$((i + 1))
            [ $i -gt 300 ] && die "server did not create $WORK/$v.sock"
            kill -0 "$SERVER_PID" 2>/dev/null || die "server exited (see $WORK/server.log)"
            sleep 0.1
        done
    done
}

backend_stop() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || log "server exit status $? (see $WORK/server.log)"
        SERVER_PID=""
    fi
}

UTHIN=$ROOT/target/release/uthin
uthin_setup() {
    "$UTHIN" --pool "$WORK/pool" pool create --data-size 4G
    "$UTHIN" --pool "$WORK/pool" create vol0 --size "$VOLUME_SIZE"
}
UTHIN_STARTS=0
uthin_start() {
    local args=() v cache=writeback
    for v in $VOLUMES; do args+=(--vhost-user "$v=$WORK/$v.sock"); done
    rm -f "$WORK"/*.sock
    # Every other start serves with --cache direct (O_DIRECT): each mode reads what the other
    # wrote.
    UTHIN_STARTS=$((UTHIN_STARTS + 1))
    [ $((UTHIN_STARTS % 2)) -eq 1 ] || cache=direct
    log "uthin serve --cache $cache"
    # NBD on a Unix socket of our own: the default TCP port may be taken on a shared machine.
    "$UTHIN" --pool "$WORK/pool" serve --nbd "unix:$WORK/nbd.sock" --num-queues 2 \
        --cache "$cache" "${args[@]}" >>"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    wait_for_sockets
}
uthin_snapshot() { "$UTHIN" --pool "$WORK/pool" snapshot "$1" "$2"; }

SERVE_EXAMPLE=$ROOT/target/release/examples/vhost-serve
file_setup() { truncate -s "$VOLUME_SIZE" "$WORK/vol0.img"; }
file_start() {
    local args=() v
    for v in $VOLUMES; do args+=(--socket "$WORK/$v.sock" --file "$WORK/$v.img"); done
    rm -f "$WORK"/*.sock
    "$SERVE_EXAMPLE" --queues 2 "${args[@]}" >>"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    wait_for_sockets
}
# The guest has flushed and powered off, so the image is consistent: a sparse copy is the
# file backend's snapshot.
file_snapshot() { cp --sparse=always "$WORK/$1.img" "$WORK/$2.img"; }

choose_backend() {
    if [ "$BACKEND" = auto ]; then
        if [ -x "$UTHIN" ] && "$UTHIN" serve --help >/dev/null 2>&1; then
            BACKEND=uthin
        else
            BACKEND=file
        fi
    fi
    case "$BACKEND" in
    uthin) [ -x "$UTHIN" ] || die "build uthin first (cargo build --release)" ;;
    file)
        (cd "$ROOT" && cargo build --release -q --example vhost-serve) || die "cannot build vhost-serve"
        ;;
    *) die "UTHIN_E2E_BACKEND must be auto, uthin or file" ;;
    esac
    log "volumes served by: $BACKEND"
}
backend_setup() { "${BACKEND}_setup"; }
backend_start() { "${BACKEND}_start"; }
backend_snapshot() { "${BACKEND}_snapshot" "$@"; VOLUMES="$VOLUMES $2"; }

# --- one boot ---------------------------------------------------------------------------------
# boot PHASE VOLUME [EXPECTED_SUMS_FILE]: boots, checks the result marker, writes the guest's
# file checksums to $WORK/sums.VOLUME.PHASE.N and, if given, compares them with the expected.
BOOTS=0
# With RESTART_DURING_BOOT=1 the server is restarted while the guest writes (after it prints
# UTHIN-E2E-WRITING): QEMU's reconnect=1 brings the disk back and the guest must not notice.
RESTART_DURING_BOOT=0
boot() {
    local phase=$1 vol=$2 expect=${3:-} console sums start qemu_pid i connects
    BOOTS=$((BOOTS + 1))
    console=$WORK/console.$BOOTS.$phase.$vol.log
    sums=$WORK/sums.$BOOTS.$vol
    start=$(date +%s)
    : >"$console"
    timeout "$BOOT_TIMEOUT" "$QEMU" "${QEMU_FW[@]}" -accel tcg -m 512M -smp 2 \
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine pc,memory-backend=mem \
        -nodefaults -display none -no-reboot -serial "file:$console" \
        -kernel "$VMLINUZ" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 quiet uthin.phase=$phase" \
        -chardev "socket,id=vu0,path=$WORK/$vol.sock,reconnect=1" \
        -device vhost-user-blk-pci,chardev=vu0,num-queues=2 \
        >"$WORK/qemu.$BOOTS.log" 2>&1 &
    qemu_pid=$!
    if [ "$RESTART_DURING_BOOT" = 1 ]; then
        i=0
        until grep -q "^UTHIN-E2E-WRITING" "$console" 2>/dev/null; do
            i=$((i + 1))
            { [ $i -gt $((BOOT_TIMEOUT * 10)) ] || ! kill -0 $qemu_pid 2>/dev/null; } && break
            sleep 0.1
        done
        grep -q "^UTHIN-E2E-WRITING" "$console" || die "boot $BOOTS: the guest never started writing"
        connects=$(grep -c "front-end connected" "$WORK/server.log" || true)
        log "boot $BOOTS: restarting the server while the guest writes"
        backend_stop
        backend_start
    fi
    wait $qemu_pid || {
        cat "$WORK/qemu.$BOOTS.log" >&2
        tail -30 "$console" >&2 || true
        die "boot $BOOTS ($phase $vol): QEMU failed or timed out"
    }
    if [ "$RESTART_DURING_BOOT" = 1 ]; then
        # The log says whether QEMU came back (servers that log connections, as uthin's do).
        if [ "$connects" -gt 0 ] &&
            [ "$(grep -c "front-end connected" "$WORK/server.log")" -le "$connects" ]; then
            die "boot $BOOTS: QEMU did not reconnect after the server restart"
        fi
    fi
    if ! grep -q "^UTHIN-E2E-RESULT ok" "$console"; then
        tail -40 "$console" >&2
        die "boot $BOOTS ($phase $vol): $(grep -a '^UTHIN-E2E-RESULT' "$console" || echo 'no result')"
    fi
    grep -a "^UTHIN-E2E-SERIAL $vol" "$console" >/dev/null || die "guest did not see serial $vol"
    grep -a '^UTHIN-E2E-SUM ' "$console" | tr -d '\r' | sort -k3 >"$sums"
    [ -s "$sums" ] || die "boot $BOOTS ($phase $vol): no checksums"
    if [ -n "$expect" ] && ! cmp -s "$expect" "$sums"; then
        diff "$expect" "$sums" >&2 || true
        die "boot $BOOTS ($phase $vol): files differ from what was written"
    fi
    log "boot $BOOTS: $phase $vol ok ($(wc -l <"$sums") files, $(($(date +%s) - start)) s)"
    LAST_SUMS=$sums
}

cleanup() {
    backend_stop
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}

main() {
    mkdir -p "$CACHE"
    ensure_qemu
    ensure_kernel
    ensure_busybox
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/uthin-vm-e2e.XXXXXX")
    trap cleanup EXIT
    choose_backend
    build_initramfs
    local t0 sums_a sums_b
    t0=$(date +%s)

    backend_setup
    backend_start
    boot create vol0
    sums_a=$LAST_SUMS
    backend_stop
    backend_start # the data must survive a server restart
    boot verify vol0 "$sums_a"

    backend_snapshot vol0 snap0
    backend_stop
    backend_start
    RESTART_DURING_BOOT=1 boot modify vol0
    sums_b=$LAST_SUMS
    cmp -s "$sums_a" "$sums_b" && die "modify changed nothing"
    boot verify snap0 "$sums_a" # the snapshot keeps the old contents
    backend_stop
    backend_start
    boot verify vol0 "$sums_b"
    boot verify snap0 "$sums_a"
    backend_stop
    log "PASS: $BOOTS boots in $(($(date +%s) - t0)) s (backend $BACKEND)"
}

main "$@"
