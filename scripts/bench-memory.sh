#!/bin/bash
# Free page reporting and benchmarks: see docs/volume.md, "New pages are the host's faults".
#
# In a VM whose balloon reports free memory to the host (virtio-balloon's free page
# reporting: Firecracker, some clouds), the host takes reported pages back, and the first
# write to each of them afterwards is a fault in the host. On the machines uthin was
# benchmarked on, a new page of the page cache then cost about 6 µs instead of under 1, and
# a side that allocates more new pages (a copy on write puts 64 KiB into new pages where a
# plain overwrite puts 4 KiB into old ones) lost for that reason alone. A long-running
# server whose page cache has filled memory takes its new pages from the cache, not from
# reported memory; `off` puts a benchmark machine in that state.
#
#   scripts/bench-memory.sh status   whether reporting is on, and how much was reported
#   scripts/bench-memory.sh off      stop reporting, then write to free memory once (a tmpfs
#                                    filled up to 1 GiB short of MemAvailable, then removed)
#                                    so the host backs it again
#   scripts/bench-memory.sh on       report again, at the order saved by `off` (default 9)
#
# Needs root for `off` and `on`. The setting lasts until reboot.
set -euo pipefail

params=/sys/module/page_reporting/parameters
saved=/run/uthin-page-reporting-order
# Free blocks are reported from page_reporting_order up; the largest buddy order with
# 4 KiB pages is 10 (MAX_PAGE_ORDER), so anything above it reports nothing.
max_page_order=10
off_order=$((max_page_order + 1))

if [ ! -e "$params/page_reporting_order" ]; then
    echo "bench-memory: this kernel has no free page reporting ($params); nothing to do"
    exit 0
fi

status() {
    local order
    order=$(cat "$params/page_reporting_order")
    if [ "$order" -gt "$max_page_order" ]; then
        echo "free page reporting: off (page_reporting_order $order)"
    else
        echo "free page reporting: on (page_reporting_order $order)"
    fi
    if [ -e "$params/reported_kib" ]; then
        echo "reported since boot: $(($(cat "$params/reported_kib") >> 10)) MiB"
    fi
    grep -E '^(MemFree|MemAvailable):' /proc/meminfo
}

case "${1:-}" in
status)
    status
    ;;
off)
    [ -e "$saved" ] || cat "$params/page_reporting_order" >"$saved"
    echo "$off_order" >"$params/page_reporting_order"
    avail_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
    fill_kib=$((avail_kib - (1 << 20)))
    if [ "$fill_kib" -gt 0 ]; then
        dir=$(mktemp -d /tmp/uthin-bench-memory.XXXXXX)
        mount -t tmpfs -o size=${fill_kib}k uthin-bench-memory "$dir"
        # Stops with ENOSPC when the tmpfs is full: that is the point.
        dd if=/dev/zero of="$dir/fill" bs=1M status=none 2>/dev/null || true
        echo "wrote $(($(stat -c %s "$dir/fill") >> 20)) MiB of free memory once"
        umount "$dir"
        rmdir "$dir"
    fi
    status
    ;;
on)
    order=9
    [ -e "$saved" ] && order=$(cat "$saved")
    echo "$order" >"$params/page_reporting_order"
    rm -f "$saved"
    status
    ;;
*)
    echo "usage: $0 status|off|on" >&2
    exit 2
    ;;
esac
