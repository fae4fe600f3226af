//! Helpers shared by the uthin crate's bench binaries.

/// Resident and peak resident memory of this process, in MiB (from /proc/self/status).
pub fn rss_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb >> 10)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
