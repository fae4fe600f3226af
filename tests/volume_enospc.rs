//! Out of space (DESIGN invariant 10, issue 5): a write that needs a data block (or metadata
//! room for its mapping) when none is left fails with `NoSpace` (ENOSPC) and changes nothing;
//! reads, overwrites of owned blocks and flushes go on; after the pool grows, writes succeed
//! again. The metadata stays clean throughout (`uthin check`, thin_check).

mod volume_common;

use std::io::{IoSlice, IoSliceMut};

use uthin::device::{BlockDevice, DevError};
use uthin::pool::{CreateOptions, Pool, PoolError};
use uthin::units::VirtBlock;
use uthin::volume::{Drain, Volume, VolumePool};
use volume_common::{
    BS, create_opts, pattern, runtime, small_volume_pool, thin_check, uthin_check_volumes,
};

/// Reads the whole of `len` bytes of `v`.
async fn read_all(v: &Volume, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    v.read(0, &mut [IoSliceMut::new(&mut b)]).await.unwrap();
    b
}

fn is_enospc(e: &DevError) -> bool {
    matches!(e, DevError::NoSpace(_)) && e.errno() == libc::ENOSPC
}

#[test]
fn out_of_data_space_fails_cleanly_and_resumes_after_growth() {
    const DATA_BLOCKS: u64 = 48;
    const VOL: u64 = 96 * BS;
    let (dir, vp) = small_volume_pool(DATA_BLOCKS);
    let rt = runtime();
    rt.block_on(async {
        vp.create_volume("a", VOL).await.unwrap();
        let a = vp.volume("a").unwrap();
        let mut model = vec![0u8; VOL as usize];
        // Whole blocks, then partial ones, until the pool is full.
        let mut id = 1;
        let mut written = 0u64;
        let err = loop {
            let (off, len) = if written % 2 == 0 {
                (written * BS, BS)
            } else {
                (written * BS + 1000, 3000)
            };
            let data = pattern(id, len);
            id += 1;
            match a.write(off, &[IoSlice::new(&data)], false).await {
                Ok(()) => {
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    written += 1;
                }
                Err(e) => break e,
            }
            assert!(written <= DATA_BLOCKS, "wrote past the pool's size");
        };
        assert!(is_enospc(&err), "{err}");
        assert_eq!(written, DATA_BLOCKS, "every data block was used first");
        // The failed write changed nothing, and neither do more of them (a multi-block one too).
        assert_eq!(read_all(&a, VOL).await, model);
        let e = a
            .write(60 * BS + 5, &[IoSlice::new(&pattern(99, 3 * BS))], false)
            .await
            .unwrap_err();
        assert!(is_enospc(&e), "{e}");
        assert_eq!(read_all(&a, VOL).await, model);
        // Overwrites of owned blocks go on; flushes go on; the metadata is clean.
        let data = pattern(100, 5000);
        a.write(3 * BS + 7, &[IoSlice::new(&data)], true)
            .await
            .unwrap();
        model[(3 * BS + 7) as usize..(3 * BS + 7 + 5000) as usize].copy_from_slice(&data);
        a.flush().await.unwrap();
        assert_eq!(read_all(&a, VOL).await, model);
        uthin_check_volumes(&vp).unwrap();

        // A discard gives a block back once it is committed (and punched).
        a.discard(0, BS).await.unwrap();
        model[..BS as usize].fill(0);
        a.flush().await.unwrap();
        let data = pattern(101, 100);
        a.write(70 * BS, &[IoSlice::new(&data)], false)
            .await
            .unwrap();
        model[(70 * BS) as usize..(70 * BS + 100) as usize].copy_from_slice(&data);
        let e = a
            .write(71 * BS, &[IoSlice::new(&data)], false)
            .await
            .unwrap_err();
        assert!(is_enospc(&e), "{e}");

        // Growing the pool brings writes back.
        vp.grow_data(2 * DATA_BLOCKS * BS).await.unwrap();
        let data = pattern(102, 4 * BS);
        a.write(72 * BS, &[IoSlice::new(&data)], false)
            .await
            .unwrap();
        model[(72 * BS) as usize..(76 * BS) as usize].copy_from_slice(&data);
        a.flush().await.unwrap();
        assert_eq!(read_all(&a, VOL).await, model);
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}

#[test]
fn out_of_metadata_space_fails_cleanly_and_resumes_after_growth() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(
        dir.path(),
        &CreateOptions {
            // Far more data than 2 MiB of metadata can map (the file is sparse).
            data_size: 1_000_000 * BS,
            ..create_opts(1, 2 << 20)
        },
    )
    .unwrap();
    let vp = VolumePool::open(pool, 1024).unwrap();
    let rt = runtime();
    const VOL: u64 = 1 << 40;
    rt.block_on(async {
        vp.create_volume("a", VOL).await.unwrap();
        let dev = vp.pool().volume("a").unwrap().dev_id;
        // Fill the metadata quickly, straight through the pool: scattered virtual blocks make
        // many half-empty leaves. (Those blocks map data never written: they read as zeros.)
        let mapped = vp
            .exclusive(Drain::None, move |p| {
                let mut mapped = 0u64;
                loop {
                    match p.provision(dev, VirtBlock(mapped * 977 % 4_000_000)) {
                        Ok(_) => mapped += 1,
                        Err(PoolError::NoMetadataSpace) => return Ok(mapped),
                        Err(e) => return Err(e),
                    }
                    if mapped % 5000 == 0 {
                        p.commit()?;
                    }
                }
            })
            .await
            .unwrap();
        let a = vp.volume("a").unwrap();
        // Now through the volume layer: a write that needs a new mapping fails with ENOSPC...
        let fresh = 4_000_100 * BS;
        let e = a
            .write(fresh, &[IoSlice::new(&pattern(1, 4096))], false)
            .await
            .unwrap_err();
        assert!(is_enospc(&e), "{e}");
        let mut b = vec![1u8; 3 * BS as usize];
        a.read(fresh - BS, &mut [IoSliceMut::new(&mut b)])
            .await
            .unwrap();
        assert!(b.iter().all(|&x| x == 0), "the failed write left nothing");
        // ...while writes into mapped blocks, reads and flushes go on.
        let owned = 977 * BS;
        let data = pattern(2, 10_000);
        a.write(owned + 3, &[IoSlice::new(&data)], true)
            .await
            .unwrap();
        let mut got = vec![0u8; data.len()];
        a.read(owned + 3, &mut [IoSliceMut::new(&mut got)])
            .await
            .unwrap();
        assert_eq!(got, data);
        a.flush().await.unwrap();
        assert_eq!(vp.pool().volume("a").unwrap().mapped_blocks, mapped);
        uthin_check_volumes(&vp).unwrap();

        // Growing the metadata brings writes back.
        vp.grow_metadata(8 << 20).await.unwrap();
        let data = pattern(3, 4096);
        a.write(fresh, &[IoSlice::new(&data)], true).await.unwrap();
        let mut got = vec![0u8; 4096];
        a.read(fresh, &mut [IoSliceMut::new(&mut got)])
            .await
            .unwrap();
        assert_eq!(got, data);
        assert_eq!(vp.pool().volume("a").unwrap().mapped_blocks, mapped + 1);
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}

/// Blocks held back for the groups placed by virtual address (`volume/place.rs`) are the
/// pool's free space: a pool whose every free block is such a slot still takes writes
/// anywhere, until every block is mapped.
#[test]
fn slots_held_for_placed_groups_go_back_before_enospc() {
    const DATA_BLOCKS: u64 = 48;
    const VOL: u64 = 96 * BS;
    let (dir, vp) = small_volume_pool(DATA_BLOCKS);
    let rt = runtime();
    rt.block_on(async {
        vp.create_volume("a", VOL).await.unwrap();
        let a = vp.volume("a").unwrap();
        let mut model = vec![0u8; VOL as usize];
        let mut write = async |v: u64, id: u64| {
            let data = pattern(id, 4096);
            let off = v * BS + 512;
            let r = a.write(off, &[IoSlice::new(&data)], false).await;
            if r.is_ok() {
                model[off as usize..off as usize + 4096].copy_from_slice(&data);
            }
            r
        };
        // One block in each of three groups: their runs take the whole pool.
        for (i, v) in [0u64, 16, 32].into_iter().enumerate() {
            write(v, i as u64).await.unwrap();
        }
        // Every other block of the pool goes to other groups, one by one.
        for v in 48..48 + DATA_BLOCKS - 3 {
            write(v, v)
                .await
                .unwrap_or_else(|e| panic!("block {v}: {e}"));
        }
        let e = write(1, 1000).await.unwrap_err();
        assert!(is_enospc(&e), "{e}");
        a.flush().await.unwrap();
        assert_eq!(vp.pool().status().unwrap().data_used_blocks, DATA_BLOCKS);
        assert_eq!(read_all(&a, VOL).await, model);
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}

/// Deleting a volume gives the slots held for its placed groups back: another volume can
/// then use every block of the pool.
#[test]
fn deleting_a_volume_gives_its_group_slots_back() {
    const DATA_BLOCKS: u64 = 48;
    let (dir, vp) = small_volume_pool(DATA_BLOCKS);
    let rt = runtime();
    rt.block_on(async {
        vp.create_volume("a", 64 * BS).await.unwrap();
        vp.create_volume("b", 64 * BS).await.unwrap();
        let a = vp.volume("a").unwrap();
        for v in [0u64, 16, 32] {
            a.write(v * BS, &[IoSlice::new(&[1u8; 4096])], false)
                .await
                .unwrap();
        }
        vp.delete_volume("a").await.unwrap();
        vp.commit().await.unwrap();
        let b = vp.volume("b").unwrap();
        let data = pattern(7, DATA_BLOCKS * BS);
        b.write(0, &[IoSlice::new(&data)], true).await.unwrap();
        assert_eq!(read_all(&b, DATA_BLOCKS * BS).await, data);
        uthin_check_volumes(&vp).unwrap();
    });
    drop(vp);
    thin_check(&dir.path().join("metadata")).unwrap();
}
