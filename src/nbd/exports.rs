//! The export registry: which devices the server offers, under which names, and how many
//! connections use each one.
//!
//! The registry is shared between the NBD server and whoever owns the devices (`uthin serve`),
//! and changes while the server runs: an export added with [`Exports::add`] is offered to the
//! next client at once; [`Exports::remove`] stops offering it (connections already using it
//! keep it until they leave, see [`ExportHandle::wait_idle`] and
//! [`ExportHandle::close_connections`]); [`Exports::remove_if_idle`] removes it only when no
//! client uses it, atomically, so a delete can be refused without a race against a client that
//! is just connecting.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;
use tokio::sync::{Notify, watch};

use super::wire::MAX_STRING_LEN;

/// Why the registry refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// An export with this name is already offered.
    #[error("an NBD export named {0:?} already exists")]
    AlreadyExists(String),
    /// The name cannot be sent over NBD.
    #[error("invalid NBD export name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The description is longer than NBD's 4096-byte string limit.
    #[error("the description of NBD export {0:?} is longer than 4096 bytes")]
    DescriptionTooLong(String),
    /// No export has this name.
    #[error("no NBD export named {0:?}")]
    NotFound(String),
    /// The export has connected clients.
    #[error("NBD export {name:?} has {connections} connected client(s)")]
    Busy {
        /// The export's name.
        name: String,
        /// Connections using it when the removal was attempted.
        connections: usize,
    },
}

/// One export: a device offered under a name.
pub(crate) struct ExportEntry<D> {
    name: String,
    description: String,
    device: Arc<D>,
    /// Connections in transmission phase on this export.
    connections: AtomicUsize,
    /// Woken when `connections` drops to zero.
    idle: Notify,
    /// Set to ask every connection on this export to finish its in-flight requests and close.
    closing: watch::Sender<bool>,
}

impl<D> ExportEntry<D> {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn description(&self) -> &str {
        &self.description
    }

    pub(crate) fn device(&self) -> &Arc<D> {
        &self.device
    }
}

/// A handle on one export, returned when it is added or removed: its connection count, a way
/// to wait until the last client leaves (deferred deletion) and a way to make them leave.
pub struct ExportHandle<D>(Arc<ExportEntry<D>>);

impl<D> Clone for ExportHandle<D> {
    fn clone(&self) -> Self {
        ExportHandle(Arc::clone(&self.0))
    }
}

impl<D> fmt::Debug for ExportHandle<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportHandle")
            .field("name", &self.0.name)
            .field("connections", &self.connections())
            .finish()
    }
}

impl<D> ExportHandle<D> {
    /// The export's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The device behind the export.
    pub fn device(&self) -> &Arc<D> {
        &self.0.device
    }

    /// Number of connections currently in transmission phase on this export.
    pub fn connections(&self) -> usize {
        self.0.connections.load(Ordering::Acquire)
    }

    /// Waits until no connection uses the export. Meant after [`Exports::remove`]: no new
    /// connection can then attach, so once this returns the device is no longer used by NBD.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Asks every connection on this export to stop reading requests, finish the ones in
    /// flight and disconnect. New connections to the export are refused from now on (it
    /// behaves as if removed). Combine with [`ExportHandle::wait_idle`].
    pub fn close_connections(&self) {
        self.0.closing.send_replace(true);
    }
}

/// A connection's claim on an export: counted in [`ExportHandle::connections`] until dropped.
pub(crate) struct Lease<D> {
    entry: Arc<ExportEntry<D>>,
}

impl<D> Lease<D> {
    pub(crate) fn entry(&self) -> &ExportEntry<D> {
        &self.entry
    }

    /// A receiver that turns true when the export's connections are asked to close.
    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.entry.closing.subscribe()
    }
}

impl<D> Drop for Lease<D> {
    fn drop(&mut self) {
        if self.entry.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.entry.idle.notify_waiters();
        }
    }
}

struct Inner<D> {
    by_name: BTreeMap<String, Arc<ExportEntry<D>>>,
    /// The export a client gets when it asks for the empty name.
    default_name: Option<String>,
}

/// The set of exports a server offers. Cheap to share (`Arc<Exports<D>>`); every method may be
/// called while the server runs.
pub struct Exports<D> {
    inner: RwLock<Inner<D>>,
}

