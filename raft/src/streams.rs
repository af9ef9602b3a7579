//! The index of build-event streams: one record per stream (ids, first/last event time, event
//! count, finished), kept in Raft so that every node lists every stream. The events themselves
//! are not here: they are stored, replicated, by the nodes' event stores.
//!
//! [`StreamIndex::apply`] merges an update monotonically (counts and times only grow, a
//! finished stream stays finished), so updates from two nodes serving the same stream, one
//! after a client reconnected, may arrive in any order. The index is bounded: past
//! `max_streams`, the stream whose last event is oldest is forgotten.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What a node serving a stream reports about it: the record as that node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamUpdate {
    pub record: StreamRecord,
    /// The index keeps at most this many streams.
    pub max_streams: u64,
}

/// One stream's index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRecord {
    /// `build_id.component.invocation_id`.
    pub stream_id: String,
    pub build_id: String,
    pub invocation_id: String,
    /// The component's enum name (CONTROLLER, WORKER, TOOL).
    pub component: String,
    pub first_event_ms: u64,
    pub last_event_ms: u64,
    /// Highest sequence number stored (events start at 1, without gaps).
    pub event_count: u64,
    pub finished: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIndex {
    pub streams: BTreeMap<String, StreamRecord>,
    /// `(last_event_ms, stream_id)`: the eviction order.
    by_age: BTreeSet<(u64, String)>,
}

impl StreamIndex {
    /// Merges `u`; true if anything changed.
    pub fn apply(&mut self, update: &StreamUpdate) -> bool {
        let u = &update.record;
        let changed = match self.streams.get_mut(&u.stream_id) {
            Some(r) => {
                let before = r.clone();
                self.by_age.remove(&(r.last_event_ms, r.stream_id.clone()));
                r.first_event_ms = r.first_event_ms.min(u.first_event_ms);
                r.last_event_ms = r.last_event_ms.max(u.last_event_ms);
                r.event_count = r.event_count.max(u.event_count);
                r.finished |= u.finished;
                self.by_age.insert((r.last_event_ms, r.stream_id.clone()));
                *r != before
            }
            None => {
                self.by_age.insert((u.last_event_ms, u.stream_id.clone()));
                self.streams.insert(u.stream_id.clone(), u.clone());
                true
            }
        };
        while self.streams.len() as u64 > update.max_streams.max(1) {
            let Some((_, oldest)) = self.by_age.pop_first() else { break };
            self.streams.remove(&oldest);
        }
        changed
    }

    pub fn get(&self, stream_id: &str) -> Option<&StreamRecord> {
        self.streams.get(stream_id)
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(id: &str, first: u64, last: u64, count: u64, finished: bool) -> StreamUpdate {
        let record = StreamRecord {
            stream_id: id.into(),
            build_id: "b".into(),
            invocation_id: "i".into(),
            component: "TOOL".into(),
            first_event_ms: first,
            last_event_ms: last,
            event_count: count,
            finished,
        };
        StreamUpdate { record, max_streams: 3 }
    }

    #[test]
    fn updates_merge_in_any_order() {
        let ups = [update("s", 10, 20, 5, false), update("s", 5, 40, 9, true), update("s", 12, 30, 7, false)];
        let mut a = StreamIndex::default();
        let mut b = StreamIndex::default();
        for u in &ups {
            a.apply(u);
        }
        for u in ups.iter().rev() {
            b.apply(u);
        }
        assert_eq!(a, b);
        let r = a.get("s").unwrap();
        assert_eq!((r.first_event_ms, r.last_event_ms, r.event_count, r.finished), (5, 40, 9, true));
        assert!(!a.apply(&update("s", 6, 39, 8, false)), "an older report changes nothing");
    }

    #[test]
    fn the_stream_with_the_oldest_last_event_is_forgotten_first() {
        let mut ix = StreamIndex::default();
        ix.apply(&update("a", 1, 100, 1, false));
        ix.apply(&update("b", 1, 50, 1, false));
        ix.apply(&update("c", 1, 300, 1, false));
        ix.apply(&update("b", 1, 200, 2, false)); // b is newer than a now
        ix.apply(&update("d", 1, 400, 1, false));
        assert_eq!(ix.streams.keys().cloned().collect::<Vec<_>>(), ["b", "c", "d"]);
        assert_eq!(ix.by_age.len(), 3);
    }
}
