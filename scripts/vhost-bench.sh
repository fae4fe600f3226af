#!/usr/bin/env bash
# vhost-user-blk benchmark: the same libblkio client (examples/vhost-bench.rs, one queue, QD32
# unless --qd) against uthin and qemu-storage-daemon, interleaved and repeated, printing medians
# and ratios.
#
# Usage: scripts/vhost-bench.sh [--rounds 3] [--seconds 5] [--size 1G] [--qd 32] [--peers "a b c"]
#                               [--only randwrite-fresh,randread,...]
#
# --qd is the client's queue depth (issue 7's figure is at 32; docs/vhost.md has a sweep);
# --only runs a subset of the phases (randwrite-fresh, randwrite-over, randread, seqwrite-1m,
# seqread-1m; the overwrite and read phases use the blocks the fresh phase wrote, so without
# it they address every block and provision as they go).
#
# Each write phase ends with a timed FLUSH (so that no phase pays for the writeback of the one
# before it); its "-durable" row is the phase's rate with that flush's time included.
#
# Peers (each round starts every peer on fresh, empty storage, one after the other, the order
# turned by one peer each round):
#   uthin      `uthin serve --vhost-user` on a new pool in $BENCH_DIR (when the uthin binary
#              has `serve`), data through the page cache (`--cache writeback`, the default)
#   uthin-direct the same with `serve --cache direct` (O_DIRECT through io_uring): the
#              like-for-like peer of qsd-disk, the figure issue 7 asks for
#   vhost-null examples/vhost-serve on a device that does nothing: the vhost layer's own cost
#   qsd-null   qemu-storage-daemon on its null-co driver: the same for QEMU's vhost layer
#   vhost-mem  examples/vhost-serve on a MemDevice (sparse memory, copies through a buffer)
#   qsd-disk   qemu-storage-daemon, raw file in $BENCH_DIR, aio=io_uring, cache.direct=on
#              (issue 7's reference)
#   qsd-buffered qemu-storage-daemon, raw file in $BENCH_DIR, aio=io_uring, cache.direct=off:
#              through the page cache, the like-for-like peer of uthin's default mode
#   qsd-shm    qemu-storage-daemon, raw file in /dev/shm, aio=io_uring (tmpfs has no
#              O_DIRECT): qsd's vhost layer over memory, the fair peer of vhost-mem
# Ratios printed: uthin / qsd-disk, uthin-direct / qsd-disk, uthin / qsd-buffered, vhost-null / qsd-null and vhost-mem / qsd-shm. Null peers
# store nothing, so their data is not verified.
#
# Environment: BENCH_DIR (default: a directory under /var/tmp, on a real disk file system).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
SECONDS_PER_PHASE=5
SIZE=1G
QD=32
ONLY=""
PEERS=""
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --seconds) SECONDS_PER_PHASE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --qd) QD=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --peers) PEERS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "vhost-bench: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon is not installed (qemu-utils)"
(cd "$ROOT" && cargo build --release -q --example vhost-bench --example vhost-serve) || die "build failed"
BENCH=$ROOT/target/release/examples/vhost-bench
SERVE=$ROOT/target/release/examples/vhost-serve
UTHIN=$ROOT/target/release/uthin
if [ -z "$PEERS" ]; then
    PEERS="vhost-null qsd-null vhost-mem qsd-shm qsd-disk"
    if [ -x "$UTHIN" ] && "$UTHIN" serve --help >/dev/null 2>&1; then
        PEERS="uthin uthin-direct $PEERS"
    fi
fi

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/uthin-vhost-bench.XXXXXX")
SHM=$(mktemp -d /dev/shm/uthin-vhost-bench.XXXXXX)
SERVER_PID=""
cleanup() {
    stop_server
    rm -rf "$WORK" "$SHM"
}
trap cleanup EXIT

size_bytes() { numfmt --from=iec "$1"; }

stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

# Removes the stopped peer's storage and syncs, so that the next peer does not pay for this
# one's dirty pages (a deleted file's dirty pages are dropped, not written back). Without it, a
# page-cache peer's gigabytes of dirty data were written back during the next peer's run.
drop_storage() {
    rm -rf "$WORK/qsd.img" "$WORK/pool" "$SHM/qsd.img"
    sync
}

wait_socket() {
    local i=0
    while [ ! -S "$1" ]; do
        i=$((i + 1))
        [ $i -gt 300 ] && die "no socket $1 (see $WORK/server.log)"
        kill -0 "$SERVER_PID" 2>/dev/null || die "server exited (see $WORK/server.log)"
        sleep 0.1
    done
}

start_qsd() { # start_qsd IMAGE DIRECT
    rm -f "$1" "$WORK/qsd.sock"
    truncate -s "$SIZE" "$1"
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=file0,filename=$1,aio=io_uring,cache.direct=$2" \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$WORK/qsd.sock,writable=on,num-queues=1" \
        >>"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    wait_socket "$WORK/qsd.sock"
    SOCKET=$WORK/qsd.sock
}

