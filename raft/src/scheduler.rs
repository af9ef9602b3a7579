//! The scheduling state every node holds: operations, the execution queue, bot sessions.
//!
//! [`SchedulerState::apply`] is the whole transition function. It is deterministic (no clock,
//! no randomness, no I/O; ordered maps only) so that every node applying the same log holds the
//! same state, which the property tests below check by replaying random command sequences.

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::reapi::ExecuteResponse;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::command::{ActionKey, Command, CommandResult, EnqueueCmd, RequestInfo};

/// google.rpc.Code values used in failed operations.
pub mod code {
    pub const CANCELLED: i32 = 1;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const UNAVAILABLE: i32 = 14;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Stage {
    Queued,
    Executing,
    Completed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub name: String,
    pub action: ActionKey,
    pub platform: Vec<(String, String)>,
    pub priority: i32,
    pub do_not_cache: bool,
    pub timeout_ms: u64,
    pub request: RequestInfo,
    pub stage: Stage,
    /// Enqueue order: ties in priority run oldest first.
    pub seq: u64,
    pub queued_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub completed_at_ms: Option<u64>,
    /// The bot session holding the lease while executing.
    pub bot_session: Option<String>,
    /// How many times a bot took this operation.
    pub attempts: u32,
    /// The encoded ExecuteResponse once completed.
    pub response: Option<Vec<u8>>,
    /// Last time some client was known to watch it.
    pub last_watched_ms: u64,
    pub cancelled: bool,
}

impl Operation {
    pub fn lease_id(&self) -> String {
        format!("{}#{}", self.name, self.attempts)
    }

