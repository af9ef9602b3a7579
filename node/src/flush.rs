//! # Group flush of the index database
//!
//! Writes that must survive `kill -9` before they are acknowledged (Action Cache updates,
//! blobs kept inline in the index) end with a flush of the sled database. A flush writes and
//! fsyncs sled's log: one device flush, whatever was written before it. [`GroupFlush`] lets
//! concurrent callers share one: a caller waits for the first flush that *starts* after its
//! call (that one covers its writes), and whoever finds no flush running starts it. Sixteen
//! concurrent updates then cost one or two device flushes instead of sixteen.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{KilnError, Result};
use crate::metrics as m;

#[derive(Clone)]
pub struct GroupFlush(Arc<Inner>);

struct Inner {
    db: sled::Db,
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Number of the last flush started.
    started: u64,
    /// Number of the last flush finished, and its error if it failed.
    finished: u64,
    failed: Option<String>,
    running: bool,
}

impl GroupFlush {
    pub fn new(db: sled::Db) -> Self {
        Self(Arc::new(Inner { db, state: Mutex::new(State::default()), done: Condvar::new() }))
    }

    /// Returns once everything written to the database before this call is on disk. Blocking.
    pub fn flush(&self) -> Result<()> {
        let inner = &*self.0;
        let mut s = inner.state.lock();
        // A flush numbered above the one started so far begins after this call: it covers
        // every write made before it.
        let needed = s.started + 1;
        loop {
            if s.finished >= needed {
                return match &s.failed {
                    Some(e) => Err(KilnError::Internal(format!("flushing the index failed: {e}"))),
                    None => Ok(()),
                };
            }
            if s.running {
                inner.done.wait(&mut s);
                continue;
            }
            s.running = true;
            s.started += 1;
            let number = s.started;
            drop(s);
            let result = inner.db.flush();
            metrics::counter!(m::INDEX_FLUSHES).increment(1);
            s = inner.state.lock();
            s.running = false;
            s.finished = number;
            s.failed = result.err().map(|e| e.to_string());
            inner.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many callers at once: every call returns (no lost wake-up) and flushes were shared.
    #[test]
    fn concurrent_callers_all_return_and_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).flush_every_ms(None).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let gf = GroupFlush::new(db.clone());
        let calls = 8 * 50;
        std::thread::scope(|scope| {
            for t in 0..8u32 {
                let (gf, tree) = (gf.clone(), tree.clone());
                scope.spawn(move || {
                    for i in 0..50u32 {
                        tree.insert(format!("{t}-{i}"), &[1]).unwrap();
                        gf.flush().unwrap();
                    }
                });
            }
        });
        let s = gf.0.state.lock();
        assert!(!s.running && s.failed.is_none());
        assert!(s.finished >= 1 && s.finished <= calls, "{} flushes for {calls} calls", s.finished);
        assert_eq!(tree.len(), calls as usize);
    }
}
