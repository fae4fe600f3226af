//! Many requests provisioning at once (issue 5, "Concurrency"): mapping inserts are applied by
//! whichever task holds the pool's write lock for everyone queued (`src/volume/combine.rs`),
//! and fresh writes into a placed group take their slot without the pool lock
//! (`Volume::plan_fresh_unlocked`). Whatever the interleaving, with flushes (commits) and a
//! snapshot in the middle, every write lands once, in its own block, and the pool checks clean.
//! A queued insert that nobody applies shows as a timeout, not a hang.

mod volume_common;

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use std::time::Duration;

use uthin::device::BlockDevice;
use uthin::volume::Volume;
use volume_common::{BS, pattern, runtime, small_volume_pool, thin_check, uthin_check_volumes};

/// Virtual blocks of the volume; every one is written once.
const BLOCKS: u64 = 512;
/// Writer tasks; task `t` writes the blocks `b` with `b % TASKS == t`, in a scrambled order.
const TASKS: u64 = 32;

/// The 4 KiB that block `b` gets, at an offset inside the block that depends on `b`.
fn chunk(b: u64) -> (u64, Vec<u8>) {
    (b * BS + (b * 7 % 16) * 4096, pattern(b, 4096))
}

async fn write_share(v: Arc<Volume>, t: u64) {
    let mine: Vec<u64> = (0..BLOCKS).filter(|b| b % TASKS == t).collect();
    for i in 0..mine.len() {
        // Stride through the task's blocks so that neighbours go to different moments.
        let b = mine[(i * 7 + t as usize) % mine.len()];
        let (off, data) = chunk(b);
        v.write(off, &[IoSlice::new(&data)], false).await.unwrap();
        if i % 5 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

#[test]
fn concurrent_fresh_writes_with_flushes_and_a_snapshot_all_land() {
    let (dir, vp) = small_volume_pool(2 * BLOCKS + 64);
    let rt = runtime();
    rt.block_on(async {
        vp.create_volume("a", BLOCKS * BS).await.unwrap();
        let a = Arc::new(vp.volume("a").unwrap());
        let run = async {
            let mut tasks = Vec::new();
            for t in 0..TASKS {
                tasks.push(tokio::spawn(write_share(a.clone(), t)));
            }
            // Commits hold the pool's write lock for their I/O while inserts keep coming.
            let flusher = {
                let a = a.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        a.flush().await.unwrap();
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            };
            tokio::time::sleep(Duration::from_millis(5)).await;
            vp.snapshot("a", "s", false).await.unwrap();
            for t in tasks {
                t.await.unwrap();
            }
            flusher.await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("writes still waiting after 120 s: a queued insert was never applied");
        a.flush().await.unwrap();

        let mut block = vec![0u8; BS as usize];
        for b in 0..BLOCKS {
            a.read(b * BS, &mut [IoSliceMut::new(&mut block)])
                .await
                .unwrap();
            let (off, data) = chunk(b);
            let at = (off - b * BS) as usize;
            assert_eq!(&block[at..at + 4096], &data[..], "block {b}: its write");
            assert!(
                block[..at]
                    .iter()
                    .chain(&block[at + 4096..])
                    .all(|&x| x == 0),
                "block {b}: bytes outside its write are not zero"
            );
        }
        // The snapshot has each block as it was when it was taken: written whole or not yet.
        let s = vp.volume("s").unwrap();
        let mut in_snapshot = 0;
        for b in 0..BLOCKS {
            s.read(b * BS, &mut [IoSliceMut::new(&mut block)])
                .await
                .unwrap();
            if block.iter().any(|&x| x != 0) {
                let (off, data) = chunk(b);
                let at = (off - b * BS) as usize;
                assert_eq!(&block[at..at + 4096], &data[..], "snapshot block {b}");
                in_snapshot += 1;
            }
        }
        assert_eq!(
            vp.pool().volume("s").unwrap().mapped_blocks,
            in_snapshot,
            "the snapshot maps exactly the blocks it shows"
        );
        let info = vp.pool().volume("a").unwrap();
        assert_eq!(info.mapped_blocks, BLOCKS, "every block mapped once");
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}
