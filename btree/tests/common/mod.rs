//! Helpers shared by the integration tests: a minimal, test-only dm-thin superblock (the real
//! one belongs to the pool) and a full recount.
#![allow(dead_code)]

use std::sync::Arc;
use uthin_btree::checksum::*;
use uthin_btree::*;

/// dm-thin's superblock magic.
pub const THIN_MAGIC: u64 = 27022010;
/// The test superblock's validator: dm-thin's xor, magic at offset 32.
pub static SB_VALIDATOR: DmValidator =
    DmValidator::with_magic(BlockKind::Superblock, SUPERBLOCK_CSUM_XOR, 32, THIN_MAGIC);

/// Offsets in dm-thin's superblock.
pub const DATA_SM_ROOT: usize = 64;
pub const META_SM_ROOT: usize = 192;
pub const MAPPING_ROOT: usize = 320;
pub const DETAILS_ROOT: usize = 328;
/// Where the tests keep extra tree roots (past dm-thin's fields; thin tools ignore it).
pub const EXTRA_ROOTS: usize = 1024;
pub const MAX_EXTRA: usize = 128;

/// What a test keeps in its superblock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestSuper {
    pub trans_id: u64,
    pub mapping_root: u64,
    pub details_root: u64,
    pub data_block_sectors: u32,
    pub metadata_nr_blocks: u64,
    /// Extra roots (0 = unused slot).
    pub roots: Vec<u64>,
    pub meta_sm: Vec<u8>,
    pub data_sm: Vec<u8>,
}

pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

pub fn build_super(s: &TestSuper, roots: &CommitRoots) -> Block {
    let mut b = [0u8; BLOCK_SIZE];
    b[32..40].copy_from_slice(&THIN_MAGIC.to_le_bytes());
    b[40..44].copy_from_slice(&2u32.to_le_bytes());
    b[48..56].copy_from_slice(&s.trans_id.to_le_bytes());
    if let Some(d) = &roots.data_sm {
        b[DATA_SM_ROOT..DATA_SM_ROOT + 128].copy_from_slice(d);
    }
    b[META_SM_ROOT..META_SM_ROOT + 128].copy_from_slice(&roots.metadata_sm);
    b[MAPPING_ROOT..MAPPING_ROOT + 8].copy_from_slice(&s.mapping_root.to_le_bytes());
    b[DETAILS_ROOT..DETAILS_ROOT + 8].copy_from_slice(&s.details_root.to_le_bytes());
    b[336..340].copy_from_slice(&s.data_block_sectors.to_le_bytes());
    b[340..344].copy_from_slice(&8u32.to_le_bytes());
    b[344..352].copy_from_slice(&s.metadata_nr_blocks.to_le_bytes());
    for (i, r) in s.roots.iter().enumerate().take(MAX_EXTRA) {
        b[EXTRA_ROOTS + 8 * i..EXTRA_ROOTS + 8 * i + 8].copy_from_slice(&r.to_le_bytes());
    }
    b
}

pub fn parse_super(b: &Block, nr_roots: usize) -> TestSuper {
    TestSuper {
        trans_id: le64(b, 48),
        mapping_root: le64(b, MAPPING_ROOT),
        details_root: le64(b, DETAILS_ROOT),
        data_block_sectors: u32::from_le_bytes(b[336..340].try_into().unwrap()),
        metadata_nr_blocks: le64(b, 344),
        roots: (0..nr_roots)
            .map(|i| le64(b, EXTRA_ROOTS + 8 * i))
            .collect(),
        meta_sm: b[META_SM_ROOT..META_SM_ROOT + 128].to_vec(),
        data_sm: b[DATA_SM_ROOT..DATA_SM_ROOT + 128].to_vec(),
    }
}

/// Commits with a test superblock holding `s` (its sm roots are filled in).
pub fn commit(tm: &mut TransactionManager, s: &TestSuper) -> Result<CommitInfo> {
    tm.commit(&SB_VALIDATOR, |roots| Ok(build_super(s, roots)))
}

/// Reads block 0 through its validator and opens the transaction manager (and the data space
/// map if the superblock has one).
pub fn open(
    io: Arc<dyn BlockIo>,
    cache_blocks: usize,
    nr_roots: usize,
) -> Result<(TransactionManager, TestSuper)> {
    let mut raw = [0u8; BLOCK_SIZE];
    io.read(MetaBlock(0), &mut raw)
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    SB_VALIDATOR.check(MetaBlock(0), &raw)?;
    let s = parse_super(&raw, nr_roots);
    let mut tm = TransactionManager::open(io, &TmConfig { cache_blocks }, &s.meta_sm)?;
    if s.data_sm.iter().any(|&x| x != 0) {
        tm.open_data_sm(&s.data_sm)?;
    }
    Ok((tm, s))
}

/// Recount: superblock + given trees + space-map structures; returns every discrepancy and
/// structural problem as text (empty = consistent).
pub fn recount(
    tm: &TransactionManager,
    count_trees: impl FnOnce(&TransactionManager, &mut RefCounter) -> Result<()>,
) -> Vec<String> {
    let mut c = RefCounter::new();
    c.inc_meta(MetaBlock(0));
    let mut out = Vec::new();
    if let Err(e) = count_trees(tm, &mut c) {
        out.push(format!("walking trees: {e}"));
    }
    if let Err(e) = tm.count_space_map_blocks(&mut c) {
        out.push(format!("walking space maps: {e}"));
    }
    out.extend(c.problems().iter().cloned());
    match tm.verify_metadata_counts(&c) {
        Ok(d) => out.extend(d.iter().map(|d| d.to_string())),
        Err(e) => out.push(format!("verifying metadata: {e}")),
    }
    if tm.has_data_sm() {
        match tm.verify_data_counts(&c) {
            Ok(d) => out.extend(d.iter().map(|d| d.to_string())),
            Err(e) => out.push(format!("verifying data: {e}")),
        }
    }
    out
}
