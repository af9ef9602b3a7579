//! The job actors on a real one-voter Raft: timers fire through proposals, and a crashed actor
//! is restarted by its supervisor and still finishes its job.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_actors::job::{JobSupervisor, SupervisorMsg};
use kiln_actors::{ActorContext, Proposer, Timeouts};
use kiln_raft::command::{ActionKey, Command, CommandResult, EnqueueCmd, RequestInfo};
use kiln_raft::scheduler::{code, Stage};
use kiln_raft::{Consensus, ProposeError, RaftSettings};
use kiln_proto::reapi::ExecuteResponse;
use prost::Message;
use ractor::Actor;

struct Local(Consensus);

impl Proposer for Local {
    fn propose(&self, cmd: Command) -> BoxFuture<'static, Result<CommandResult, ProposeError>> {
        let c = self.0.clone();
        Box::pin(async move { c.propose(cmd).await })
    }
    fn is_leader(&self) -> bool {
        self.0.is_leader()
    }
}

async fn consensus(dir: &std::path::Path) -> Consensus {
    let db = sled::Config::new().path(dir).open().unwrap();
    let settings = RaftSettings {
        heartbeat: Duration::from_millis(50),
        election_timeout_min: Duration::from_millis(150),
        election_timeout_max: Duration::from_millis(300),
        snapshot_every_entries: 1000,
    };
    let members = BTreeMap::from([(1u64, openraft::BasicNode { addr: "127.0.0.1:1".into() })]);
    let c = Consensus::open(1, &db, &settings, members).await.unwrap();
    c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    c
}

fn enqueue(name: &str, platform: Vec<(String, String)>) -> Command {
    Command::Enqueue(EnqueueCmd {
        name: name.into(),
        action: ActionKey { instance_name: String::new(), hash: name.into(), size: 1, digest_function: 1 },
        platform,
        priority: 0,
        do_not_cache: false,
        skip_cache_lookup: false,
        timeout_ms: 0,
        request: RequestInfo::default(),
        now_ms: kiln_actors::context::now_ms(),
    })
}

async fn wait_done(c: &Consensus, op: &str) -> ExecuteResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(o) = c.shared.operation(op) {
            if o.stage == Stage::Completed {
                return ExecuteResponse::decode(&o.response.unwrap()[..]).unwrap();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "operation {op} did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_crashed_job_actor_is_restarted_and_its_timers_still_end_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let c = consensus(dir.path()).await;
    let timeouts = Timeouts {
        orphan_grace: Duration::from_secs(2),
        unmatched_platform: Duration::from_secs(3600),
        tick: Duration::from_millis(100),
        ..Default::default()
    };
    let ctx = ActorContext { shared: c.shared.clone(), proposer: Arc::new(Local(c.clone())), timeouts };
    let (sup, _) = Actor::spawn(None, JobSupervisor, ctx).await.unwrap();
    c.propose(enqueue("orphan", vec![])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ractor::call!(sup, SupervisorMsg::Count).unwrap(), 1);

    sup.cast(SupervisorMsg::CrashJob("orphan".into())).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ractor::call!(sup, SupervisorMsg::Count).unwrap(), 1, "the job actor was restarted");

    // Nobody watches the operation: the restarted actor's orphan timer cancels it.
    let r = wait_done(&c, "orphan").await;
    assert_eq!(r.status.unwrap().code, code::CANCELLED);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ractor::call!(sup, SupervisorMsg::Count).unwrap(), 0, "finished jobs have no actor");
}

#[tokio::test]
async fn an_action_no_bot_can_run_fails_naming_the_properties() {
    let dir = tempfile::tempdir().unwrap();
    let c = consensus(dir.path()).await;
    let timeouts = Timeouts {
        orphan_grace: Duration::from_secs(3600),
        unmatched_platform: Duration::from_secs(1),
        tick: Duration::from_millis(100),
        ..Default::default()
    };
    let ctx = ActorContext { shared: c.shared.clone(), proposer: Arc::new(Local(c.clone())), timeouts };
    let (_sup, _) = Actor::spawn(None, JobSupervisor, ctx).await.unwrap();
    c.propose(Command::CreateBotSession {
        name: "s1".into(),
        bot_id: "b1".into(),
        platform: vec![("os".into(), "linux".into())],
        now_ms: 1,
    })
    .await
    .unwrap();
    c.propose(enqueue("gpu", vec![("gpu".into(), "a100".into())])).await.unwrap();
    c.propose(enqueue("linux", vec![("os".into(), "linux".into())])).await.unwrap();
    let r = wait_done(&c, "gpu").await;
    let st = r.status.unwrap();
    assert_eq!(st.code, code::FAILED_PRECONDITION);
    assert!(st.message.contains("gpu=a100"), "{}", st.message);
    assert_eq!(c.shared.operation("linux").unwrap().stage, Stage::Queued, "a matched action keeps waiting");
}