start_peer() {
    case "$1" in
    vhost-mem)
        rm -f "$WORK/mem.sock"
        "$SERVE" --socket "$WORK/mem.sock" --mem "$SIZE" >>"$WORK/server.log" 2>&1 &
        SERVER_PID=$!
        wait_socket "$WORK/mem.sock"
        SOCKET=$WORK/mem.sock
        ;;
    vhost-null)
        rm -f "$WORK/null.sock"
        "$SERVE" --socket "$WORK/null.sock" --null "$SIZE" >>"$WORK/server.log" 2>&1 &
        SERVER_PID=$!
        wait_socket "$WORK/null.sock"
        SOCKET=$WORK/null.sock
        ;;
    qsd-null)
        rm -f "$WORK/qsd.sock"
        qemu-storage-daemon --blockdev "driver=null-co,node-name=disk0,size=$(size_bytes "$SIZE")" \
            --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$WORK/qsd.sock,writable=on,num-queues=1" \
            >>"$WORK/server.log" 2>&1 &
        SERVER_PID=$!
        wait_socket "$WORK/qsd.sock"
        SOCKET=$WORK/qsd.sock
        ;;
    qsd-disk) start_qsd "$WORK/qsd.img" on ;;
    qsd-buffered) start_qsd "$WORK/qsd.img" off ;;
    qsd-shm) start_qsd "$SHM/qsd.img" off ;;
    uthin | uthin-direct)
        local cache=writeback
        [ "$1" = uthin ] || cache=direct
        rm -rf "$WORK/pool" "$WORK/vol.sock"
        "$UTHIN" --pool "$WORK/pool" pool create --data-size $((2 * $(size_bytes "$SIZE"))) >/dev/null
        "$UTHIN" --pool "$WORK/pool" create vol --size "$SIZE" >/dev/null
        "$UTHIN" --pool "$WORK/pool" serve --cache "$cache" --vhost-user "vol=$WORK/vol.sock" \
            >>"$WORK/server.log" 2>&1 &
        SERVER_PID=$!
        wait_socket "$WORK/vol.sock"
        SOCKET=$WORK/vol.sock
        ;;
    *) die "unknown peer $1" ;;
    esac
}

RESULTS=$WORK/results
: >"$RESULTS"
log "peers: $PEERS; $ROUNDS rounds of ${SECONDS_PER_PHASE}s per phase on $SIZE at QD$QD"
# The order of the peers turns by one each round, so that over n rounds each peer follows each
# other one once: a peer pays, on this machine, for the storage work the one before it left
# behind (a page-cache peer writes gigabytes more; the host absorbs them after its `sync`).
read -r -a PEER_LIST <<<"$PEERS"
only=""
[ -z "$ONLY" ] || only="--only $ONLY"
for round in $(seq 1 "$ROUNDS"); do
    shift_by=$(((round - 1) % ${#PEER_LIST[@]}))
    for peer in "${PEER_LIST[@]:shift_by}" "${PEER_LIST[@]:0:shift_by}"; do
        start_peer "$peer"
        verify=""
        case "$peer" in *-null) verify=--no-verify ;; esac
        out=$("$BENCH" --socket "$SOCKET" --size "$SIZE" --seconds "$SECONDS_PER_PHASE" --qd "$QD" $only $verify) ||
            die "$peer round $round: bench failed: $out"
        [ -n "$verify" ] || echo "$out" | grep -q '^VERIFIED' || die "$peer round $round: data not verified"
        echo "$out" | awk -v p="$peer" '/^RESULT/ {print p, $2, $3, $4}
            /^DURABLE/ {print p, $2 "-durable", $3, $4}' >>"$RESULTS"
        log "round $round $peer: $(echo "$out" | awk '/^RESULT/ {printf "%s=%s ", $2, $3}
            /^DURABLE/ {printf "(flush %s ms) ", $5}')"
        stop_server
        drop_storage
    done
done

# Median IOPS and MiB/s per peer and phase, then the ratios.
echo
# New page-cache pages may be host faults in this VM (docs/volume.md); say which state we ran in.
"$(dirname "$0")/bench-memory.sh" status | sed -n 1p
printf "%-24s" "phase"
for peer in $PEERS; do printf "%26s" "$peer IOPS (MiB/s)"; done
echo
median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
# The phases that ran (all five unless --only), in the client's order; each write phase also
# as "-durable": its rate with the flush that ends it included (examples/vhost-bench.rs).
ALL_PHASES="randwrite-fresh randwrite-fresh-durable randwrite-over randwrite-over-durable randread
    seqwrite-1m seqwrite-1m-durable seqread-1m"
PHASES=$(for phase in $ALL_PHASES; do
    awk -v f="$phase" '$2==f {print f; exit}' "$RESULTS"
done)
for phase in $PHASES; do
    printf "%-24s" "$phase"
    for peer in $PEERS; do
        iops=$(awk -v p="$peer" -v f="$phase" '$1==p && $2==f {print $3}' "$RESULTS" | median)
        mibs=$(awk -v p="$peer" -v f="$phase" '$1==p && $2==f {print $4}' "$RESULTS" | median)
        eval "M_${peer//-/_}_${phase//-/_}=$iops"
        printf "%26s" "$iops ($mibs)"
    done
    echo
done
echo
ratio() { # ratio A B
    local phase a b
    for phase in $PHASES; do
        a=$(eval echo "\${M_${1//-/_}_${phase//-/_}:-}")
        b=$(eval echo "\${M_${2//-/_}_${phase//-/_}:-}")
        [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" -v p="$phase" -v n="$1/$2" \
            'BEGIN {printf "RATIO %-20s %-24s %.2fx\n", n, p, a / b}'
    done
}
case " $PEERS " in *" uthin "*) case " $PEERS " in *" qsd-disk "*) ratio uthin qsd-disk ;; esac ;; esac
case " $PEERS " in *" uthin-direct "*) case " $PEERS " in *" qsd-disk "*) ratio uthin-direct qsd-disk ;; esac ;; esac
case " $PEERS " in *" uthin "*) case " $PEERS " in *" qsd-buffered "*) ratio uthin qsd-buffered ;; esac ;; esac
case " $PEERS " in *" vhost-null "*) case " $PEERS " in *" qsd-null "*) ratio vhost-null qsd-null ;; esac ;; esac
case " $PEERS " in *" vhost-mem "*) case " $PEERS " in *" qsd-shm "*) ratio vhost-mem qsd-shm ;; esac ;; esac
