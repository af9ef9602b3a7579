//! A one-voter Raft on real sled files: proposals apply, survive a restart (log replay and
//! snapshot), and concurrent proposals share entries.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_raft::command::{ActionKey, Command, CommandResult, EnqueueCmd, RequestInfo};
use kiln_raft::scheduler::Stage;
use kiln_raft::{Consensus, RaftSettings};

fn settings(snapshot_every: u64) -> RaftSettings {
    RaftSettings {
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(150),
        election_timeout_max: Duration::from_millis(300),
        snapshot_every_entries: snapshot_every,
    }
}

fn enqueue(i: usize) -> Command {
    Command::Enqueue(EnqueueCmd {
        name: format!("op-{i}"),
        action: ActionKey { instance_name: String::new(), hash: format!("{i:064x}"), size: 1, digest_function: 1 },
        platform: vec![],
        priority: 0,
        do_not_cache: false,
        skip_cache_lookup: false,
        timeout_ms: 0,
        request: RequestInfo::default(),
        now_ms: 1000 + i as u64,
    })
}

async fn open(dir: &std::path::Path, snapshot_every: u64) -> Consensus {
    // After a shutdown in the same process, openraft's tasks may drop their handle on the
    // database a moment later: retry the lock briefly.
    let mut tries = 0;
    let db = loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => break db,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let members = BTreeMap::from([(1u64, openraft::BasicNode { addr: "127.0.0.1:1".into() })]);
    let c = Consensus::open(1, &db, &settings(snapshot_every), members).await.unwrap();
    assert_eq!(c.wait_for_leader(Duration::from_secs(10)).await, Some(1));
    c
}

#[tokio::test]
async fn proposals_survive_restart_through_log_replay_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = open(dir.path(), 20).await;
        // One at a time: 100 entries, past several snapshots (concurrent ones would share entries).
        for i in 0..100 {
            assert_eq!(c.propose(enqueue(i)).await.unwrap(), CommandResult::Enqueued { name: format!("op-{i}"), joined: false });
        }
        c.propose(Command::Cancel { op: "op-7".into(), now_ms: 5000 }).await.unwrap();
        assert_eq!(c.shared.read(|s| s.sched.ops.len()), 100);
        c.raft.shutdown().await.unwrap();
    }
    let c = open(dir.path(), 20).await;
    // The state is rebuilt from the last snapshot plus the log after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.shared.read(|s| s.sched.ops.len()) < 100 {
        assert!(tokio::time::Instant::now() < deadline, "state not restored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.shared.operation("op-7").unwrap().stage, Stage::Completed);
    assert_eq!(c.shared.operation("op-8").unwrap().stage, Stage::Queued);
    assert_eq!(c.shared.read(|s| s.sched.queue_len()), 99);
    let snap = c.raft.metrics().borrow().snapshot;
    assert!(snap.is_some(), "a snapshot was taken");
}