impl<D> Default for Exports<D> {
    fn default() -> Self {
        Exports {
            inner: RwLock::new(Inner {
                by_name: BTreeMap::new(),
                default_name: None,
            }),
        }
    }
}

impl<D> fmt::Debug for Exports<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.read();
        f.debug_struct("Exports")
            .field("names", &inner.by_name.keys().collect::<Vec<_>>())
            .field("default", &inner.default_name)
            .finish()
    }
}

/// Checks that `name` can be an export name: a non-empty protocol string (the empty name is
/// the client's way of asking for the default export).
fn check_name(name: &str) -> Result<(), ExportError> {
    let invalid = |reason| {
        Err(ExportError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("the empty name is reserved for the default export");
    }
    if name.len() > MAX_STRING_LEN {
        return invalid("longer than 4096 bytes");
    }
    if name.contains('\0') {
        return invalid("contains a NUL character");
    }
    Ok(())
}

impl<D> Exports<D> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers `device` under `name` from now on. `description` is shown by `nbdinfo --list`
    /// and `NBD_INFO_DESCRIPTION` (empty for none).
    pub fn add(
        &self,
        name: &str,
        device: Arc<D>,
        description: &str,
    ) -> Result<ExportHandle<D>, ExportError> {
        check_name(name)?;
        if description.len() > MAX_STRING_LEN {
            return Err(ExportError::DescriptionTooLong(name.to_owned()));
        }
        let mut inner = self.inner.write();
        if inner.by_name.contains_key(name) {
            return Err(ExportError::AlreadyExists(name.to_owned()));
        }
        let (closing, _) = watch::channel(false);
        let entry = Arc::new(ExportEntry {
            name: name.to_owned(),
            description: description.to_owned(),
            device,
            connections: AtomicUsize::new(0),
            idle: Notify::new(),
            closing,
        });
        inner.by_name.insert(name.to_owned(), Arc::clone(&entry));
        Ok(ExportHandle(entry))
    }

    /// Stops offering `name`. Connections already using it go on until they disconnect (or
    /// until [`ExportHandle::close_connections`]); the handle tells how many there are.
    pub fn remove(&self, name: &str) -> Option<ExportHandle<D>> {
        let mut inner = self.inner.write();
        if inner.default_name.as_deref() == Some(name) {
            inner.default_name = None;
        }
        inner.by_name.remove(name).map(ExportHandle)
    }

    /// Stops offering `name` only if no connection uses it; otherwise leaves it offered and
    /// says how many connections there are. Atomic with respect to clients connecting.
    pub fn remove_if_idle(&self, name: &str) -> Result<ExportHandle<D>, ExportError> {
        let mut inner = self.inner.write();
        let entry = inner
            .by_name
            .get(name)
            .ok_or_else(|| ExportError::NotFound(name.to_owned()))?;
        // Connections attach under the read lock; holding the write lock, the count is stable.
        let connections = entry.connections.load(Ordering::Acquire);
        if connections > 0 {
            return Err(ExportError::Busy {
                name: name.to_owned(),
                connections,
            });
        }
        if inner.default_name.as_deref() == Some(name) {
            inner.default_name = None;
        }
        inner
            .by_name
            .remove(name)
            .map(ExportHandle)
            .ok_or_else(|| ExportError::NotFound(name.to_owned()))
    }

    /// Makes `name` the export a client gets when it asks for the empty name (`None`: the
    /// empty name is refused).
    pub fn set_default(&self, name: Option<&str>) -> Result<(), ExportError> {
        let mut inner = self.inner.write();
        if let Some(n) = name {
            if !inner.by_name.contains_key(n) {
                return Err(ExportError::NotFound(n.to_owned()));
            }
        }
        inner.default_name = name.map(str::to_owned);
        Ok(())
    }

    /// The export offered under `name`, if any.
    pub fn get(&self, name: &str) -> Option<ExportHandle<D>> {
        self.inner
            .read()
            .by_name
            .get(name)
            .cloned()
            .map(ExportHandle)
    }

    /// Connections using the export `name` (`None` if it is not offered).
    pub fn connections(&self, name: &str) -> Option<usize> {
        self.get(name).map(|h| h.connections())
    }

    /// Names of the exports offered, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner.read().by_name.keys().cloned().collect()
    }

    /// The entry a client means by `requested` (the empty name is the default export), if it
    /// is offered and not closing.
    pub(crate) fn lookup(&self, requested: &str) -> Option<Arc<ExportEntry<D>>> {
        let inner = self.inner.read();
        Self::resolve(&inner, requested).cloned()
    }

    /// Like [`Exports::lookup`], and counts the caller as a connection of the export. Done
    /// under the registry lock so that [`Exports::remove_if_idle`] sees every connection.
    pub(crate) fn attach(&self, requested: &str) -> Option<Lease<D>> {
        let inner = self.inner.read();
        let entry = Self::resolve(&inner, requested)?;
        entry.connections.fetch_add(1, Ordering::AcqRel);
        Some(Lease {
            entry: Arc::clone(entry),
        })
    }

    /// `(name, description)` of every export offered, for `NBD_OPT_LIST`.
    pub(crate) fn list(&self) -> Vec<(String, String)> {
        self.inner
            .read()
            .by_name
            .values()
            .filter(|e| !*e.closing.borrow())
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }

    fn resolve<'a>(inner: &'a Inner<D>, requested: &str) -> Option<&'a Arc<ExportEntry<D>>> {
        let name = if requested.is_empty() {
            inner.default_name.as_deref()?
        } else {
            requested
        };
        inner.by_name.get(name).filter(|e| !*e.closing.borrow())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_unique() {
        let ex: Exports<u32> = Exports::new();
        assert!(matches!(
            ex.add("", Arc::new(1), ""),
            Err(ExportError::InvalidName { .. })
        ));
        assert!(matches!(
            ex.add("a\0b", Arc::new(1), ""),
            Err(ExportError::InvalidName { .. })
        ));
        assert!(matches!(
            ex.add(&"x".repeat(4097), Arc::new(1), ""),
            Err(ExportError::InvalidName { .. })
        ));
        ex.add("vol0", Arc::new(1), "first").unwrap();
        assert_eq!(
            ex.add("vol0", Arc::new(2), "").unwrap_err(),
            ExportError::AlreadyExists("vol0".into())
        );
        assert_eq!(ex.names(), vec!["vol0".to_string()]);
    }

    #[test]
    fn default_export_and_leases() {
        let ex: Exports<u32> = Exports::new();
        ex.add("vol0", Arc::new(7), "").unwrap();
        assert!(ex.attach("").is_none());
        ex.set_default(Some("vol0")).unwrap();
        let lease = ex.attach("").unwrap();
        assert_eq!(**lease.entry().device(), 7);
        assert_eq!(ex.connections("vol0"), Some(1));
        assert!(matches!(
            ex.remove_if_idle("vol0"),
            Err(ExportError::Busy { connections: 1, .. })
        ));
        drop(lease);
        assert_eq!(ex.connections("vol0"), Some(0));
        let h = ex.remove_if_idle("vol0").unwrap();
        assert_eq!(h.name(), "vol0");
        assert!(ex.attach("").is_none(), "the default goes with the export");
        assert!(ex.get("vol0").is_none());
    }

    #[test]
    fn wait_idle_returns_when_the_last_lease_goes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ex: Exports<u32> = Exports::new();
            ex.add("v", Arc::new(1), "").unwrap();
            let a = ex.attach("v").unwrap();
            let b = ex.attach("v").unwrap();
            let h = ex.remove("v").unwrap();
            assert!(ex.attach("v").is_none());
            assert_eq!(h.connections(), 2);
            let waiter = tokio::spawn({
                let h = h.clone();
                async move { h.wait_idle().await }
            });
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            drop(a);
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished());
            drop(b);
            waiter.await.unwrap();
            assert_eq!(h.connections(), 0);
        });
    }

    #[test]
    fn closing_exports_are_hidden() {
        let ex: Exports<u32> = Exports::new();
        let h = ex.add("v", Arc::new(1), "").unwrap();
        let lease = ex.attach("v").unwrap();
        let mut closing = lease.closing();
        assert!(!*closing.borrow_and_update());
        h.close_connections();
        assert!(closing.has_changed().unwrap());
        assert!(ex.attach("v").is_none());
        assert!(ex.list().is_empty());
    }
}
