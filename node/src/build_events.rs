//! Build events at rest: each node's [`EventStore`] (a sled tree, flushed before a write returns)
//! and [`ClusterEvents`], which spreads a stream's events over the nodes of the ring.
//!
//! A stream's replicas are the first `replication_factor` live nodes in ring order of its id:
//! a write goes to the owners and, for each owner that cannot take it, to the next node of the
//! ring, and succeeds once `min(replication_factor, members)` nodes stored it. Reads and the
//! last-sequence lookup ask every member and merge, so an event is found wherever it landed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kiln_actors::event_stream::EventPersistence;
use kiln_proto::peer::{
    peer_client::PeerClient, BuildEventsResponse, GetBuildEventsRequest, PutBuildEventsRequest, StoredBuildEvent, PEER_VERSION,
};
use kiln_raft::network::PeerChannels;

use crate::error::{KilnError, Result};
use crate::placement::{Owner, Placement};
use crate::services::blocking;

/// This node's events: key `stream_id NUL sequence_number(u64, big-endian)`.
#[derive(Clone)]
pub struct EventStore {
    tree: sled::Tree,
}

fn key(stream: &str, seq: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 9);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(&(seq as u64).to_be_bytes());
    k
}

fn prefix(stream: &str) -> Vec<u8> {
    let mut k = stream.as_bytes().to_vec();
    k.push(0);
    k
}

fn seq_of(k: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[k.len() - 8..]);
    u64::from_be_bytes(b) as i64
}

impl EventStore {
    pub fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self { tree: db.open_tree("build_events").map_err(|e| KilnError::Internal(format!("opening the event store: {e}")))? })
    }

    /// Stores events (an event already stored is kept as it is) and flushes; returns the last
    /// sequence number stored for the stream.
    pub fn put(&self, stream: &str, events: &[(i64, Vec<u8>)]) -> Result<i64> {
        let err = |e: sled::Error| KilnError::Internal(format!("storing build events: {e}"));
        for (seq, data) in events {
            self.tree.compare_and_swap(key(stream, *seq), None::<&[u8]>, Some(&data[..])).map_err(err)?.ok();
        }
        self.tree.flush().map_err(err)?;
        self.last(stream)
    }

    pub fn last(&self, stream: &str) -> Result<i64> {
        let last = self.tree.scan_prefix(prefix(stream)).keys().next_back();
        match last {
            Some(k) => Ok(seq_of(&k.map_err(|e| KilnError::Internal(format!("reading build events: {e}")))?)),
            None => Ok(0),
        }
    }

    /// How many events of `stream` are stored here.
    pub fn count(&self, stream: &str) -> Result<i64> {
        let mut n = 0;
        for k in self.tree.scan_prefix(prefix(stream)).keys() {
            k.map_err(|e| KilnError::Internal(format!("reading build events: {e}")))?;
            n += 1;
        }
        Ok(n)
    }

    /// The streams stored here after `after` (in key order), at most `limit`, with their event
    /// counts.
    pub fn streams(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, i64)>> {
        let err = |e: sled::Error| KilnError::Internal(format!("listing build-event streams: {e}"));
        let mut out: Vec<(String, i64)> = Vec::new();
        let mut start = match after {
            Some(a) => {
                let mut k = prefix(a);
                // Past every key of `after`: its prefix ends in NUL, the next byte string is 0x01.
                *k.last_mut().expect("not empty") = 1;
                k
            }
            None => Vec::new(),
        };
        while out.len() < limit {
            let Some(first) = self.tree.range(start.clone()..).keys().next() else { break };
            let k = first.map_err(err)?;
            if k.len() <= 9 {
                break;
            }
            let stream = String::from_utf8_lossy(&k[..k.len() - 9]).into_owned();
            let n = self.count(&stream)?;
            start = prefix(&stream);
            *start.last_mut().expect("not empty") = 1;
            out.push((stream, n));
        }
        Ok(out)
    }

    /// Events after `after`, in order, at most `limit`.
    pub fn get(&self, stream: &str, after: i64, limit: usize) -> Result<Vec<(i64, Vec<u8>)>> {
        let mut out = Vec::new();
        for kv in self.tree.range(key(stream, after.max(0) + 1)..key(stream, i64::MAX)).take(limit) {
            let (k, v) = kv.map_err(|e| KilnError::Internal(format!("reading build events: {e}")))?;
            out.push((seq_of(&k), v.to_vec()));
        }
        Ok(out)
    }

    /// Drops the events of streams `keep` rejects (streams the index forgot) once they were
    /// rejected for `grace` (a replica may store a new stream's first events a moment before
    /// it applies the index entry). Visits at most `budget` keys from `from`; returns where to
    /// go on next time (None: the end was reached).
    pub fn sweep(
        &self,
        from: Option<Vec<u8>>,
        budget: usize,
        keep: impl Fn(&str) -> bool,
        suspects: &mut HashMap<String, Instant>,
        grace: Duration,
    ) -> Result<Option<Vec<u8>>> {
        let err = |e: sled::Error| KilnError::Internal(format!("sweeping build events: {e}"));
        let start = from.unwrap_or_default();
        let mut last = None;
        let mut dropped = 0u64;
        for k in self.tree.range(start..).keys().take(budget) {
            let k = k.map_err(err)?;
            last = Some(k.to_vec());
            if k.len() <= 9 {
                continue;
            }
            let stream = String::from_utf8_lossy(&k[..k.len() - 9]).into_owned();
            if keep(&stream) {
                suspects.remove(&stream);
                continue;
            }
            if suspects.len() >= MAX_SUSPECTS && !suspects.contains_key(&stream) {
                continue;
            }
            if suspects.entry(stream).or_insert_with(Instant::now).elapsed() >= grace {
                self.tree.remove(&k).map_err(err)?;
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::info!(dropped, "dropped events of forgotten build-event streams");
        }
        Ok(last.map(|mut k| {
            k.push(0);
            k
        }))
    }
}

