#!/usr/bin/env bash
# NBD benchmark: the same fio jobs (nbd engine, one connection, QD32, 4 GiB) against several
# servers, interleaved and repeated, then a table of medians and ratios to qemu-nbd.
#
# Usage: scripts/bench-nbd.sh [-r ROUNDS] [-t SECONDS] [-s SIZE] [-d DIR] [TARGET...]
#   TARGET: mem        uthin's NBD server over an in-memory device (examples/nbd_mem_server):
#                      the protocol layer alone, no pool underneath
#           uthin      `uthin serve` on a fresh pool (needs the serve command; see below)
#           uthin-direct  the same with `serve --cache direct` (O_DIRECT through io_uring)
#           qemu-raw   qemu-nbd on a sparse raw file
#           qemu-raw-direct  the same with --cache=none --aio=io_uring (O_DIRECT): the peer of
#                      uthin-direct, whose ratios are to it (cow-randwrite: to qemu-qcow2)
#           qemu-qcow2 qemu-nbd on a qcow2 file (64 KiB clusters)
#   default targets: mem qemu-raw qemu-qcow2
#   -r ROUNDS   repetitions of the whole sequence (default 3); targets are shuffled per round
#   -t SECONDS  run time of each 4k job (default 15)
#   -s SIZE     volume size (default 4G)
#   -d DIR      scratch directory for images and pools (default: a new dir under /var/tmp)
#   -c LAYERS   snapshot chain length (default 64; 0 skips the chain workloads)
#
# Each round, for each target, on fresh storage:
#   randwrite-fresh  4k random writes into never-written blocks (random map: no block twice)
#   seqwrite-1M      1 MiB sequential writes over the whole volume
#   randwrite-again  4k random writes over allocated blocks
#   randread         4k random reads
#   seqread-1M       1 MiB sequential reads over the whole volume
#   cow-randwrite    (uthin, qemu-qcow2 only) 4k random writes into a fresh snapshot of the
#                    filled volume (uthin) / a fresh qcow2 overlay on the filled image
#   chain-read-1st   (uthin, qemu-qcow2 only; -c 0 skips the chain) a chain of 64 snapshots
#   chain-read-64th  of the filled volume (uthin: snapshot of the snapshot; qcow2: overlay on
#                    overlay), each layer rewriting its own 64th of the volume with 1 MiB
#                    writes; then 4k random reads on the first layer and on the 64th
# Cache mode: uthin, qemu-raw and qemu-qcow2 use the host page cache for data (qemu-nbd's
# default --cache=writeback; uthin's default --cache writeback); the -direct targets bypass it.
# fio sends no flushes, so uthin commits only on its 1 s timer and qemu-nbd never syncs.
# Results (fio JSON) are kept in DIR/results; the summary is printed at the end, with the load
# average before each target's run.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3
RUNTIME=15
SIZE=4G
DIR=""
CHAIN=64
while getopts "r:t:s:d:c:h" opt; do
    case $opt in
    r) ROUNDS=$OPTARG ;;
    t) RUNTIME=$OPTARG ;;
    s) SIZE=$OPTARG ;;
    d) DIR=$OPTARG ;;
    c) CHAIN=$OPTARG ;;
    *) sed -n '2,40p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(mem qemu-raw qemu-qcow2)

for tool in fio qemu-nbd qemu-img nbdinfo python3; do
    command -v "$tool" >/dev/null || { echo "bench-nbd: $tool is missing" >&2; exit 1; }
done
[ -n "$DIR" ] || DIR=$(mktemp -d /var/tmp/uthin-bench-nbd.XXXXXX)
mkdir -p "$DIR/results"
PORT=10950
EXPORT=bench
# shellcheck source=scripts/nbd-server-lib.sh
. scripts/nbd-server-lib.sh

echo "bench-nbd: building" >&2
cargo build --release --quiet --example nbd_mem_server --bin uthin
MEM_SERVER=target/release/examples/nbd_mem_server
UTHIN=target/release/uthin

trap stop_server EXIT

