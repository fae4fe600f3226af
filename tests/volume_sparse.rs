//! The data file stays sparse (issue 5): its allocated space (st_blocks) tracks the mapped
//! blocks; a partial write into a fresh block allocates only what it writes; after a discard
//! (or a delete) and a flush, the space is back in the host file system. And the layout: each
//! 1 MiB group of a volume lands on consecutive data blocks, whatever order it was written in.

mod volume_common;

use std::io::{IoSlice, IoSliceMut};

use uthin::device::BlockDevice;
use uthin::pool::Pool;
use uthin::units::{DevId, VirtBlock};
use uthin::volume::VolumePool;
use volume_common::{
    BS, create_opts, pattern, read_block, runtime, small_volume_pool, thin_check,
    uthin_check_volumes,
};

const DATA_BLOCKS: u64 = 512;
const VOL: u64 = 128 * BS;

/// Allocated bytes of the data file, and the same rounded to whole data blocks (ext4 may add
/// a few blocks of its own for the extent tree).
fn allocated(vp: &VolumePool) -> u64 {
    vp.data().allocated_bytes().unwrap()
}

fn assert_about(bytes: u64, blocks: u64, what: &str) {
    let want = blocks * BS;
    assert!(
        bytes >= want && bytes <= want + 64 * 1024,
        "{what}: {bytes} bytes allocated, {blocks} blocks ({want} bytes) mapped"
    );
}