const MAX_SUSPECTS: usize = 100_000;

/// The cluster's events, as the stream actors and the query API see them.
#[derive(Clone)]
pub struct ClusterEvents {
    pub local: EventStore,
    placement: Placement,
    channels: PeerChannels,
    node_id: u64,
}

impl ClusterEvents {
    pub fn new(local: EventStore, placement: Placement, channels: PeerChannels, node_id: u64) -> Self {
        Self { local, placement, channels, node_id }
    }

    /// Every member, in ring order of the stream (its owners first).
    fn ring_order(&self, stream: &str) -> Vec<Owner> {
        let ring = self.placement.ring();
        ring.owners(stream.as_bytes(), ring.members().len())
    }

    fn client(&self, o: &Owner) -> Result<PeerClient<tonic::transport::Channel>> {
        self.channels.client(&o.addr).map_err(|e| KilnError::Unavailable(format!("node {} at {}: {e}", o.id, o.addr)))
    }

    async fn put_on(&self, o: &Owner, stream: &str, events: &[(i64, Vec<u8>)]) -> Result<()> {
        if o.id == self.node_id {
            let (local, s, ev) = (self.local.clone(), stream.to_string(), events.to_vec());
            return blocking(move || local.put(&s, &ev)).await.map(|_| ());
        }
        let req = PutBuildEventsRequest {
            version: PEER_VERSION,
            stream: stream.to_string(),
            events: events.iter().map(|(s, d)| StoredBuildEvent { sequence_number: *s, ordered_build_event: d.clone() }).collect(),
        };
        self.client(o)?.put_build_events(req).await.map_err(|s| KilnError::Unavailable(format!("node {}: {}", o.id, s.message())))?;
        Ok(())
    }

    /// Events after `after` on node `o`, and its last sequence number.
    async fn get_from(&self, o: &Owner, stream: &str, after: i64, limit: usize) -> Result<(Vec<(i64, Vec<u8>)>, i64)> {
        if o.id == self.node_id {
            let (local, s) = (self.local.clone(), stream.to_string());
            return blocking(move || Ok((local.get(&s, after, limit)?, local.last(&s)?))).await;
        }
        let r = self.get_remote(o, stream, after, limit, false).await?;
        Ok((r.events.into_iter().map(|e| (e.sequence_number, e.ordered_build_event)).collect(), r.last_sequence_number))
    }

