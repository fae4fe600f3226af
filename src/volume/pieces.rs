//! Cutting a byte-range request into per-block pieces, splitting its scatter-gather list to
//! match, and merging pieces back into runs that are contiguous in the data file (one
//! vectored syscall per run instead of one per block).

use std::io::{IoSlice, IoSliceMut};

use crate::units::{DataBlock, VirtBlock};

/// One block's part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) vblock: VirtBlock,
    /// Offset inside the block.
    pub(crate) offset: u32,
    pub(crate) len: usize,
}

impl Piece {
    /// True when the piece covers its whole block.
    pub(crate) fn whole(&self, bs: u64) -> bool {
        self.offset == 0 && self.len as u64 == bs
    }
}

/// Cuts `[offset, offset + len)` at block boundaries.
pub(crate) fn pieces(offset: u64, len: u64, bs: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity((len / bs + 2) as usize);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let in_block = pos % bs;
        let n = (bs - in_block).min(end - pos);
        out.push(Piece {
            vblock: VirtBlock(pos / bs),
            // < bs ≤ u32::MAX (the data file checks block sizes).
            offset: in_block as u32,
            len: n as usize,
        });
        pos += n;
    }
    out
}

/// The piece of a request that lies inside one block, if the whole request does.
pub(crate) fn single_piece(offset: u64, len: u64, bs: u64) -> Option<Piece> {
    let in_block = offset % bs;
    (len > 0 && in_block + len <= bs).then_some(Piece {
        vblock: VirtBlock(offset / bs),
        offset: in_block as u32,
        len: len as usize,
    })
}

/// Splits a scatter-gather list into consecutive pieces of the given lengths (which add up to
/// at most the list's length), borrowing disjoint parts of the same buffers.
pub(crate) fn split_mut<'a>(
    bufs: &'a mut [IoSliceMut<'_>],
    lens: &[usize],
) -> Vec<Vec<IoSliceMut<'a>>> {
    let mut out: Vec<Vec<IoSliceMut<'a>>> = Vec::with_capacity(lens.len());
    let mut want = lens.iter().copied();
    let mut need = want.next().unwrap_or(0);
    let mut cur: Vec<IoSliceMut<'a>> = Vec::new();
    for b in bufs.iter_mut() {
        let mut rest: &'a mut [u8] = &mut b[..];
        while !rest.is_empty() {
            if need == 0 {
                out.push(std::mem::take(&mut cur));
                match want.next() {
                    Some(n) => need = n,
                    None => return out,
                }
                continue;
            }
            let take = need.min(rest.len());
            let (head, tail) = rest.split_at_mut(take);
            cur.push(IoSliceMut::new(head));
            rest = tail;
            need -= take;
        }
    }
    if !cur.is_empty() || need == 0 {
        out.push(cur);
    }
    out
}

/// [`split_mut`] for write buffers.
pub(crate) fn split<'a>(bufs: &'a [IoSlice<'_>], lens: &[usize]) -> Vec<Vec<IoSlice<'a>>> {
    let mut out: Vec<Vec<IoSlice<'a>>> = Vec::with_capacity(lens.len());
    let mut want = lens.iter().copied();
    let mut need = want.next().unwrap_or(0);
    let mut cur: Vec<IoSlice<'a>> = Vec::new();
    for b in bufs {
        let mut rest: &'a [u8] = b;
        while !rest.is_empty() {
            if need == 0 {
                out.push(std::mem::take(&mut cur));
                match want.next() {
                    Some(n) => need = n,
                    None => return out,
                }
                continue;
            }
            let take = need.min(rest.len());
            cur.push(IoSlice::new(&rest[..take]));
            rest = &rest[take..];
            need -= take;
        }
    }
    if !cur.is_empty() || need == 0 {
        out.push(cur);
    }
    out
}

/// Unit in which [`nonzero_ranges`] looks for zeros: a page. It divides every block size
/// (multiples of 64 KiB) and is aligned for direct I/O on 512-byte and 4 KiB sectors (the
/// data file's direct path handles any unaligned rest itself, by read-modify-write).
pub(crate) const ZERO_UNIT: usize = 4096;

/// The byte ranges `(start, len)` of `buf` made of [`ZERO_UNIT`]s that are not all zeros,
/// neighbours merged, in order. A copy on write into a block that is a hole writes only
/// these: the rest reads as zeros already, and the new block stays as sparse as the old one.
/// A unit with a nonzero byte near its start costs a few comparisons; only zero units are
/// read whole.
pub(crate) fn nonzero_ranges(buf: &[u8]) -> Vec<(usize, usize)> {
    static ZEROS: [u8; ZERO_UNIT] = [0; ZERO_UNIT];
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, unit) in buf.chunks(ZERO_UNIT).enumerate() {
        if unit == &ZEROS[..unit.len()] {
            continue;
        }
        let at = i * ZERO_UNIT;
        match out.last_mut() {
            Some((start, len)) if *start + *len == at => *len += unit.len(),
            _ => out.push((at, unit.len())),
        }
    }
    out
}