#[tokio::test]
async fn watchers_see_every_change_of_an_operation() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path(), 5000).await;
    c.propose(enqueue(1)).await.unwrap();
    let mut w = c.shared.watch("op-1").unwrap();
    assert_eq!(w.borrow_and_update().as_ref().unwrap().stage, Stage::Queued);
    c.propose(Command::Cancel { op: "op-1".into(), now_ms: 9 }).await.unwrap();
    w.changed().await.unwrap();
    assert_eq!(w.borrow().as_ref().unwrap().stage, Stage::Completed);
    assert!(c.shared.watch("op-unknown").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_share_entries_and_each_gets_its_own_result() {
    let dir = tempfile::tempdir().unwrap();
    let applied = |c: &Consensus| c.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
    {
        let c = open(dir.path(), 5000).await;
        let before = applied(&c);
        // Two claims of one operation in flight together: exactly one wins, as it would in
        // separate entries.
        let mut tasks = Vec::new();
        for i in 0..64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move { c.propose(enqueue(i)).await.unwrap() }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), CommandResult::Enqueued { name: format!("op-{i}"), joined: false });
        }
        let entries = applied(&c) - before;
        assert!(entries <= 32, "64 concurrent proposals took {entries} entries");
        c.propose(Command::CreateBotSession { name: "s1".into(), bot_id: "b1".into(), platform: vec![], now_ms: 2000 })
            .await
            .unwrap();
        let claims: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.propose(Command::Assign { session: "s1".into(), op: "op-3".into(), now_ms: 2001 }).await.unwrap() })
            })
            .collect();
        let mut won = 0;
        for t in claims {
            if t.await.unwrap() == CommandResult::Applied(true) {
                won += 1;
            }
        }
        assert_eq!(won, 1, "one claim of op-3 wins");
        c.raft.shutdown().await.unwrap();
    }
    // Batched entries replay to the same state.
    let c = open(dir.path(), 5000).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.shared.read(|s| s.sched.ops.len()) < 64 || c.shared.operation("op-3").map(|o| o.stage) != Some(Stage::Executing) {
        assert!(tokio::time::Instant::now() < deadline, "state not replayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.shared.read(|s| s.sched.queue_len()), 63);
}

#[tokio::test]
async fn commands_proposed_together_apply_in_order_in_one_entry_among_other_proposals() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path(), 5000).await;
    let applied = |c: &Consensus| c.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
    c.propose(Command::CreateBotSession { name: "s1".into(), bot_id: "b1".into(), platform: vec![], now_ms: 2000 }).await.unwrap();
    for i in 0..2 {
        c.propose(enqueue(i)).await.unwrap();
    }
    assert_eq!(
        c.propose(Command::Assign { session: "s1".into(), op: "op-0".into(), now_ms: 2001 }).await.unwrap(),
        CommandResult::Applied(true)
    );
    // A result and the next claim: the claim sees the session freed by the result before it.
    let before = applied(&c);
    let results = c
        .propose_together_anywhere(vec![
            Command::Complete { op: "op-0".into(), response: vec![], now_ms: 2002 },
            Command::Assign { session: "s1".into(), op: "op-1".into(), now_ms: 2002 },
        ])
        .await
        .unwrap();
    assert_eq!(results, vec![CommandResult::Applied(true), CommandResult::Applied(true)]);
    assert_eq!(applied(&c) - before, 1, "the pair took one entry");
    assert_eq!(c.shared.operation("op-1").map(|o| o.stage), Some(Stage::Executing));
    // Reversed, the claim finds the session busy: the order is kept.
    c.propose(enqueue(2)).await.unwrap();
    let results = c
        .propose_together_anywhere(vec![
            Command::Assign { session: "s1".into(), op: "op-2".into(), now_ms: 2003 },
            Command::Complete { op: "op-1".into(), response: vec![], now_ms: 2003 },
        ])
        .await
        .unwrap();
    assert_eq!(results, vec![CommandResult::Applied(false), CommandResult::Applied(true)]);

    // Groups and lone commands in flight at once share entries, flat; each caller gets its own
    // results: enqueueing the same action twice in a group joins the first.
    let mut tasks = Vec::new();
    for i in 10..42 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                vec![c.propose(enqueue(i)).await.unwrap()]
            } else {
                c.propose_together_anywhere(vec![enqueue(i), enqueue(i)]).await.unwrap()
            }
        }));
    }
    for (i, t) in (10..42).zip(tasks) {
        let name = format!("op-{i}");
        let want = if i % 2 == 0 {
            vec![CommandResult::Enqueued { name, joined: false }]
        } else {
            vec![CommandResult::Enqueued { name: name.clone(), joined: false }, CommandResult::Enqueued { name, joined: true }]
        };
        assert_eq!(t.await.unwrap(), want, "results of op-{i}");
    }
}

#[tokio::test]
async fn commands_proposed_together_go_one_by_one_while_a_member_cannot_read_batches() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path(), 5000).await;
    let applied = |c: &Consensus| c.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
    // A member that never answered has not said which command format it reads: it may be of
    // the release before batches.
    c.raft.add_learner(2, openraft::BasicNode { addr: "127.0.0.1:9".into() }, false).await.unwrap();
    let before = applied(&c);
    let results = c.propose_together_anywhere(vec![enqueue(1), enqueue(1)]).await.unwrap();
    assert_eq!(
        results,
        vec![CommandResult::Enqueued { name: "op-1".into(), joined: false }, CommandResult::Enqueued { name: "op-1".into(), joined: true }]
    );
    assert_eq!(applied(&c) - before, 2, "one entry per command");
}