    /// How many events of `stream` node `o` stores.
    async fn count_at(&self, o: &Owner, stream: &str) -> Result<i64> {
        if o.id == self.node_id {
            let (local, s) = (self.local.clone(), stream.to_string());
            return blocking(move || local.count(&s)).await;
        }
        Ok(self.get_remote(o, stream, 0, 0, true).await?.event_count)
    }

    async fn get_remote(&self, o: &Owner, stream: &str, after: i64, limit: usize, count_events: bool) -> Result<BuildEventsResponse> {
        let req = GetBuildEventsRequest { version: PEER_VERSION, stream: stream.to_string(), after_sequence_number: after, limit: limit as u32, count_events };
        let r = self.client(o)?.get_build_events(req).await.map_err(|s| KilnError::Unavailable(format!("node {}: {}", o.id, s.message())))?;
        Ok(r.into_inner())
    }

    /// One repair pass over (a page of) the streams stored here: each of a stream's first
    /// `min(RF, members)` nodes in ring order that stores fewer of its events than this node
    /// gets them all again (stores keep what they have). Restores the replicas of a node that
    /// was down, and hands events written to a stand-in node back to their owner. Returns
    /// where the next pass goes on (None: from the start).
    pub async fn repair_pass(&self, after: Option<String>) -> Result<Option<String>> {
        const STREAMS_PER_PASS: usize = 200;
        const EVENTS_PER_PUSH: usize = 500;
        let local = self.local.clone();
        let from = after.clone();
        let page = blocking(move || local.streams(from.as_deref(), STREAMS_PER_PASS)).await?;
        let next = if page.len() < STREAMS_PER_PASS { None } else { page.last().map(|(s, _)| s.clone()) };
        for (stream, count) in page {
            let order = self.ring_order(&stream);
            let need = self.placement.replication_factor.min(order.len());
            for o in order.iter().take(need).filter(|o| o.id != self.node_id) {
                let theirs = match self.count_at(o, &stream).await {
                    Ok(n) => n,
                    Err(_) => continue, // down: a later pass
                };
                if theirs >= count {
                    continue;
                }
                let mut after = 0;
                loop {
                    let (local, s) = (self.local.clone(), stream.clone());
                    let events = blocking(move || local.get(&s, after, EVENTS_PER_PUSH)).await?;
                    let Some(&(last, _)) = events.last() else { break };
                    if let Err(e) = self.put_on(o, &stream, &events).await {
                        tracing::debug!(node = o.id, stream, error = %e, "build-event repair push failed");
                        break;
                    }
                    after = last;
                }
                tracing::info!(node = o.id, stream, had = theirs, now = count, "build-event replica repaired");
            }
        }
        Ok(next)
    }

    /// Stores events on `min(RF, members)` nodes, owners first.
    pub async fn persist(&self, stream: &str, events: Vec<(i64, Vec<u8>)>) -> Result<()> {
        let order = self.ring_order(stream);
        let need = self.placement.replication_factor.min(order.len()).max(1);
        let (first, rest) = order.split_at(need.min(order.len()));
        let results = futures::future::join_all(first.iter().map(|o| self.put_on(o, stream, &events))).await;
        let mut stored = 0;
        let mut errors = Vec::new();
        for (o, r) in first.iter().zip(results) {
            match r {
                Ok(()) => stored += 1,
                Err(e) => {
                    tracing::warn!(node = o.id, stream, error = %e, "a replica of a build-event stream is unreachable");
                    errors.push(e.to_string());
                }
            }
        }
        for o in rest {
            if stored >= need {
                break;
            }
            match self.put_on(o, stream, &events).await {
                Ok(()) => stored += 1,
                Err(e) => errors.push(e.to_string()),
            }
        }
        if stored < need {
            return Err(KilnError::Unavailable(format!(
                "build events of {stream} were stored on {stored} of the {need} nodes required: {}",
                errors.join("; ")
            )));
        }
        Ok(())
    }

