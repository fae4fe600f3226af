//! `uthin delta A B`: how two thin devices differ, in thin_delta's (non-verbose) XML: runs of
//! virtual blocks that are the `same` (both map to one data block), `different` (both mapped,
//! to different blocks), `left_only` or `right_only`. Both trees are walked in step, one leaf
//! of each in memory at a time.

use std::fmt::Write as _;

use crate::pool::details::BlockTime;
use crate::pool::{Pool, PoolError};
use crate::units::{DevId, VirtBlock};

/// How one virtual block compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaKind {
    /// Both map it to the same data block.
    Same,
    /// Both map it, to different data blocks.
    Different,
    /// Only the left device maps it.
    LeftOnly,
    /// Only the right device maps it.
    RightOnly,
}

impl DeltaKind {
    fn tag(self) -> &'static str {
        match self {
            DeltaKind::Same => "same",
            DeltaKind::Different => "different",
            DeltaKind::LeftOnly => "left_only",
            DeltaKind::RightOnly => "right_only",
        }
    }
}

/// A run of consecutive virtual blocks of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaRun {
    /// Its kind.
    pub kind: DeltaKind,
    /// First virtual block.
    pub begin: u64,
    /// Number of blocks.
    pub length: u64,
}

/// Compares the mappings of `left` and `right`.
pub fn delta(pool: &Pool, left: DevId, right: DevId) -> Result<Vec<DeltaRun>, PoolError> {
    let meta = pool.metadata();
    let mut l = meta.iter_mappings(left)?;
    let mut r = meta.iter_mappings(right)?;
    let next = |it: &mut dyn Iterator<Item = Result<_, PoolError>>| {
        it.next()
            .transpose()
            .map(|o| o.map(|(vb, bt): (VirtBlock, BlockTime)| (vb.0, bt.block)))
    };
    let mut runs: Vec<DeltaRun> = Vec::new();
    let mut push = |kind: DeltaKind, vb: u64| {
        if let Some(last) = runs.last_mut()
            && last.kind == kind
            && last.begin + last.length == vb
        {
            last.length += 1;
            return;
        }
        runs.push(DeltaRun {
            kind,
            begin: vb,
            length: 1,
        });
    };
    let mut lk = next(&mut l)?;
    let mut rk = next(&mut r)?;
    loop {
        match (lk, rk) {
            (None, None) => break,
            (Some((lv, _)), None) => {
                push(DeltaKind::LeftOnly, lv);
                lk = next(&mut l)?;
            }
            (None, Some((rv, _))) => {
                push(DeltaKind::RightOnly, rv);
                rk = next(&mut r)?;
            }
            (Some((lv, _)), Some((rv, _))) if lv < rv => {
                push(DeltaKind::LeftOnly, lv);
                lk = next(&mut l)?;
            }
            (Some((lv, _)), Some((rv, _))) if rv < lv => {
                push(DeltaKind::RightOnly, rv);
                rk = next(&mut r)?;
            }
            (Some((lv, lb)), Some((_, rb))) => {
                let kind = if lb == rb {
                    DeltaKind::Same
                } else {
                    DeltaKind::Different
                };
                push(kind, lv);
                lk = next(&mut l)?;
                rk = next(&mut r)?;
            }
        }
    }
    Ok(runs)
}

/// thin_delta's XML for the comparison of `left` and `right`.
pub fn delta_xml(pool: &Pool, left: DevId, right: DevId) -> Result<String, PoolError> {
    let runs = delta(pool, left, right)?;
    let sb = &pool.metadata().sb;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
        sb.time,
        sb.transaction_id,
        sb.data_block_size_sectors,
        pool.metadata().data_nr_blocks()
    );
    let _ = writeln!(out, "  <diff left=\"{}\" right=\"{}\">", left.0, right.0);
    for run in runs {
        let _ = writeln!(
            out,
            "    <{} begin=\"{}\" length=\"{}\"/>",
            run.kind.tag(),
            run.begin,
            run.length
        );
    }
    let _ = writeln!(out, "  </diff>");
    let _ = writeln!(out, "</superblock>");
    Ok(out)
}