    pub fn is_done(&self) -> bool {
        self.stage == Stage::Completed
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotSession {
    pub name: String,
    pub bot_id: String,
    pub platform: Vec<(String, String)>,
    /// The operation it executes, if any.
    pub lease: Option<String>,
    pub created_ms: u64,
}

/// The replicated scheduling state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerState {
    pub ops: BTreeMap<String, Operation>,
    /// `(priority, seq, op)` of queued operations.
    queue: BTreeSet<(i32, u64, String)>,
    /// Unfinished, joinable operation per action.
    active_by_action: BTreeMap<ActionKey, String>,
    pub bots: BTreeMap<String, BotSession>,
    bot_by_id: BTreeMap<String, String>,
    next_seq: u64,
}

/// Whether a bot offering `bot` properties can run an action requiring `action` properties:
/// every required `(name, value)` must be offered.
pub fn platform_matches(action: &[(String, String)], bot: &[(String, String)]) -> bool {
    action.iter().all(|p| bot.contains(p))
}

fn failed_response(code: i32, message: &str) -> Vec<u8> {
    ExecuteResponse {
        status: Some(kiln_proto::rpc::Status { code, message: message.to_string(), details: vec![] }),
        ..Default::default()
    }
    .encode_to_vec()
}

impl SchedulerState {
    /// Queued operations in the order they should run.
    pub fn queued(&self) -> impl Iterator<Item = &Operation> {
        self.queue.iter().filter_map(|(_, _, n)| self.ops.get(n))
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// The first queued operation a bot with `platform` can run.
    pub fn next_for(&self, platform: &[(String, String)]) -> Option<&Operation> {
        self.queued().find(|op| platform_matches(&op.platform, platform))
    }

    /// Applies one command; returns its result and the operations it changed.
    pub fn apply(&mut self, cmd: &Command) -> (CommandResult, Vec<String>) {
        match cmd {
            Command::Enqueue(e) => self.enqueue(e),
            Command::CreateBotSession { name, bot_id, platform, now_ms } => {
                let mut changed = Vec::new();
                if let Some(old) = self.bot_by_id.get(bot_id).cloned() {
                    changed = self.drop_session(&old, "the bot started a new session", u32::MAX, *now_ms);
                }
                if self.bots.contains_key(name) {
                    changed.extend(self.drop_session(name, "the session was recreated", u32::MAX, *now_ms));
                }
                let mut platform = platform.clone();
                platform.sort();
                self.bots.insert(
                    name.clone(),
                    BotSession { name: name.clone(), bot_id: bot_id.clone(), platform, lease: None, created_ms: *now_ms },
                );
                self.bot_by_id.insert(bot_id.clone(), name.clone());
                (CommandResult::Applied(true), changed)
            }
            Command::Assign { session, op, now_ms } => {
                let ok = match (self.bots.get(session), self.ops.get(op)) {
                    (Some(b), Some(o)) => {
                        b.lease.is_none() && o.stage == Stage::Queued && platform_matches(&o.platform, &b.platform)
                    }
                    _ => false,
                };
                if !ok {
                    return (CommandResult::Applied(false), vec![]);
                }
                let o = self.ops.get_mut(op).expect("checked");
                self.queue.remove(&(o.priority, o.seq, o.name.clone()));
                o.stage = Stage::Executing;
                o.bot_session = Some(session.clone());
                o.attempts += 1;
                o.started_at_ms = Some(*now_ms);
                self.bots.get_mut(session).expect("checked").lease = Some(op.clone());
                (CommandResult::Applied(true), vec![op.clone()])
            }
            Command::Complete { op, response, now_ms } => {
                let done = self.finish(op, response.clone(), *now_ms);
                (CommandResult::Applied(done), if done { vec![op.clone()] } else { vec![] })
            }
            Command::BotGone { session, reason, max_attempts, now_ms } => {
                if !self.bots.contains_key(session) {
                    return (CommandResult::Applied(false), vec![]);
                }
                let changed = self.drop_session(session, reason, *max_attempts, *now_ms);
                (CommandResult::Applied(true), changed)
            }
            Command::Requeue { op, reason, max_attempts, now_ms } => {
                let ok = self.ops.get(op).is_some_and(|o| o.stage == Stage::Executing);
                if ok {
                    self.requeue(op, reason, *max_attempts, *now_ms);
                }
                (CommandResult::Applied(ok), if ok { vec![op.clone()] } else { vec![] })
            }
            Command::Fail { op, code, message, now_ms } => {
                let done = self.finish(op, failed_response(*code, message), *now_ms);
                (CommandResult::Applied(done), if done { vec![op.clone()] } else { vec![] })
            }
            Command::Cancel { op, now_ms } => {
                let done = self.finish(op, failed_response(code::CANCELLED, "the operation was cancelled"), *now_ms);
                if done {
                    self.ops.get_mut(op).expect("finished").cancelled = true;
                }
                (CommandResult::Applied(done), if done { vec![op.clone()] } else { vec![] })
            }
            Command::KeepAlive { ops, now_ms } => {
                for name in ops {
                    if let Some(o) = self.ops.get_mut(name) {
                        o.last_watched_ms = o.last_watched_ms.max(*now_ms);
                    }
                }
                (CommandResult::Applied(true), vec![])
            }
            Command::Delete { op } => {
                let Some(o) = self.ops.get(op) else { return (CommandResult::Applied(false), vec![]) };
                if !o.is_done() {
                    return (CommandResult::Applied(false), vec![]);
                }
                self.ops.remove(op);
                (CommandResult::Applied(true), vec![op.clone()])
            }
            Command::Prune { completed_before_ms } => {
                let gone: Vec<String> = self
                    .ops
                    .values()
                    .filter(|o| o.completed_at_ms.is_some_and(|t| t < *completed_before_ms))
                    .map(|o| o.name.clone())
                    .collect();
                for n in &gone {
                    self.ops.remove(n);
                }
                (CommandResult::Applied(!gone.is_empty()), gone)
            }
            // Not scheduling state: applied by the state machine to its stream index.
            // Both are applied by the state machine, which owns the stream index and unpacks
            // batches.
            Command::UpdateStream(_) | Command::Batch(_) => (CommandResult::None, vec![]),
        }
    }

    fn enqueue(&mut self, e: &EnqueueCmd) -> (CommandResult, Vec<String>) {
        if !e.do_not_cache {
            if let Some(existing) = self.active_by_action.get(&e.action) {
                let name = existing.clone();
                if let Some(o) = self.ops.get_mut(&name) {
                    o.last_watched_ms = o.last_watched_ms.max(e.now_ms);
                    // A joiner with a more urgent priority speeds the shared run up.
                    if o.stage == Stage::Queued && e.priority < o.priority {
                        self.queue.remove(&(o.priority, o.seq, name.clone()));
                        o.priority = e.priority;
                        self.queue.insert((o.priority, o.seq, name.clone()));
                    }
                }
                return (CommandResult::Enqueued { name, joined: true }, vec![]);
            }
        }
        if self.ops.contains_key(&e.name) {
            // A retried proposal of the same command: idempotent.
            return (CommandResult::Enqueued { name: e.name.clone(), joined: true }, vec![]);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut platform = e.platform.clone();
        platform.sort();
        let op = Operation {
            name: e.name.clone(),
            action: e.action.clone(),
            platform,
            priority: e.priority,
            do_not_cache: e.do_not_cache,
            timeout_ms: e.timeout_ms,
            request: e.request.clone(),
            stage: Stage::Queued,
            seq,
            queued_at_ms: e.now_ms,
            started_at_ms: None,
            completed_at_ms: None,
            bot_session: None,
            attempts: 0,
            response: None,
            last_watched_ms: e.now_ms,
            cancelled: false,
        };
        self.queue.insert((op.priority, seq, op.name.clone()));
        if !e.do_not_cache {
            self.active_by_action.insert(e.action.clone(), op.name.clone());
        }
        self.ops.insert(op.name.clone(), op);
        (CommandResult::Enqueued { name: e.name.clone(), joined: false }, vec![e.name.clone()])
    }

    /// Completes an unfinished operation with `response`. False if unknown or already done.
    fn finish(&mut self, name: &str, response: Vec<u8>, now_ms: u64) -> bool {
        let Some(o) = self.ops.get_mut(name) else { return false };
        if o.is_done() {
            return false;
        }
        self.queue.remove(&(o.priority, o.seq, o.name.clone()));
        if self.active_by_action.get(&o.action) == Some(&o.name) {
            self.active_by_action.remove(&o.action);
        }
        if let Some(s) = o.bot_session.take() {
            if let Some(b) = self.bots.get_mut(&s) {
                if b.lease.as_deref() == Some(name) {
                    b.lease = None;
                }
            }
        }
        o.stage = Stage::Completed;
        o.completed_at_ms = Some(now_ms);
        o.response = Some(response);
        true
    }

    /// Puts an executing operation back in the queue, or fails it after `max_attempts`.
    fn requeue(&mut self, name: &str, reason: &str, max_attempts: u32, now_ms: u64) {
        let Some(o) = self.ops.get_mut(name) else { return };
        if let Some(s) = o.bot_session.take() {
            if let Some(b) = self.bots.get_mut(&s) {
                if b.lease.as_deref() == Some(name) {
                    b.lease = None;
                }
            }
        }
        if o.attempts >= max_attempts {
            let msg = format!("the action lost its worker {} times (last: {reason})", o.attempts);
            self.finish(name, failed_response(code::UNAVAILABLE, &msg), now_ms);
            return;
        }
        o.stage = Stage::Queued;
        o.started_at_ms = None;
        self.queue.insert((o.priority, o.seq, o.name.clone()));
    }

    /// Removes a bot session, requeueing its lease.
    fn drop_session(&mut self, session: &str, reason: &str, max_attempts: u32, now_ms: u64) -> Vec<String> {
        let Some(b) = self.bots.remove(session) else { return vec![] };
        if self.bot_by_id.get(&b.bot_id).map(String::as_str) == Some(session) {
            self.bot_by_id.remove(&b.bot_id);
        }
        match b.lease {
            Some(op) if self.ops.get(&op).is_some_and(|o| o.stage == Stage::Executing) => {
                self.requeue(&op, reason, max_attempts, now_ms);
                vec![op]
            }
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(h: &str) -> ActionKey {
        ActionKey { instance_name: String::new(), hash: h.into(), size: 1, digest_function: 1 }
    }

    fn enq(name: &str, h: &str, prio: i32, platform: &[(&str, &str)]) -> Command {
        Command::Enqueue(EnqueueCmd {
            name: name.into(),
            action: key(h),
            platform: platform.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            priority: prio,
            do_not_cache: false,
            skip_cache_lookup: false,
            timeout_ms: 0,
            request: RequestInfo::default(),
            now_ms: 1,
        })
    }

    fn bot(name: &str, id: &str, platform: &[(&str, &str)]) -> Command {
        Command::CreateBotSession {
            name: name.into(),
            bot_id: id.into(),
            platform: platform.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            now_ms: 1,
        }
    }

    #[test]
    fn same_action_is_joined_and_priority_orders_the_queue() {
        let mut s = SchedulerState::default();
        assert_eq!(s.apply(&enq("a", "h1", 5, &[])).0, CommandResult::Enqueued { name: "a".into(), joined: false });
        assert_eq!(s.apply(&enq("b", "h1", 5, &[])).0, CommandResult::Enqueued { name: "a".into(), joined: true });
        s.apply(&enq("c", "h2", 1, &[]));
        let order: Vec<&str> = s.queued().map(|o| o.name.as_str()).collect();
        assert_eq!(order, ["c", "a"]);
    }

    #[test]
    fn first_claim_wins_and_platforms_must_match() {
        let mut s = SchedulerState::default();
        s.apply(&enq("a", "h1", 0, &[("os", "linux")]));
        s.apply(&bot("s1", "b1", &[("os", "linux"), ("arch", "x86")]));
        s.apply(&bot("s2", "b2", &[("os", "mac")]));
        assert_eq!(s.apply(&Command::Assign { session: "s2".into(), op: "a".into(), now_ms: 2 }).0, CommandResult::Applied(false));
        assert_eq!(s.apply(&Command::Assign { session: "s1".into(), op: "a".into(), now_ms: 2 }).0, CommandResult::Applied(true));
        s.apply(&bot("s3", "b3", &[("os", "linux")]));
        assert_eq!(s.apply(&Command::Assign { session: "s3".into(), op: "a".into(), now_ms: 2 }).0, CommandResult::Applied(false));
        assert_eq!(s.ops["a"].stage, Stage::Executing);
    }

    #[test]
    fn a_restarted_bot_replaces_its_session_and_the_lease_is_requeued_then_fails_after_retries() {
        let mut s = SchedulerState::default();
        s.apply(&enq("a", "h1", 0, &[]));
        for attempt in 1..=3u32 {
            let sess = format!("s{attempt}");
            s.apply(&bot(&sess, "b1", &[]));
            assert_eq!(s.bots.len(), 1, "the old session of b1 is gone");
            assert_eq!(s.apply(&Command::Assign { session: sess.clone(), op: "a".into(), now_ms: 2 }).0, CommandResult::Applied(true));
            s.apply(&Command::BotGone { session: sess, reason: "gone".into(), max_attempts: 3, now_ms: 3 });
        }
        let o = &s.ops["a"];
        assert!(o.is_done());
        let r = ExecuteResponse::decode(&o.response.clone().unwrap()[..]).unwrap();
        assert_eq!(r.status.unwrap().code, code::UNAVAILABLE);
    }

    #[test]
    fn complete_frees_the_bot_and_unjoins_the_action() {
        let mut s = SchedulerState::default();
        s.apply(&enq("a", "h1", 0, &[]));
        s.apply(&bot("s1", "b1", &[]));
        s.apply(&Command::Assign { session: "s1".into(), op: "a".into(), now_ms: 2 });
        assert_eq!(s.apply(&Command::Complete { op: "a".into(), response: vec![], now_ms: 3 }).0, CommandResult::Applied(true));
        assert_eq!(s.apply(&Command::Complete { op: "a".into(), response: vec![], now_ms: 3 }).0, CommandResult::Applied(false));
        assert!(s.bots["s1"].lease.is_none());
        // The same action again is a new operation now.
        assert_eq!(s.apply(&enq("b", "h1", 0, &[])).0, CommandResult::Enqueued { name: "b".into(), joined: false });
        s.apply(&Command::Prune { completed_before_ms: 10 });
        assert!(!s.ops.contains_key("a") && s.ops.contains_key("b"));
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let op = prop::sample::select(vec!["o1", "o2", "o3", "o4"]);
        let sess = prop::sample::select(vec!["s1", "s2", "s3"]);
        let h = prop::sample::select(vec!["h1", "h2", "h3"]);
        prop_oneof![
            (op.clone(), h, 0..3i32).prop_map(|(o, h, p)| enq(o, h, p, &[])),
            (sess.clone(), prop::sample::select(vec!["b1", "b2"])).prop_map(|(s, b)| bot(s, b, &[])),
            (sess.clone(), op.clone()).prop_map(|(s, o)| Command::Assign { session: s.into(), op: o.into(), now_ms: 5 }),
            op.clone().prop_map(|o| Command::Complete { op: o.into(), response: vec![1], now_ms: 6 }),
            sess.prop_map(|s| Command::BotGone { session: s.into(), reason: "x".into(), max_attempts: 2, now_ms: 7 }),
            op.clone().prop_map(|o| Command::Cancel { op: o.into(), now_ms: 8 }),
            op.prop_map(|o| Command::Delete { op: o.into() }),
            Just(Command::Prune { completed_before_ms: 7 }),
        ]
    }

    proptest! {
        /// Replaying the same log gives the same state, and the indexes stay consistent.
        #[test]
        fn apply_is_deterministic_and_keeps_invariants(cmds in prop::collection::vec(arb_command(), 0..60)) {
            let mut a = SchedulerState::default();
            let mut b = SchedulerState::default();
            for c in &cmds {
                prop_assert_eq!(a.apply(c), b.apply(c));
            }
            prop_assert_eq!(&a, &b);
            // Every queued entry is a queued operation and vice versa.
            let queued: BTreeSet<String> = a.queue.iter().map(|(_, _, n)| n.clone()).collect();
            for o in a.ops.values() {
                prop_assert_eq!(o.stage == Stage::Queued, queued.contains(&o.name));
                if o.stage == Stage::Executing {
                    let s = o.bot_session.as_ref().expect("executing has a session");
                    prop_assert_eq!(a.bots[s].lease.as_deref(), Some(o.name.as_str()));
                }
            }
            // A bot holds at most one lease, on an executing operation.
            for b in a.bots.values() {
                if let Some(l) = &b.lease {
                    prop_assert_eq!(a.ops[l].stage, Stage::Executing);
                }
            }
            // A snapshot round-trips.
            let enc = crate::codec::encode(1, &a);
            let (_, body) = crate::codec::split(&enc).unwrap();
            let back: SchedulerState = crate::codec::decode_body(body).unwrap();
            prop_assert_eq!(back, a);
        }
    }
}
