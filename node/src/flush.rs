//! # Group flush of the index database
//!
//! Writes that must survive `kill -9` before they are acknowledged and have no log of their
//! own (Action Cache updates under the `always` fsync policy, blob index entries under it,
//! pack compaction) end with a flush of the sled database. A flush writes and
//! fsyncs sled's log: one device flush, whatever was written before it. [`GroupFlush`] lets
//! concurrent callers share one: a caller waits for the first flush that *starts* after its
//! call (that one covers its writes), and whoever finds no flush running starts it. Sixteen
//! concurrent updates then cost one or two device flushes instead of sixteen.
//!
//! [`GroupFlush::flush_async`] is the same for tasks: a waiter awaits the end of the flush it
//! needs instead of blocking a thread, so only the flush itself takes a blocking thread, once
//! per group.

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
    /// Ticks after every finished flush, for async waiters.
    finished: tokio::sync::watch::Sender<u64>,
}

enum Step {
    Done(Result<()>),
    Wait,
    Run(u64),
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
        Self(Arc::new(Inner { db, state: Mutex::new(State::default()), done: Condvar::new(), finished: tokio::sync::watch::Sender::new(0) }))
    }

    /// What a caller needing flush `needed` does next, given the state.
    fn next_step(s: &mut State, needed: u64) -> Step {
        if s.finished >= needed {
            return Step::Done(match &s.failed {
                Some(e) => Err(KilnError::Internal(format!("flushing the index failed: {e}"))),
                None => Ok(()),
            });
        }
        if s.running {
            return Step::Wait;
        }
        s.running = true;
        s.started += 1;
        Step::Run(s.started)
    }

    /// Runs flush `number` (blocking) and publishes its end.
    fn run(inner: &Inner, number: u64) {
        let result = inner.db.flush();
        metrics::counter!(m::INDEX_FLUSHES).increment(1);
        let mut s = inner.state.lock();
        s.running = false;
        s.finished = number;
        s.failed = result.err().map(|e| e.to_string());
        inner.done.notify_all();
        drop(s);
        inner.finished.send_replace(number);
    }

    /// [`Self::flush`] for async callers: awaits instead of blocking.
    pub async fn flush_async(&self) -> Result<()> {
        let mut ticks = self.0.finished.subscribe();
        let needed = self.0.state.lock().started + 1;
        loop {
            // Marked seen before the state is read: a flush ending after the read wakes us.
            ticks.borrow_and_update();
            let step = Self::next_step(&mut self.0.state.lock(), needed);
            match step {
                Step::Done(r) => return r,
                Step::Wait => {
                    ticks.changed().await.map_err(|_| KilnError::Internal("index flusher gone".into()))?;
                }
                Step::Run(number) => {
                    let inner = self.0.clone();
                    tokio::task::spawn_blocking(move || Self::run(&inner, number))
                        .await
                        .map_err(|e| KilnError::Internal(format!("index flush task: {e}")))?;
                }
            }
        }
    }

    /// Returns once everything written to the database before this call is on disk. Blocking.
    pub fn flush(&self) -> Result<()> {
        let inner = &*self.0;
        let mut s = inner.state.lock();
        // A flush numbered above the one started so far begins after this call: it covers
        // every write made before it.
        let needed = s.started + 1;
        loop {
            match Self::next_step(&mut s, needed) {
                Step::Done(r) => return r,
                Step::Wait => inner.done.wait(&mut s),
                Step::Run(number) => {
                    drop(s);
                    Self::run(inner, number);
                    s = inner.state.lock();
                }
            }
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

    /// Tasks and threads mixed: every call returns, each after a flush that started after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_and_blocking_callers_mix() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).flush_every_ms(None).open().unwrap();
        let gf = GroupFlush::new(db.clone());
        let tasks: Vec<_> = (0..16)
            .map(|t| {
                let gf = gf.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        let before = gf.0.state.lock().started;
                        gf.flush_async().await.unwrap();
                        assert!(gf.0.state.lock().finished > before, "task {t} returned before a flush that started after its call");
                    }
                })
            })
            .collect();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let gf = gf.clone();
                std::thread::spawn(move || (0..25).for_each(|_| gf.flush().unwrap()))
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(30), t).await.expect("a waiter hung").unwrap();
        }
        for t in threads {
            t.join().unwrap();
        }
        assert!(!gf.0.state.lock().running);
    }
}
