//! The data path with `DIR/data` on a block device (a loop device whose every byte starts as
//! 0xA5): a block device has no holes to detect, so every fresh block and every reused block
//! must read as zeros around a partial write, freed blocks are zeroed (BLKZEROOUT) instead of
//! punched, and the pool stays check-clean. Run with the page cache and with `--cache direct`
//! (O_DIRECT on the device; these buffers are not page-aligned, so through bounce buffers).

mod volume_common;

use std::io::IoSlice;

use uthin::data::CacheMode;
use uthin::device::BlockDevice;
use uthin::pool::Pool;
use uthin::volume::{Volume, VolumePool};
use volume_common::{
    BS, Loop, create_opts, pattern, read_block, runtime, thin_check, uthin_check_volumes,
};

/// Data blocks of the pool: two volumes of half each fill it exactly.
const DATA_BLOCKS: u64 = 128;
const HALF: u64 = DATA_BLOCKS / 2;
const GARBAGE: u8 = 0xA5;

/// Block `vblock` holds `data` at `at` and zeros everywhere else.
async fn assert_only(v: &Volume, vblock: u64, at: usize, data: &[u8], what: &str) {
    let b = read_block(v, vblock).await;
    assert_eq!(
        &b[at..at + data.len()],
        data,
        "{what}: block {vblock} lost its write"
    );
    let outside = |i: usize| i < at || i >= at + data.len();
    let stray = (0..b.len()).find(|&i| outside(i) && b[i] != 0);
    assert!(
        stray.is_none(),
        "{what}: block {vblock} has {:#x} at byte {} outside its write",
        stray.map_or(0, |i| b[i]),
        stray.unwrap_or(0)
    );
}

#[test]
fn fresh_and_reused_blocks_on_a_block_device_read_as_zeros() {
    run(CacheMode::Writeback);
}

#[test]
fn fresh_and_reused_blocks_on_a_block_device_read_as_zeros_direct() {
    run(CacheMode::Direct);
}

fn run(cache: CacheMode) {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("data.img");
    std::fs::write(&image, vec![GARBAGE; (DATA_BLOCKS * BS) as usize]).unwrap();
    let dev = Loop::attach(&image);
    let dir = tmp.path().join("pool");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&dev.0, dir.join("data")).unwrap();

    let pool = Pool::create(&dir, &create_opts(DATA_BLOCKS, 2 << 20)).unwrap();
    let vp = VolumePool::open_with(pool, 1024, cache).unwrap();
    assert_eq!(vp.data().cache_mode(), cache);
    let rt = runtime();
    rt.block_on(async {
        vp.create_volume("a", HALF * BS).await.unwrap();
        vp.create_volume("b", HALF * BS).await.unwrap();
        let a = vp.volume("a").unwrap();
        let b = vp.volume("b").unwrap();

        // Unmapped: zeros, whatever the device holds.
        assert!(read_block(&a, 0).await.iter().all(|&x| x == 0));

        // A partial write into a fresh block: the rest of the block is zeros, not 0xA5.
        let small = pattern(1, 512);
        a.write(3 * BS + 1000, &[IoSlice::new(&small)], false)
            .await
            .unwrap();
        assert_only(&a, 3, 1000, &small, "fresh block").await;

        // A copy on write of that block into another fresh block: the new block is written
        // whole, its zeros included (a device has no holes to leave them to).
        vp.snapshot("a", "s", false).await.unwrap();
        let later = pattern(3, 512);
        a.write(3 * BS + 40_000, &[IoSlice::new(&later)], false)
            .await
            .unwrap();
        let mut want = vec![0u8; BS as usize];
        want[1000..1512].copy_from_slice(&small);
        want[40_000..40_512].copy_from_slice(&later);
        assert!(
            read_block(&a, 3).await == want,
            "copied block holds something besides its two writes"
        );
        assert_only(&vp.volume("s").unwrap(), 3, 1000, &small, "snapshot").await;
        vp.delete_volume("s").await.unwrap();

        // Whole blocks, then discard them (and the partial one) and commit: their data blocks
        // go back to the pool, zeroed on the device.
        let whole = pattern(2, 5 * BS);
        a.write(4 * BS, &[IoSlice::new(&whole)], true)
            .await
            .unwrap();
        a.discard(3 * BS, 6 * BS).await.unwrap();
        a.flush().await.unwrap();
        for v in 3..9 {
            assert!(
                read_block(&a, v).await.iter().all(|&x| x == 0),
                "discarded block {v} reads as zeros"
            );
        }

        // Fill the pool with partial writes: every data block is used, so the freed ones
        // (which held pattern 2) are reused as well as never-used ones (0xA5).
        for v in 0..HALF {
            let at = (v as usize * 4096) % (BS as usize - 512);
            let data = pattern(100 + v, 512);
            a.write(v * BS + at as u64, &[IoSlice::new(&data)], false)
                .await
                .unwrap();
            let data_b = pattern(1000 + v, 512);
            b.write(v * BS + at as u64, &[IoSlice::new(&data_b)], false)
                .await
                .unwrap();
        }
        a.flush().await.unwrap();
        assert_eq!(vp.pool().status().unwrap().data_used_blocks, DATA_BLOCKS);
        for v in 0..HALF {
            let at = (v as usize * 4096) % (BS as usize - 512);
            assert_only(&a, v, at, &pattern(100 + v, 512), "a, pool full").await;
            assert_only(&b, v, at, &pattern(1000 + v, 512), "b, pool full").await;
        }

        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.join("metadata")).unwrap();
    drop(dev);
}
