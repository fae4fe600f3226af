//! The data file stays sparse (issue 5): its allocated space (st_blocks) tracks the mapped
//! blocks; a partial write into a fresh block allocates only what it writes; after a discard
//! (or a delete) and a flush, the space is back in the host file system.

mod volume_common;

use std::io::{IoSlice, IoSliceMut};

use uthin::device::BlockDevice;
use uthin::pool::Pool;
use uthin::volume::VolumePool;
use volume_common::{BS, create_opts, pattern, runtime, thin_check, uthin_check_volumes};

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
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(dir.path(), &create_opts(DATA_BLOCKS, 2 << 20)).unwrap();
    let vp = VolumePool::open(pool, 1024).unwrap();
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