# start_target TARGET: fresh storage, server in the background, export $EXPORT on $PORT.
start_target() {
    local t=$1
    PORT=$((PORT + 1))
    # The previous target's files go (their dirty pages are dropped, not written back) and the
    # disk settles, so that no target pays for another's page cache.
    rm -rf "$DIR/store"
    sync
    mkdir -p "$DIR/store"
    case $t in
    mem)
        "$MEM_SERVER" --listen "127.0.0.1:$PORT" --export "$EXPORT=$SIZE" \
            >"$DIR/store/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    qemu-raw)
        truncate -s "$SIZE" "$DIR/store/disk.raw"
        qemu-nbd -f raw -x "$EXPORT" -b 127.0.0.1 -p "$PORT" -t -e 8 --discard=unmap \
            "$DIR/store/disk.raw" >"$DIR/store/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    qemu-qcow2)
        qemu-img create -q -f qcow2 -o cluster_size=64k "$DIR/store/disk.qcow2" "$SIZE"
        qemu-nbd -f qcow2 -x "$EXPORT" -b 127.0.0.1 -p "$PORT" -t -e 8 --discard=unmap \
            "$DIR/store/disk.qcow2" >"$DIR/store/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    qemu-raw-direct)
        truncate -s "$SIZE" "$DIR/store/disk.raw"
        qemu-nbd -f raw --cache=none --aio=io_uring -x "$EXPORT" -b 127.0.0.1 -p "$PORT" -t \
            -e 8 --discard=unmap "$DIR/store/disk.raw" >"$DIR/store/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    uthin | uthin-direct)
        local cache=writeback
        [ "$t" = uthin ] || cache=direct
        "$UTHIN" --pool "$DIR/store/pool" pool create --data-size 16G --block-size 64K >/dev/null
        "$UTHIN" --pool "$DIR/store/pool" create "$EXPORT" --size "$SIZE" >/dev/null
        "$UTHIN" --pool "$DIR/store/pool" serve --cache "$cache" --nbd "127.0.0.1:$PORT" \
            >"$DIR/store/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    *)
        echo "bench-nbd: unknown target $t" >&2
        exit 2
        ;;
    esac
    wait_for_server "nbd://127.0.0.1:$PORT/$EXPORT" "$DIR/store/server.log"
}

# run_fio TARGET ROUND WORKLOAD EXPORT fio-args...
run_fio() {
    local t=$1 round=$2 workload=$3 export=$4
    shift 4
    local out="$DIR/results/$t.$workload.$round.json"
    fio --name="$workload" --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/$export" \
        --iodepth=32 --numjobs=1 --size="$SIZE" --output-format=json --output="$out" "$@"
    python3 - "$out" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
rw = j["read"] if j["read"]["io_bytes"] else j["write"]
print(f"    {j['jobname']:<16} {rw['iops']:>10.0f} IOPS {rw['bw'] / 1024:>9.1f} MiB/s", file=sys.stderr)
EOF
}

# The CoW workload: a fresh snapshot (uthin) or overlay (qcow2) of the filled volume.
cow_workload() {
    local t=$1 round=$2
    case $t in
    qemu-qcow2)
        stop_server
        qemu-img create -q -f qcow2 -o cluster_size=64k -b "$DIR/store/disk.qcow2" -F qcow2 \
            "$DIR/store/overlay.qcow2"
        qemu-nbd -f qcow2 -x "$EXPORT" -b 127.0.0.1 -p "$PORT" -t -e 8 \
            "$DIR/store/overlay.qcow2" >>"$DIR/store/server.log" 2>&1 &
        SERVER_PID=$!
        wait_for_server "nbd://127.0.0.1:$PORT/$EXPORT" "$DIR/store/server.log"
        run_fio "$t" "$round" cow-randwrite "$EXPORT" --rw=randwrite --bs=4k \
            --runtime="$RUNTIME" --time_based
        ;;
    uthin | uthin-direct)
        "$UTHIN" --pool "$DIR/store/pool" snapshot "$EXPORT" "$EXPORT-snap" >/dev/null
        run_fio "$t" "$round" cow-randwrite "$EXPORT-snap" --rw=randwrite --bs=4k \
            --runtime="$RUNTIME" --time_based
        ;;
    esac
}

# The snapshot chain: CHAIN layers over the filled volume, layer i rewriting the i-th slice
# (volume / CHAIN) with 1 MiB writes; 4k random reads on layer 1 and on layer CHAIN.
chain_workload() {
    local t=$1 round=$2 i prev slice_mib size_mib
    [ "$CHAIN" -gt 0 ] || return 0
    size_mib=$(($(numfmt --from=iec "$SIZE") >> 20))
    slice_mib=$((size_mib / CHAIN))
    case $t in
    uthin | uthin-direct)
        prev=$EXPORT
        for i in $(seq 1 "$CHAIN"); do
            "$UTHIN" --pool "$DIR/store/pool" snapshot "$prev" "chain$i" >/dev/null
            qemu-io -f raw -c "write -P $((i % 250 + 1)) $(((i - 1) * slice_mib))M ${slice_mib}M" \
                "nbd://127.0.0.1:$PORT/chain$i" >/dev/null
            prev=chain$i
        done
        run_fio "$t" "$round" chain-read-1st chain1 --rw=randread --bs=4k \
            --runtime="$RUNTIME" --time_based --randrepeat=0
        run_fio "$t" "$round" chain-read-64th "chain$CHAIN" --rw=randread --bs=4k \
            --runtime="$RUNTIME" --time_based --randrepeat=0
        ;;
    qemu-qcow2)
        stop_server
        prev=$DIR/store/disk.qcow2
        for i in $(seq 1 "$CHAIN"); do
            qemu-img create -q -f qcow2 -o cluster_size=64k -b "$prev" -F qcow2 \
                "$DIR/store/chain$i.qcow2"
            qemu-io -f qcow2 -c "write -P $((i % 250 + 1)) $(((i - 1) * slice_mib))M ${slice_mib}M" \
                "$DIR/store/chain$i.qcow2" >/dev/null
            prev=$DIR/store/chain$i.qcow2
        done
        for layer in 1 "$CHAIN"; do
            qemu-nbd -f qcow2 -x "$EXPORT" -b 127.0.0.1 -p "$PORT" -t -e 8 \
                "$DIR/store/chain$layer.qcow2" >>"$DIR/store/server.log" 2>&1 &
            SERVER_PID=$!
            wait_for_server "nbd://127.0.0.1:$PORT/$EXPORT" "$DIR/store/server.log"
            local name=chain-read-1st
            [ "$layer" = 1 ] || name=chain-read-64th
            run_fio "$t" "$round" "$name" "$EXPORT" --rw=randread --bs=4k \
                --runtime="$RUNTIME" --time_based --randrepeat=0
            stop_server
        done
        ;;
    esac
}

