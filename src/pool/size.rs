//! Sizes: parsing `10G` / `512M` / `64K`, printing them back, and the metadata size rule.

use super::superblock::METADATA_BLOCK_SIZE;

/// Smallest metadata file uthin creates (2 MiB), as the issue and LVM require.
pub const MIN_METADATA_SIZE: u64 = 2 << 20;
/// dm-thin's largest usable metadata: one index block of 255 entries, each covering the
/// bitmap of 16,384 metadata blocks (kernel `THIN_METADATA_MAX_SECTORS`, about 15.9 GiB).
pub const MAX_METADATA_BLOCKS: u64 = 255 * (1 << 14);
/// [`MAX_METADATA_BLOCKS`] in bytes.
pub const MAX_METADATA_SIZE: u64 = MAX_METADATA_BLOCKS * METADATA_BLOCK_SIZE as u64;
/// Smallest data block size (64 KiB).
pub const MIN_DATA_BLOCK_SIZE: u64 = 64 << 10;
/// Largest data block size (1 GiB).
pub const MAX_DATA_BLOCK_SIZE: u64 = 1 << 30;
/// Default data block size (64 KiB).
pub const DEFAULT_DATA_BLOCK_SIZE: u64 = 64 << 10;
/// Number of thin devices the default metadata size leaves room for.
pub const DEFAULT_MAX_THINS: u64 = 1000;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size `{input}`: {why} (examples: 10G, 512M, 64K, 4096)")]
pub struct SizeError {
    /// The string given.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Parses a byte size: a decimal number with an optional binary suffix `K`, `M`, `G`, `T`, `P`
/// (also `KiB`, `KB`, `k`...; all powers of 1024, as LVM and dmsetup users expect), or `B`/`S`
/// for bytes and 512-byte sectors.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |why| SizeError {
        input: input.to_string(),
        why,
    };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(err("it does not start with a number"));
    }
    let number: u64 = s[..digits_end]
        .parse()
        .map_err(|_| err("the number is too large"))?;
    let suffix = s[digits_end..].trim().to_ascii_lowercase();
    let multiplier: u64 = match suffix.as_str() {
        "" | "b" => 1,
        "s" => 512,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        _ => return Err(err("unknown unit (use K, M, G, T or P)")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| err("the size is too large"))
}

/// Prints a byte count the way [`parse_size`] reads it, exactly when possible (`64K`, `10G`),
/// else with one decimal (`1.5G`), so output stays readable and round-trips where it can.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("P", 1 << 50),
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit {
            if bytes % unit == 0 {
                return format!("{}{name}", bytes / unit);
            }
            return format!("{:.1}{name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes}B")
}

/// Checks a data block size: a power of two from 64 KiB to 1 GiB.
pub fn check_data_block_size(bytes: u64) -> Result<(), String> {
    if !bytes.is_power_of_two() || !(MIN_DATA_BLOCK_SIZE..=MAX_DATA_BLOCK_SIZE).contains(&bytes) {
        return Err(format!(
            "data block size {} must be a power of two from 64K to 1G",
            format_size(bytes)
        ));
    }
    Ok(())
}

/// Default metadata size for a pool of `data_size` bytes in blocks of `block_size` bytes:
/// thin-provisioning-tools' `thin_metadata_size` rule (mapping leaves assumed half full, 126
/// mappings each; one block for the superblock; one root per thin device, for
/// [`DEFAULT_MAX_THINS`] devices), then clamped to [`MIN_METADATA_SIZE`]..=[`MAX_METADATA_SIZE`].
pub fn default_metadata_size(data_size: u64, block_size: u64) -> u64 {
    // Max entries of a 4 KiB node with 8-byte keys and values, as dm computes it: (4096 - 32
    // header bytes) / 16 = 254, rounded down to a multiple of 3 = 252; half full = 126.
    const MAPPINGS_PER_LEAF: u64 = 126;
    let nr_data_blocks = data_size / block_size.max(1);
    let nr_leaves = nr_data_blocks.div_ceil(MAPPINGS_PER_LEAF);
    let blocks = (1 + nr_leaves + DEFAULT_MAX_THINS).min(MAX_METADATA_BLOCKS);
    (blocks * METADATA_BLOCK_SIZE as u64).clamp(MIN_METADATA_SIZE, MAX_METADATA_SIZE)
}

/// Checks an explicit metadata size: 2 MiB ..= ~15.9 GiB, a whole number of 4 KiB blocks.
pub fn check_metadata_size(bytes: u64) -> Result<(), String> {
    if !(MIN_METADATA_SIZE..=MAX_METADATA_SIZE).contains(&bytes) {
        return Err(format!(
            "metadata size {} must be between 2M and {} (dm-thin's limit)",
            format_size(bytes),
            format_size(MAX_METADATA_SIZE)
        ));
    }
    if bytes % METADATA_BLOCK_SIZE as u64 != 0 {
        return Err(format!(
            "metadata size {bytes} is not a multiple of the 4K metadata block"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8s"), Ok(4096));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
        for bad in [
            "",
            "G",
            "-1G",
            "1.5G",
            "10X",
            "99999999999999999999",
            "16777216P",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.to_string().contains(bad.trim()), "{e}");
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(64 << 10), "64K");
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(3 << 29), "1.5G");
        assert_eq!(format_size(100), "100B");
        for s in ["64K", "10G", "3T", "512M"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }

    #[test]
    fn block_size_rule() {
        assert!(check_data_block_size(64 << 10).is_ok());
        assert!(check_data_block_size(1 << 30).is_ok());
        assert!(check_data_block_size(32 << 10).is_err());
        assert!(check_data_block_size(96 << 10).is_err());
        assert!(check_data_block_size(2 << 30).is_err());
    }

    #[test]
    fn metadata_size_rule_matches_thin_metadata_size() {
        // thin_metadata_size -b 64k -s 100g -m 1000 (Rust rule, rounding leaves up):
        // 1638400 blocks / 126 = 13004 leaves, + 1 + 1000 = 14005 blocks.
        assert_eq!(
            default_metadata_size(100 << 30, 64 << 10),
            14005 * METADATA_BLOCK_SIZE as u64
        );
        assert_eq!(default_metadata_size(1 << 30, 64 << 10), 4096 * 1132);
        assert_eq!(default_metadata_size(1 << 20, 64 << 10), 4096 * 1002);
        assert_eq!(default_metadata_size(1 << 60, 64 << 10), MAX_METADATA_SIZE);
        assert!(check_metadata_size(MIN_METADATA_SIZE).is_ok());
        assert!(check_metadata_size(MIN_METADATA_SIZE - 4096).is_err());
        assert!(check_metadata_size(MAX_METADATA_SIZE + 4096).is_err());
        assert!(check_metadata_size(MIN_METADATA_SIZE + 1).is_err());
    }
}
