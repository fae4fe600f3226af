//! Free page reporting, which decides what a new page of the page cache costs in a VM.
//! Shared by the bench binaries that compare sides writing different amounts of new pages.

/// Where the kernel's free page reporting is configured (`mm/page_reporting.c`).
const PAGE_REPORTING: &str = "/sys/module/page_reporting/parameters";

/// The largest buddy order on x86-64 and arm64 with 4 KiB pages (`MAX_PAGE_ORDER`): free
/// blocks are reported from `page_reporting_order` up, so an order above it reports none.
const MAX_PAGE_ORDER: u32 = 10;

/// Free page reporting at the start of a run: in a VM whose balloon reports free memory to
/// the host (Firecracker, some clouds), the host takes the reported pages back, and the
/// first write to each of them later is a fault in the host. On the 2-core machines these
/// benches were written on that made every new page of the page cache cost about 6 µs
/// (docs/volume.md, "New pages are the host's faults"), which falls on whichever side
/// allocates more of them, so the benches print whether it is on.
pub struct PageReporting {
    order: Option<u32>,
    reported_kib: Option<u64>,
}

impl PageReporting {
    /// Reads the current setting (nothing when the kernel has no page reporting).
    pub fn now() -> PageReporting {
        let read = |name: &str| {
            std::fs::read_to_string(format!("{PAGE_REPORTING}/{name}"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        PageReporting {
            order: read("page_reporting_order").and_then(|o| u32::try_from(o).ok()),
            // Only some kernels (Firecracker's) count what they reported.
            reported_kib: read("reported_kib"),
        }
    }

    /// One line for the bench's output: whether reporting is on, and how much memory was
    /// reported to the host since `self` was read.
    pub fn describe(&self) -> String {
        let Some(order) = self.order else {
            return "free page reporting: not in this kernel".into();
        };
        if order > MAX_PAGE_ORDER {
            return format!("free page reporting: off (page_reporting_order {order})");
        }
        let since = match (self.reported_kib, PageReporting::now().reported_kib) {
            (Some(a), Some(b)) => format!(
                ", {} MiB reported during the run",
                b.saturating_sub(a) >> 10
            ),
            _ => String::new(),
        };
        format!(
            "free page reporting: on (page_reporting_order {order}{since}); if a balloon reports, \
             new page-cache pages are host faults: see scripts/bench-memory.sh"
        )
    }
}
