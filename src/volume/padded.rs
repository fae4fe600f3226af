//! A value alone on its cache line.

/// `T` aligned (and so padded) to 128 bytes: two cores that write values in neighbouring
/// `Padded`s never write the same cache line. 128, not 64, because x86's adjacent-line
/// prefetcher pulls lines in pairs.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}
