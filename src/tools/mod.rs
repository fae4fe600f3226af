//! Offline tools over a pool's metadata: `check` (and the XML format shared with
//! thin_dump/thin_restore).

pub mod xml;