echo "bench-nbd: targets ${TARGETS[*]}, $ROUNDS rounds, ${RUNTIME}s per 4k job, $SIZE, results in $DIR/results" >&2
# New page-cache pages may be host faults in this VM (docs/volume.md); say which state we ran in.
"$(dirname "$0")/bench-memory.sh" status | sed -n 1p >&2
for round in $(seq 1 "$ROUNDS"); do
    for t in $(printf '%s\n' "${TARGETS[@]}" | shuf); do
        echo "== round $round: $t (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
        echo "$round $t $(cut -d' ' -f1-3 /proc/loadavg)" >>"$DIR/results/loadavg"
        start_target "$t"
        # randrepeat=0: a different random sequence each round; the random map (default)
        # makes every write of the fresh pass land on a block never written before.
        run_fio "$t" "$round" randwrite-fresh "$EXPORT" --rw=randwrite --bs=4k \
            --runtime="$RUNTIME" --randrepeat=0
        run_fio "$t" "$round" seqwrite-1M "$EXPORT" --rw=write --bs=1M
        run_fio "$t" "$round" randwrite-again "$EXPORT" --rw=randwrite --bs=4k \
            --runtime="$RUNTIME" --time_based --randrepeat=0
        run_fio "$t" "$round" randread "$EXPORT" --rw=randread --bs=4k \
            --runtime="$RUNTIME" --time_based --randrepeat=0
        run_fio "$t" "$round" seqread-1M "$EXPORT" --rw=read --bs=1M
        cow_workload "$t" "$round"
        chain_workload "$t" "$round"
        stop_server
    done
done
rm -rf "$DIR/store"

python3 - "$DIR/results" "${TARGETS[@]}" <<'EOF'
import glob, json, os, statistics, sys
results, targets = sys.argv[1], sys.argv[2:]
workloads = ["randwrite-fresh", "randwrite-again", "randread", "seqwrite-1M", "seqread-1M",
             "cow-randwrite", "chain-read-1st", "chain-read-64th"]
data = {}
loads = open(os.path.join(results, "loadavg")).read().split("\n") if os.path.exists(os.path.join(results, "loadavg")) else []
for path in glob.glob(os.path.join(results, "*.json")):
    t, w, _round, _ = os.path.basename(path).split(".")
    j = json.load(open(path))["jobs"][0]
    rw = j["read"] if j["read"]["io_bytes"] else j["write"]
    value = rw["iops"] if "1M" not in w else rw["bw"] / 1024  # IOPS, or MiB/s for 1M jobs
    data.setdefault((t, w), []).append(value)
ref = "qemu-raw" if "qemu-raw" in targets else targets[0]
print()
print(f"median of rounds (4k: IOPS, 1M: MiB/s); ratio = target / {ref} "
      f"(uthin-direct: / qemu-raw-direct when run; cow-randwrite: / qemu-qcow2)")
print(f"{'workload':<16}" + "".join(f"{t:>14}" for t in targets) +
      "".join(f"{t + '/ref':>16}" for t in targets if t != ref))
for w in workloads:
    if not any((t, w) in data for t in targets):
        continue
    med = {t: statistics.median(data[(t, w)]) for t in targets if (t, w) in data}
    row = f"{w:<16}" + "".join(f"{med[t]:>14.0f}" if t in med else f"{'-':>14}" for t in targets)
    base = med.get("qemu-qcow2") if w == "cow-randwrite" else med.get(ref)
    direct_base = base if w == "cow-randwrite" else med.get("qemu-raw-direct")
    if w.startswith("chain-"):
        base = None  # compared with the same target's first layer below
    for t in targets:
        if t == ref:
            continue
        b = direct_base if t == "uthin-direct" and direct_base else base
        row += f"{med[t] / b:>16.2f}" if t in med and b else f"{'-':>16}"
    print(row)
for t in targets:
    a, b = data.get((t, "chain-read-1st")), data.get((t, "chain-read-64th"))
    if a and b:
        print(f"{t}: 4k randread on layer 64 / layer 1 = {statistics.median(b) / statistics.median(a):.2f}")
print()
print("load average (1/5/15 min) before each target's run:")
for l in loads:
    if l.strip():
        print("  round " + l)
print()
print("all rounds:")
for (t, w), v in sorted(data.items()):
    print(f"  {t:<12} {w:<16} " + " ".join(f"{x:.0f}" for x in v))
EOF
