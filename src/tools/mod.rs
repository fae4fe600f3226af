//! Offline tools over a pool's metadata: `check`, `dump` (thin_dump's XML) and the XML format
//! shared with thin_dump/thin_restore.

pub mod check;
pub mod delta;
pub mod dump;
pub mod restore;
pub mod xml;