/// A transfer between the data file and buffers: `len` bytes from byte `offset` of `block`,
/// possibly running on into the blocks after it.
pub(crate) struct Run<T> {
    pub(crate) block: DataBlock,
    pub(crate) offset: u32,
    pub(crate) len: u64,
    pub(crate) bufs: Vec<T>,
}

/// Merges neighbours (in the given order, which is the request's) that are contiguous in the
/// data file: the second starts at the byte where the first ends. Pieces of one request are
/// contiguous in the volume, so this happens exactly when their data blocks are consecutive
/// (inner pieces cover whole blocks).
pub(crate) fn coalesce<T>(runs: Vec<Run<T>>, bs: u64) -> Vec<Run<T>> {
    let mut out: Vec<Run<T>> = Vec::with_capacity(runs.len());
    for r in runs {
        if let Some(last) = out.last_mut() {
            let last_end = last.block.0 * bs + u64::from(last.offset) + last.len;
            if last_end == r.block.0 * bs + u64::from(r.offset) {
                last.len += r.len;
                last.bufs.extend(r.bufs);
                continue;
            }
        }
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::iov_len;

    #[test]
    fn pieces_cut_at_block_boundaries() {
        let ps = pieces(65000, 70000, 65536);
        let v: Vec<(u64, u32, usize)> = ps.iter().map(|p| (p.vblock.0, p.offset, p.len)).collect();
        assert_eq!(v, vec![(0, 65000, 536), (1, 0, 65536), (2, 0, 3928)]);
        assert!(pieces(10, 0, 4096).is_empty());
        assert_eq!(
            single_piece(4096 + 10, 100, 4096),
            Some(Piece {
                vblock: VirtBlock(1),
                offset: 10,
                len: 100
            })
        );
        assert_eq!(single_piece(4090, 10, 4096), None);
        assert_eq!(single_piece(0, 0, 4096), None);
        assert!(ps[1].whole(65536) && !ps[0].whole(65536));
    }

    #[test]
    fn split_keeps_order_and_lengths() {
        let mut a = vec![1u8; 5];
        let mut b = vec![2u8; 7];
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let parts = split_mut(&mut bufs, &[3, 6, 3]);
        let lens: Vec<Vec<usize>> = parts
            .iter()
            .map(|p| p.iter().map(|s| s.len()).collect())
            .collect();
        assert_eq!(lens, vec![vec![3], vec![2, 4], vec![3]]);
        let x = [9u8; 4];
        let wb = [IoSlice::new(&x), IoSlice::new(&x)];
        let parts = split(&wb, &[8]);
        assert_eq!(parts.len(), 1);
        assert_eq!(iov_len(&parts[0]), 8);
    }

    #[test]
    fn nonzero_ranges_skip_only_zero_units() {
        let mut b = vec![0u8; 16 * ZERO_UNIT];
        assert!(nonzero_ranges(&b).is_empty());
        // One byte makes its unit count, wherever it is in the unit.
        b[ZERO_UNIT - 1] = 1;
        b[2 * ZERO_UNIT] = 7;
        b[3 * ZERO_UNIT + 100] = 7;
        b[15 * ZERO_UNIT + 4095] = 3;
        assert_eq!(
            nonzero_ranges(&b),
            vec![
                (0, ZERO_UNIT),
                (2 * ZERO_UNIT, 2 * ZERO_UNIT),
                (15 * ZERO_UNIT, ZERO_UNIT)
            ]
        );
        b.fill(0xff);
        assert_eq!(nonzero_ranges(&b), vec![(0, 16 * ZERO_UNIT)]);
        // A short last unit keeps its own length.
        let mut short = vec![0u8; ZERO_UNIT + 10];
        short[ZERO_UNIT + 9] = 1;
        assert_eq!(nonzero_ranges(&short), vec![(ZERO_UNIT, 10)]);
    }

    #[test]
    fn coalesce_merges_only_contiguous_neighbours() {
        let run = |block: u64, offset: u32, len: u64| Run {
            block: DataBlock(block),
            offset,
            len,
            bufs: vec![len],
        };
        let merged = coalesce(
            vec![
                run(7, 100, 3996),
                run(8, 0, 4096),
                run(9, 0, 10),
                run(20, 0, 4096),
                run(22, 0, 4096),
                run(23, 0, 5),
            ],
            4096,
        );
        let v: Vec<(u64, u32, u64, Vec<u64>)> = merged
            .into_iter()
            .map(|r| (r.block.0, r.offset, r.len, r.bufs))
            .collect();
        assert_eq!(
            v,
            vec![
                (7, 100, 3996 + 4096 + 10, vec![3996, 4096, 10]),
                (20, 0, 4096, vec![4096]),
                (22, 0, 4101, vec![4096, 5]),
            ]
        );
    }
}
