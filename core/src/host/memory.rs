//! Shared data in memory for the core's tests, with Envoy's semantics and the failures
//! a real proxy produces injected on purpose.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};

use super::{Cas, SharedData, SharedDataError};

/// What another worker does to the store, run between a read and its write.
pub(crate) type OtherWriter = Box<dyn FnOnce(&MemorySharedData)>;

/// Shared data in memory with Envoy's semantics (see [`SharedData`]): a missing key reads
/// `(None, None)`, every write gives the key a new token, a write with a stale token is
/// refused, a write to a missing key stores. On top, what other workers and the host do
/// to a request in Envoy, injected on purpose:
/// - `between`: run after a get, before its caller can set (another worker writing
///   the same set in between), one per get while any are queued;
/// - `failing_gets` / `failing_sets`: that many of the next reads or writes fail.
#[derive(Default)]
pub(crate) struct MemorySharedData {
    pub(crate) values: RefCell<HashMap<String, (Vec<u8>, Cas)>>,
    pub(crate) last_cas: Cell<Cas>,
    pub(crate) between: RefCell<VecDeque<OtherWriter>>,
    pub(crate) failing_gets: Cell<u32>,
    pub(crate) failing_sets: Cell<u32>,
    pub(crate) gets: Cell<u32>,
    pub(crate) sets: Cell<u32>,
    pub(crate) mismatches: Cell<u32>,
}

impl SharedData for MemorySharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<Cas>), SharedDataError> {
        self.gets.set(self.gets.get() + 1);
        if self.failing_gets.get() > 0 {
            self.failing_gets.set(self.failing_gets.get() - 1);
            return Err(SharedDataError::Other);
        }
        let read = match self.values.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        };
        // Popped before running: the writer may read this store itself.
        let writer = self.between.borrow_mut().pop_front();
        if let Some(writer) = writer {
            writer(self);
        }
        Ok(read)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), SharedDataError> {
        self.sets.set(self.sets.get() + 1);
        if self.failing_sets.get() > 0 {
            self.failing_sets.set(self.failing_sets.get() - 1);
            return Err(SharedDataError::Other);
        }
        let mut values = self.values.borrow_mut();
        if let (Some((_, current)), Some(cas)) = (values.get(key), cas) {
            if *current != cas {
                self.mismatches.set(self.mismatches.get() + 1);
                return Err(SharedDataError::CasMismatch);
            }
        }
        self.last_cas.set(self.last_cas.get() + 1);
        values.insert(key.to_owned(), (value.to_vec(), self.last_cas.get()));
        Ok(())
    }
}

impl MemorySharedData {
    /// Queues `writer` to run between the next get not yet served and its set.
    pub(crate) fn then_between(&self, writer: impl FnOnce(&MemorySharedData) + 'static) {
        self.between.borrow_mut().push_back(Box::new(writer));
    }

    pub(crate) fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.values.borrow().get(key).map(|(v, _)| v.clone())
    }
}
