//! Value types: how a B-tree's fixed-size values are packed, and what they reference.
//!
//! A tree holds **one reference per leaf block** to whatever each of its values references.
//! So when a shared leaf is shadowed (copied), every value in it is `inc`ed (both copies now
//! reference it); when a value is overwritten or removed, or a leaf is freed, its reference is
//! `dec`ed. Inserting a value hands the caller's reference over to the tree (no `inc`).

use crate::check::RefCounter;
use crate::checksum::{read_le32, read_le64};
use crate::error::Result;
use crate::tm::TransactionManager;
use crate::{DiskBlock, MetaBlock};
use std::fmt::Debug;
use std::marker::PhantomData;

/// How values of a tree are stored and what they reference. Implement it for your own values
/// (dm-thin's device details are a plain 24-byte value).
pub trait ValueType: 'static {
    /// The value in memory.
    type Value: Clone + Debug + PartialEq;
    /// Size in bytes of one packed value (dm's `value_size`).
    const SIZE: usize;
    /// Packs `v` into `out` (`out.len() == SIZE`).
    fn pack(v: &Self::Value, out: &mut [u8]);
    /// Unpacks a value from `raw` (`raw.len() == SIZE`).
    fn unpack(raw: &[u8]) -> Self::Value;
    /// Takes one more reference on what `v` references (a leaf holding it was copied).
    fn inc(_tm: &mut TransactionManager, _v: &Self::Value) -> Result<()> {
        Ok(())
    }
    /// Releases one reference on what `v` references (it left a leaf, or its leaf was freed).
    fn dec(_tm: &mut TransactionManager, _v: &Self::Value) -> Result<()> {
        Ok(())
    }
    /// For checkers: counts what `v` references into `counter` (walking subtrees).
    fn count(_tm: &TransactionManager, _v: &Self::Value, _counter: &mut RefCounter) -> Result<()> {
        Ok(())
    }
}

/// A plain le64 value that references nothing.
#[derive(Debug)]
pub struct U64Value;

impl ValueType for U64Value {
    type Value = u64;
    const SIZE: usize = 8;
    fn pack(v: &u64, out: &mut [u8]) {
        out.copy_from_slice(&v.to_le_bytes());
    }
    fn unpack(raw: &[u8]) -> u64 {
        read_le64(raw, 0)
    }
}

/// A plain le32 value that references nothing (the space maps' reference-count trees use it).
#[derive(Debug)]
pub struct U32Value;

impl ValueType for U32Value {
    type Value = u32;
    const SIZE: usize = 4;
    fn pack(v: &u32, out: &mut [u8]) {
        out.copy_from_slice(&v.to_le_bytes());
    }
    fn unpack(raw: &[u8]) -> u32 {
        read_le32(raw, 0)
    }
}

/// A plain `N`-byte value that references nothing.
#[derive(Debug)]
pub struct BytesValue<const N: usize>;

impl<const N: usize> ValueType for BytesValue<N> {
    type Value = [u8; N];
    const SIZE: usize = N;
    fn pack(v: &[u8; N], out: &mut [u8]) {
        out.copy_from_slice(v);
    }
    fn unpack(raw: &[u8]) -> [u8; N] {
        let mut v = [0u8; N];
        v.copy_from_slice(raw);
        v
    }
}

/// A le64 value holding the root of another B-tree whose values are `V` (a tree of trees, like
/// dm-thin's top-level mapping tree: device id -> root of that device's block tree).
/// `inc` takes a reference on the subtree's root; `dec` releases it and deletes the subtree's
/// nodes (recursively, through `V`) that are no longer referenced.
#[derive(Debug)]
pub struct SubtreeRef<V: ValueType>(PhantomData<fn() -> V>);

impl<V: ValueType> ValueType for SubtreeRef<V> {
    type Value = MetaBlock;
    const SIZE: usize = 8;
    fn pack(v: &MetaBlock, out: &mut [u8]) {
        out.copy_from_slice(&v.0.to_le_bytes());
    }
    fn unpack(raw: &[u8]) -> MetaBlock {
        MetaBlock(read_le64(raw, 0))
    }
    fn inc(tm: &mut TransactionManager, v: &MetaBlock) -> Result<()> {
        tm.inc(*v)
    }
    fn dec(tm: &mut TransactionManager, v: &MetaBlock) -> Result<()> {
        super::BTree::<V>::open(*v).delete(tm)
    }
    fn count(tm: &TransactionManager, v: &MetaBlock, counter: &mut RefCounter) -> Result<()> {
        crate::check::count_btree::<V>(tm, *v, counter)
    }
}

/// A le64 value whose bits above `SHIFT` are a block of the transaction manager's data space
/// map, which counts the reference (with `SHIFT = 24`, dm-thin's `data_block << 24 | time`;
/// with `SHIFT = 0`, a plain data block number). The value itself is kept raw.
#[derive(Debug)]
pub struct DataRef<const SHIFT: u32>;

impl<const SHIFT: u32> DataRef<SHIFT> {
    /// The data block a raw value references.
    pub fn block(v: u64) -> DiskBlock {
        const { assert!(SHIFT < 64, "DataRef's SHIFT must be below 64") };
        DiskBlock(v >> SHIFT)
    }
}

impl<const SHIFT: u32> ValueType for DataRef<SHIFT> {
    type Value = u64;
    const SIZE: usize = 8;
    fn pack(v: &u64, out: &mut [u8]) {
        out.copy_from_slice(&v.to_le_bytes());
    }
    fn unpack(raw: &[u8]) -> u64 {
        read_le64(raw, 0)
    }
    fn inc(tm: &mut TransactionManager, v: &u64) -> Result<()> {
        tm.data_inc(Self::block(*v))
    }
    fn dec(tm: &mut TransactionManager, v: &u64) -> Result<()> {
        tm.data_dec(Self::block(*v))
    }
    fn count(_tm: &TransactionManager, v: &u64, counter: &mut RefCounter) -> Result<()> {
        counter.inc_data(Self::block(*v));
        Ok(())
    }
}
