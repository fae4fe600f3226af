#!/usr/bin/env bash
# CPU cost at fixed request rates: the server's CPU time (user + system, all its threads, from
# /proc/PID/stat) per request while fio sends 4k random writes at a fixed rate over NBD (nbd
# engine, one connection, QD32), for uthin and qemu-nbd side by side, interleaved and repeated.
# The throughput benchmarks (bench-nbd.sh, benches/volume.rs) saturate the server; this one
# shows what a server costs the host when the load is moderate, where spinning or waking
# threads show up as CPU that a saturated run hides.
#
# Usage: scripts/bench-cpu.sh [-r ROUNDS] [-t SECONDS] [-R RATES] [-d DIR] [TARGET...]
#   TARGET: uthin        `uthin serve` (target/release/uthin) on a fresh pool, page cache
#           uthin=PATH   the same with another uthin binary (an A/B of two builds; the label
#                        printed is uthin=PATH)
#           uthin+ARGS   `uthin serve ARGS` with this tree's binary, ARGS split at commas
#                        (e.g. uthin+--threads=1: an A/B of two settings)
#           qemu-raw     qemu-nbd on a sparse raw file (page cache, its default)
#   default targets: uthin qemu-raw
#   -r ROUNDS   repetitions (default 2); every target at every rate each round
#   -t SECONDS  length of each fio run (default 10)
#   -R RATES    comma-separated write rates in requests/s (default 1000,5000,20000)
#   -d DIR      scratch directory (default: a new dir under /var/tmp)
#
# Each run starts the target on fresh storage (a 4 GiB volume: the first writes allocate, as
# in bench-nbd.sh's randwrite-fresh) and stops it afterwards. Printed per run: requests done,
# CPU µs per request and context switches per request (threads alive at the end); then the
# medians per target and rate, and each target's ratio to the first.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=2
RUNTIME=10
RATES=1000,5000,20000
DIR=""
while getopts "r:t:R:d:h" opt; do
    case $opt in
    r) ROUNDS=$OPTARG ;;
    t) RUNTIME=$OPTARG ;;
    R) RATES=$OPTARG ;;
    d) DIR=$OPTARG ;;
    *) sed -n '2,26p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(uthin qemu-raw)

for tool in fio qemu-nbd nbdinfo python3; do
    command -v "$tool" >/dev/null || { echo "bench-cpu: $tool is missing" >&2; exit 1; }
done
for t in "${TARGETS[@]}"; do
    case $t in
    uthin | qemu-raw) ;;
    uthin=*) [ -x "${t#uthin=}" ] || { echo "bench-cpu: ${t#uthin=} is not an executable" >&2; exit 2; } ;;
    uthin+?*) ;;
    *) echo "bench-cpu: unknown target $t (uthin, uthin=PATH, uthin+ARGS, qemu-raw)" >&2; exit 2 ;;
    esac
done
IFS=, read -r -a RATE_LIST <<<"$RATES"
for r in "${RATE_LIST[@]}"; do
    [[ $r =~ ^[1-9][0-9]*$ ]] || { echo "bench-cpu: rate '$r' is not a positive integer" >&2; exit 2; }
done
[ -n "$DIR" ] || DIR=$(mktemp -d /var/tmp/uthin-bench-cpu.XXXXXX)
mkdir -p "$DIR"
RESULTS=$DIR/results.txt
: >"$RESULTS"
PORT=10970
EXPORT=bench
TICK=$(getconf CLK_TCK)
# shellcheck source=scripts/nbd-server-lib.sh
. scripts/nbd-server-lib.sh

echo "bench-cpu: building" >&2
cargo build --release --quiet --bin uthin

trap stop_server EXIT

