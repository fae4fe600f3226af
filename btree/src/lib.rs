//! uthin's persistent-data library: dm-thin's on-disk B-trees and space maps.
#![deny(missing_docs)]
