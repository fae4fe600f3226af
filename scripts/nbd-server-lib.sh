# Sourced by the NBD benchmark scripts (bench-nbd.sh, bench-cpu.sh): the server they run in
# the background ($SERVER_PID, empty when none) and waiting for its export.

SERVER_PID=""

# wait_for_server URI [LOG]: returns once an NBD client can read the export's size (10 s at
# most); fails at once if the server ($SERVER_PID) has exited, showing the end of LOG.
wait_for_server() {
    for _ in $(seq 1 200); do
        nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "$(basename "$0"): the server for $1 exited" >&2
            [ -z "${2:-}" ] || tail -n 5 "$2" >&2
            return 1
        fi
        sleep 0.05
    done
    echo "$(basename "$0"): server at $1 did not come up" >&2
    [ -z "${2:-}" ] || tail -n 5 "$2" >&2
    return 1
}

# stop_server: stops the background server, if any, and waits for it to exit.
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