#[test]
fn allocated_space_tracks_mapped_blocks_and_comes_back() {
    let (dir, vp) = small_volume_pool(DATA_BLOCKS);
    let rt = runtime();
    rt.block_on(async {
        vp.create_volume("a", VOL).await.unwrap();
        let a = vp.volume("a").unwrap();
        assert_eq!(allocated(&vp), 0, "a new pool's data file is all hole");

        // 64 whole blocks, in 1 MiB writes.
        let mib = pattern(1, 1 << 20);
        for i in 0..4u64 {
            a.write(i << 20, &[IoSlice::new(&mib)], false)
                .await
                .unwrap();
        }
        a.flush().await.unwrap();
        assert_about(allocated(&vp), 64, "after 64 whole blocks");

        // A partial write into a fresh block allocates the file system blocks it touches,
        // not 64 KiB: nothing is written but its bytes.
        a.write(100 * BS + 4096, &[IoSlice::new(&[7u8; 512])], false)
            .await
            .unwrap();
        a.flush().await.unwrap();
        let after_partial = allocated(&vp);
        assert!(
            after_partial - 64 * BS <= 8192,
            "a 512-byte write allocated {} bytes",
            after_partial - 64 * BS
        );

        // Discard half of the whole blocks: once the discard is committed, their space is back.
        a.discard(0, 32 * BS).await.unwrap();
        a.flush().await.unwrap();
        assert_about(
            allocated(&vp) - (after_partial - 64 * BS),
            32,
            "after discarding 32",
        );
        let mut b = vec![1u8; 32 * BS as usize];
        a.read(0, &mut [IoSliceMut::new(&mut b)]).await.unwrap();
        assert!(b.iter().all(|&x| x == 0), "discarded blocks read as zeros");

        // A snapshot shares; a copy-on-write of 8 blocks adds exactly 8.
        vp.snapshot("a", "s", false).await.unwrap();
        let before_cow = allocated(&vp);
        for i in 32..40u64 {
            a.write(i * BS + 10, &[IoSlice::new(&[9u8; 10])], false)
                .await
                .unwrap();
        }
        a.flush().await.unwrap();
        assert_about(allocated(&vp) - before_cow, 8, "after 8 copies");

        // Deleting the origin frees only what it held alone (the 8 copies and the partial
        // block); the snapshot keeps the rest.
        vp.delete_volume("a").await.unwrap();
        let s = vp.volume("s").unwrap();
        s.flush().await.unwrap();
        assert_about(allocated(&vp), 32, "after deleting the origin");
        // Deleting the snapshot frees everything.
        vp.delete_volume("s").await.unwrap();
        vp.commit().await.unwrap();
        assert!(
            allocated(&vp) <= 64 * 1024,
            "{} bytes left after deleting every volume",
            allocated(&vp)
        );
        uthin_check_volumes(&vp).unwrap();
        assert_eq!(vp.pool().status().unwrap().data_used_blocks, 0);
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}

/// A copy on write of a block that is mostly hole copies only its data: the new block takes
/// the old block's written pages and the new bytes' pages, not 64 KiB (ext4 copies; XFS and
/// btrfs clone, which takes no more either).
#[test]
fn a_copy_on_write_of_a_sparse_block_stays_sparse() {
    let (dir, vp) = small_volume_pool(DATA_BLOCKS);
    let rt = runtime();
    rt.block_on(async {
        vp.create_volume("a", VOL).await.unwrap();
        let a = vp.volume("a").unwrap();
        let old = pattern(3, 4096);
        a.write(3 * BS + 8192, &[IoSlice::new(&old)], false)
            .await
            .unwrap();
        a.write(5 * BS + 4096, &[IoSlice::new(&old)], false)
            .await
            .unwrap();
        a.flush().await.unwrap();
        vp.snapshot("a", "s", false).await.unwrap();

        // An aligned 4 KiB write and an unaligned 10-byte one, each into a shared block.
        let before = allocated(&vp);
        let new = pattern(4, 4096);
        a.write(3 * BS + 40960, &[IoSlice::new(&new)], false)
            .await
            .unwrap();
        a.write(5 * BS + 20000, &[IoSlice::new(&[9u8; 10])], false)
            .await
            .unwrap();
        a.flush().await.unwrap();
        let grew = allocated(&vp) - before;
        assert!(
            grew <= 4 * 4096 + 4096,
            "two copies on write of blocks holding 4 KiB each allocated {grew} bytes"
        );

        // Both volumes read what was written, and zeros everywhere else.
        let mut want_a3 = vec![0u8; BS as usize];
        want_a3[8192..12288].copy_from_slice(&old);
        want_a3[40960..45056].copy_from_slice(&new);
        let mut want_a5 = vec![0u8; BS as usize];
        want_a5[4096..8192].copy_from_slice(&old);
        want_a5[20000..20010].fill(9);
        let mut want_s3 = vec![0u8; BS as usize];
        want_s3[8192..12288].copy_from_slice(&old);
        let mut want_s5 = vec![0u8; BS as usize];
        want_s5[4096..8192].copy_from_slice(&old);
        let s = vp.volume("s").unwrap();
        for (v, block, want, what) in [
            (&a, 3, &want_a3, "origin, aligned"),
            (&a, 5, &want_a5, "origin, unaligned"),
            (&s, 3, &want_s3, "snapshot, aligned"),
            (&s, 5, &want_s5, "snapshot, unaligned"),
        ] {
            assert!(
                read_block(v, block).await == *want,
                "{what}: block {block} reads wrong"
            );
        }
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}

/// The data block of each virtual block of `dev` in `0..blocks` (all must be mapped).
fn layout(vp: &VolumePool, dev: DevId, blocks: u64) -> Vec<u64> {
    let pool = vp.pool();
    (0..blocks)
        .map(|v| {
            pool.lookup(dev, VirtBlock(v))
                .unwrap()
                .unwrap_or_else(|| panic!("block {v} of {dev} is not mapped"))
                .block
                .0
        })
        .collect()
}

/// Panics unless every group of 16 virtual blocks maps to 16 consecutive data blocks.
fn assert_groups_consecutive(map: &[u64], what: &str) {
    for (g, group) in map.chunks(16).enumerate() {
        let base = group[0];
        for (i, &b) in group.iter().enumerate() {
            assert_eq!(
                b,
                base + i as u64,
                "{what}: group {g} is not consecutive: {group:?}"
            );
        }
    }
}

#[test]
fn random_writes_place_each_group_on_consecutive_blocks() {
    let (dir, vp) = small_volume_pool(DATA_BLOCKS);
    let rt = runtime();
    let blocks = VOL / BS;
    rt.block_on(async {
        vp.create_volume("a", VOL).await.unwrap();
        vp.create_volume("b", VOL).await.unwrap();
        let (a, b) = (vp.volume("a").unwrap(), vp.volume("b").unwrap());
        // Every block of both volumes once, 4 KiB each, in one shuffled order (a fixed
        // permutation: 37 is prime to 2 * 128), the two volumes interleaved.
        for i in 0..2 * blocks {
            let k = (i * 37 + 11) % (2 * blocks);
            let (vol, v) = if k % 2 == 0 { (&a, k / 2) } else { (&b, k / 2) };
            vol.write(v * BS + 4096, &[IoSlice::new(&[k as u8; 4096])], false)
                .await
                .unwrap();
        }
        a.flush().await.unwrap();
        assert_groups_consecutive(&layout(&vp, a.dev(), blocks), "a");
        assert_groups_consecutive(&layout(&vp, b.dev(), blocks), "b");

        // After a snapshot, copies on write are placed the same way (new groups), and the
        // snapshot keeps the old blocks.
        vp.snapshot("a", "s", false).await.unwrap();
        let s = vp.volume("s").unwrap();
        let before = layout(&vp, a.dev(), blocks);
        for i in 0..blocks {
            let v = (i * 37 + 5) % blocks;
            a.write(v * BS, &[IoSlice::new(&[0xEE; 512])], false)
                .await
                .unwrap();
        }
        a.flush().await.unwrap();
        let after = layout(&vp, a.dev(), blocks);
        assert_groups_consecutive(&after, "a after copies");
        assert!(
            before.iter().zip(&after).all(|(x, y)| x != y),
            "every block copied"
        );
        assert_eq!(
            layout(&vp, s.dev(), blocks),
            before,
            "the snapshot kept its blocks"
        );

        // The data is where the layout says: read back both versions.
        for v in [0, 17, blocks - 1] {
            let mut got = vec![0u8; BS as usize];
            a.read(v * BS, &mut [IoSliceMut::new(&mut got)])
                .await
                .unwrap();
            assert!(got[..512].iter().all(|&x| x == 0xEE), "a block {v}");
            let k = (0..2 * blocks).find(|&k| k % 2 == 0 && k / 2 == v).unwrap();
            assert!(
                got[4096..8192].iter().all(|&x| x == k as u8),
                "a block {v} old part"
            );
            s.read(v * BS, &mut [IoSliceMut::new(&mut got)])
                .await
                .unwrap();
            assert!(got[..4096].iter().all(|&x| x == 0), "s block {v}");
        }
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}

/// More groups than a pool keeps open (4 096, `place::MAX_OPEN_GROUPS`): the oldest close,
/// giving their unused slots back as known holes (`Pool::release_zeroed`). A later partial
/// write into a closed group still lands on its run, and the rest of the block reads as
/// zeros. With a mapping cache too small to keep the first groups, the write finds the run
/// from the tree under the pool's lock.
#[test]
fn closed_groups_keep_their_runs_and_their_holes() {
    closed_groups_case(1024);
}

/// [`closed_groups_keep_their_runs_and_their_holes`] with a cache that keeps every group:
/// the write into a closed group finds its run in the cache and takes its slot with no pool
/// lock (`Shared::place_zeroed`, `Reserver::reserve_zeroed_at`).
#[test]
fn closed_groups_keep_their_runs_from_the_cache() {
    closed_groups_case(1 << 20);
}

fn closed_groups_case(cache_entries: usize) {
    const GROUPS: u64 = 4200;
    // Room for every group's run, and spare.
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(dir.path(), &create_opts(GROUPS * 16 + 256, 2 << 20)).unwrap();
    let vp = VolumePool::open(pool, cache_entries).unwrap();
    let rt = runtime();
    rt.block_on(async {
        vp.create_volume("a", GROUPS * 16 * BS).await.unwrap();
        let a = vp.volume("a").unwrap();
        // The first block of every group, in order: the first groups close as later ones open.
        for g in 0..GROUPS {
            a.write(
                g * 16 * BS + 8192,
                &[IoSlice::new(&pattern(g, 4096))],
                false,
            )
            .await
            .unwrap();
        }
        // The second block of the first 200 groups, most of them closed by now.
        for g in 0..200 {
            a.write(
                (g * 16 + 1) * BS,
                &[IoSlice::new(&pattern(GROUPS + g, 4096))],
                false,
            )
            .await
            .unwrap();
        }
        a.flush().await.unwrap();
        {
            let pool = vp.pool();
            let at = |v: u64| pool.lookup(a.dev(), VirtBlock(v)).unwrap().unwrap().block.0;
            for g in 0..200 {
                assert_eq!(at(g * 16 + 1), at(g * 16) + 1, "group {g} left its run");
            }
        }
        for g in 0..200 {
            let got = read_block(&a, g * 16 + 1).await;
            assert_eq!(&got[..4096], &pattern(GROUPS + g, 4096)[..], "group {g}");
            assert!(got[4096..].iter().all(|&x| x == 0), "group {g}: not zeros");
        }
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}

/// After a restart (empty mapping cache, no open groups), the rest of a half-written group
/// still goes to the group's run: its base comes from the tree.
#[test]
fn groups_stay_consecutive_across_a_restart() {
    let (dir, vp) = small_volume_pool(DATA_BLOCKS);
    let rt = runtime();
    let blocks = VOL / BS;
    // Even blocks first, odd ones after the restart, each half in a shuffled order.
    let half = |odd: u64| (0..blocks / 2).map(move |i| ((i * 37 + 3) % (blocks / 2)) * 2 + odd);
    rt.block_on(async {
        vp.create_volume("a", VOL).await.unwrap();
        let a = vp.volume("a").unwrap();
        for v in half(0) {
            a.write(v * BS, &[IoSlice::new(&[v as u8; 4096])], false)
                .await
                .unwrap();
        }
        a.flush().await.unwrap();
    });
    drop(vp.into_pool().expect("no other handle"));

    let vp = VolumePool::open(Pool::open(dir.path()).unwrap(), 1024).unwrap();
    rt.block_on(async {
        let a = vp.volume("a").unwrap();
        for v in half(1) {
            a.write(v * BS, &[IoSlice::new(&[v as u8; 4096])], false)
                .await
                .unwrap();
        }
        a.flush().await.unwrap();
        assert_groups_consecutive(&layout(&vp, a.dev(), blocks), "a after the restart");
        for v in 0..blocks {
            let mut got = vec![0u8; 4096];
            a.read(v * BS, &mut [IoSliceMut::new(&mut got)])
                .await
                .unwrap();
            assert!(got.iter().all(|&x| x == v as u8), "block {v}");
        }
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}