# CPU ticks (user + system) of $SERVER_PID and the context switches of its live threads.
sample() {
    local cpu cs
    cpu=$(awk '{print $14 + $15}' "/proc/$SERVER_PID/stat")
    cs=$(cat /proc/"$SERVER_PID"/task/*/status 2>/dev/null |
        awk '/^(non)?voluntary_ctxt_switches/ {n += $2} END {print n + 0}')
    echo "$cpu $cs"
}

start_target() {
    local t=$1 bin
    PORT=$((PORT + 1))
    rm -rf "$DIR/store"
    sync
    mkdir -p "$DIR/store"
    case $t in
    qemu-raw)
        truncate -s 4G "$DIR/store/disk.raw"
        qemu-nbd -f raw -x "$EXPORT" -b 127.0.0.1 -p "$PORT" -t -e 8 "$DIR/store/disk.raw" \
            >"$DIR/store/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    *)
        bin=target/release/uthin
        extra=()
        case $t in
        uthin=*) bin=${t#uthin=} ;;
        uthin+*) IFS=, read -r -a extra <<<"${t#uthin+}" ;;
        esac
        "$bin" --pool "$DIR/store/pool" pool create --data-size 16G --block-size 64K >/dev/null
        "$bin" --pool "$DIR/store/pool" create "$EXPORT" --size 4G >/dev/null
        "$bin" --pool "$DIR/store/pool" serve --nbd "127.0.0.1:$PORT" "${extra[@]}" \
            >"$DIR/store/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    esac
    wait_for_server "nbd://127.0.0.1:$PORT/$EXPORT" "$DIR/store/server.log" || exit 1
}

for round in $(seq 1 "$ROUNDS"); do
    for rate in "${RATE_LIST[@]}"; do
        for t in "${TARGETS[@]}"; do
            start_target "$t"
            read -r cpu0 cs0 < <(sample)
            fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/$EXPORT" --iodepth=32 \
                --size=4G --rw=randwrite --bs=4k --rate_iops="$rate" --runtime="$RUNTIME" \
                --time_based --output-format=json --output="$DIR/out.json" >/dev/null
            read -r cpu1 cs1 < <(sample)
            stop_server
            python3 - "$DIR/out.json" "$t" "$rate" "$round" "$((cpu1 - cpu0))" "$((cs1 - cs0))" \
                "$TICK" "$RESULTS" <<'EOF'
import json, sys
out, t, rate, rnd, ticks, cs, tick, results = sys.argv[1:]
n = json.load(open(out))["jobs"][0]["write"]["total_ios"]
us = int(ticks) / int(tick) / n * 1e6
line = f"{t}\t{rate}\t{rnd}\t{n}\t{us:.1f}\t{int(cs) / n:.2f}"
print(f"round {rnd} rate {rate:>6} {t:<24} {n:>8} writes {us:7.1f} µs CPU/write "
      f"{int(cs) / n:5.2f} cs/write", file=sys.stderr)
open(results, "a").write(line + "\n")
EOF
        done
    done
done

python3 - "$RESULTS" "${TARGETS[@]}" <<'EOF'
import statistics, sys
results, targets = sys.argv[1], sys.argv[2:]
# uthin=PATH is shown by its file name.
label = lambda t: "uthin=" + t.rsplit("/", 1)[-1] if t.startswith("uthin=") else t
cpu = {}
for line in open(results):
    t, rate, _, _, us, _ = line.split("\t")
    cpu.setdefault((t, int(rate)), []).append(float(us))
rates = sorted({r for _, r in cpu})
print(f"\nmedian CPU µs per 4k write (server process, all threads); ratio = target / {label(targets[0])}")
print(f"{'rate/s':>8} " + " ".join(f"{label(t):>20}" for t in targets) + "   ratios")
for r in rates:
    med = [statistics.median(cpu[(t, r)]) for t in targets]
    ratios = " ".join(f"{m / med[0]:.2f}" for m in med[1:])
    print(f"{r:>8} " + " ".join(f"{m:>20.1f}" for m in med) + f"   {ratios}")
EOF