    /// Events after `after`, merged from every member that answers, at most `limit`, without
    /// gaps (a missing number ends the page); plus the largest sequence number any stores.
    pub async fn read(&self, stream: &str, after: i64, limit: usize) -> Result<(Vec<(i64, Vec<u8>)>, i64)> {
        let order = self.ring_order(stream);
        let results = futures::future::join_all(order.iter().map(|o| self.get_from(o, stream, after, limit))).await;
        let mut merged: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
        let mut last = 0;
        let mut answered = 0;
        let mut errors = Vec::new();
        for r in results {
            match r {
                Ok((evs, l)) => {
                    answered += 1;
                    last = last.max(l);
                    for (s, d) in evs {
                        merged.entry(s).or_insert(d);
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if answered == 0 {
            return Err(KilnError::Unavailable(format!("no node answered for build events of {stream}: {}", errors.join("; "))));
        }
        let out = (after + 1..).zip(merged).take_while(|(want, (s, _))| s == want).map(|(_, e)| e).take(limit).collect();
        Ok((out, last))
    }

    pub async fn last_sequence(&self, stream: &str) -> Result<i64> {
        self.read(stream, i64::MAX - 1, 0).await.map(|(_, l)| l)
    }
}

/// The stream actors' view of [`ClusterEvents`].
pub struct Persistence(pub ClusterEvents);

impl EventPersistence for Persistence {
    fn last_sequence(&self, stream: &str) -> BoxFuture<'static, std::result::Result<i64, String>> {
        let (c, s) = (self.0.clone(), stream.to_string());
        Box::pin(async move { c.last_sequence(&s).await.map_err(|e| e.to_string()) })
    }

    fn persist(&self, stream: &str, events: Vec<(i64, Vec<u8>)>) -> BoxFuture<'static, std::result::Result<(), String>> {
        let (c, s) = (self.0.clone(), stream.to_string());
        Box::pin(async move { c.persist(&s, events).await.map_err(|e| e.to_string()) })
    }
}

/// Drops, now and then, the events of streams the index no longer lists.
pub async fn sweep_loop(events: EventStore, shared: Arc<kiln_raft::state_machine::SmShared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut from = None;
    let suspects = Arc::new(std::sync::Mutex::new(HashMap::new()));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (ev, sh, f, sus) = (events.clone(), shared.clone(), from.take(), suspects.clone());
        let r = tokio::task::spawn_blocking(move || {
            let mut sus = sus.lock().unwrap_or_else(|p| p.into_inner());
            ev.sweep(f, 10_000, |s| sh.read(|st| st.streams.get(s).is_some()), &mut sus, Duration::from_secs(300))
        })
        .await;
        match r {
            Ok(Ok(next)) => from = next,
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping build events failed"),
            Err(e) => tracing::warn!(error = %e, "sweeping build events failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_kept_once_in_order_per_stream_and_swept_with_their_stream() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let s = EventStore::open(&db).unwrap();
        assert_eq!(s.put("a", &[(1, b"one".to_vec()), (2, b"two".to_vec())]).unwrap(), 2);
        assert_eq!(s.put("a", &[(2, b"other".to_vec()), (3, b"three".to_vec())]).unwrap(), 3);
        assert_eq!(s.put("ab", &[(300, b"x".to_vec())]).unwrap(), 300);
        assert_eq!(s.last("a").unwrap(), 3, "a stream whose id extends another's stays apart");
        assert_eq!(s.last("zz").unwrap(), 0);
        assert_eq!(s.count("a").unwrap(), 3);
        assert_eq!(s.streams(None, 10).unwrap(), vec![("a".to_string(), 3), ("ab".to_string(), 1)]);
        assert_eq!(s.streams(Some("a"), 10).unwrap(), vec![("ab".to_string(), 1)]);
        assert_eq!(s.streams(None, 1).unwrap().len(), 1);
        let got = s.get("a", 1, 10).unwrap();
        assert_eq!(got, vec![(2, b"two".to_vec()), (3, b"three".to_vec())], "the first copy stays");
        assert_eq!(s.get("a", 0, 1).unwrap().len(), 1);
        let mut suspects = HashMap::new();
        let next = s.sweep(None, 100, |st| st == "ab", &mut suspects, Duration::from_secs(60)).unwrap();
        assert!(next.is_some());
        assert_eq!(s.last("a").unwrap(), 3, "an unindexed stream is kept through the grace period");
        s.sweep(None, 100, |st| st == "ab", &mut suspects, Duration::ZERO).unwrap();
        assert_eq!(s.last("a").unwrap(), 0);
        assert_eq!(s.last("ab").unwrap(), 300);
    }
}
