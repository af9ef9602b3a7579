//! Three real `kiln serve` processes on loopback: any node serves all, and the cluster keeps
//! working when one node is killed.

mod common;

use std::time::Duration;

use common::*;
use kiln_proto::peer::peer_client::PeerClient;
use kiln_proto::peer::{StatusRequest, PEER_VERSION};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{Action, Command, Directory, ExecuteRequest, ExecuteResponse, FindMissingBlobsRequest, WaitExecutionRequest};
use prost::Message;

struct Node {
    proc: Option<KilnProcess>,
    client: ProcessClient,
    grpc: std::net::SocketAddr,
}

async fn start_cluster(dir: &std::path::Path) -> Vec<Node> {
    start_cluster_with(dir, "").await
}

fn node_config(dir: &std::path::Path, id: usize, port: u16, peers: &str, extra: &str) -> std::path::PathBuf {
    let cfg = dir.join(format!("node{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = {id}\nlisten = \"127.0.0.1:{port}\"\nhttp = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n\
             [raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 500\nelection_timeout_max_ms = 1000\nsnapshot_every_entries = 20\n\
             [worker]\nenabled = {}\nconcurrency = 2\n\
             [cluster]\nreplication_factor = 2\n{extra}peers = [\n{peers}]\n",
            free_port(),
            dir.join(format!("node{id}")).display(),
            id == 2
        ),
    )
    .unwrap();
    cfg
}

async fn start_cluster_with(dir: &std::path::Path, extra: &str) -> Vec<Node> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: String = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  {{ id = {}, address = \"127.0.0.1:{p}\" }},\n", i + 1))
        .collect();
    let mut nodes = Vec::new();
    let mut starting = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = i + 1;
        let cfg = node_config(dir, id, *port, &peers, extra);
        let grpc: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        starting.push(tokio::spawn(async move { (KilnProcess::serve(&cfg, grpc).await, grpc) }));
    }
    for s in starting {
        let ((p, c), grpc) = s.await.unwrap();
        nodes.push(Node { proc: Some(p), client: c, grpc });
    }
    wait_for_leader(&nodes).await;
    nodes
}

async fn leader_of(n: &Node) -> u64 {
    match PeerClient::new(n.client.channel.clone()).status(StatusRequest { version: PEER_VERSION }).await {
        Ok(s) => s.into_inner().leader_id,
        Err(_) => 0,
    }
}

async fn wait_for_leader(nodes: &[Node]) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut leaders = Vec::new();
        for n in nodes.iter().filter(|n| n.proc.is_some()) {
            leaders.push(leader_of(n).await);
        }
        if leaders.iter().all(|l| *l != 0 && *l == leaders[0]) {
            return leaders[0];
        }
        assert!(tokio::time::Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn upload_action(c: &ProcessClient, script: &str) -> kiln_proto::reapi::Digest {
    let cmd = Command { arguments: vec!["sh".into(), "-c".into(), script.into()], output_paths: vec!["out".into()], ..Default::default() }
        .encode_to_vec();
    let root = Directory::default().encode_to_vec();
    let act = Action { command_digest: Some(sha256(&cmd)), input_root_digest: Some(sha256(&root)), ..Default::default() }.encode_to_vec();
    for b in [&cmd, &root, &act] {
        c.write(&upload_resource("", &format!("a-{}", sha256(b).hash), &sha256(b)), b).await;
    }
    sha256(&act)
}

async fn run_to_end(mut s: tonic::Streaming<kiln_proto::longrunning::Operation>) -> ExecuteResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let op = tokio::time::timeout_at(deadline, s.message()).await.expect("operation finished in time").unwrap().unwrap();
        if op.done {
            match op.result.unwrap() {
                kiln_proto::longrunning::operation::Result::Response(a) => return ExecuteResponse::decode(&a.value[..]).unwrap(),
                e => panic!("{e:?}"),
            }
        }
    }
}

#[tokio::test]
async fn any_node_serves_all_and_one_node_may_die() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(dir.path()).await;

    // A blob written through node 3 is read through node 1, and present for node 2.
    let blobs: Vec<Vec<u8>> = (0..12).map(|i| pseudo_random(20_000 + i * 3000, 900 + i as u64)).collect();
    for (i, b) in blobs.iter().enumerate() {
        nodes[2].client.write(&upload_resource("", &format!("b{i}"), &sha256(b)), b).await;
    }
    for b in &blobs {
        assert_eq!(&nodes[0].client.read(&blob_resource("", &sha256(b))).await.unwrap(), b);
    }
    let missing = ContentAddressableStorageClient::new(nodes[1].client.channel.clone())
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: blobs.iter().map(|b| sha256(b)).collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert!(missing.is_empty(), "{missing:?}");

    // An action submitted through node 1 runs on node 2's worker and is awaited through node 3.
    let d = upload_action(&nodes[0].client, "echo clustered > out").await;
    let mut s = ExecutionClient::new(nodes[0].client.channel.clone())
        .execute(ExecuteRequest { action_digest: Some(d.clone()), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let name = s.message().await.unwrap().unwrap().name;
    let waited = ExecutionClient::new(nodes[2].client.channel.clone()).wait_execution(WaitExecutionRequest { name }).await.unwrap().into_inner();
    let r = run_to_end(waited).await.result.unwrap();
    drop(s);
    assert_eq!(r.exit_code, 0);
    assert_eq!(nodes[2].client.read(&blob_resource("", r.output_files[0].digest.as_ref().unwrap())).await.unwrap(), b"clustered\n");
    // The result is cached for every node.
    let cached = run_to_end(
        ExecutionClient::new(nodes[2].client.channel.clone())
            .execute(ExecuteRequest { action_digest: Some(d), ..Default::default() })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(cached.cached_result);

    // Kill the leader (not node 2, which hosts the worker) while an action is in flight.
    let leader = wait_for_leader(&nodes).await;
    let victim = if leader == 2 { 1 } else { leader as usize };
    let survivor_of = |v: usize| if v == 3 { 1 } else { 3 };
    let inflight = upload_action(&nodes[survivor_of(victim) - 1].client, "sleep 2; echo survived > out").await;
    let mut s = ExecutionClient::new(nodes[survivor_of(victim) - 1].client.channel.clone())
        .execute(ExecuteRequest { action_digest: Some(inflight), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let inflight_name = s.message().await.unwrap().unwrap().name;
    nodes[victim - 1].proc.take().unwrap().kill9();
    let survivors: Vec<usize> = (1..=3).filter(|i| *i != victim).collect();
    let live: Vec<&Node> = survivors.iter().map(|i| &nodes[i - 1]).collect();
    // The operation queued or running when the leader died still completes, seen from any survivor.
    for n in &live {
        let w = ExecutionClient::new(n.client.channel.clone())
            .wait_execution(WaitExecutionRequest { name: inflight_name.clone() })
            .await
            .unwrap()
            .into_inner();
        let r = run_to_end(w).await.result.unwrap();
        assert_eq!(n.client.read(&blob_resource("", r.output_files[0].digest.as_ref().unwrap())).await.unwrap(), b"survived\n");
    }
    drop(s);
    // Every acknowledged blob stays readable through each survivor (RF = 2).
    for n in &live {
        for b in &blobs {
            assert_eq!(&n.client.read(&blob_resource("", &sha256(b))).await.unwrap(), b, "through {}", n.grpc);
        }
    }
    // Scheduling continues under a new leader.
    let d = upload_action(&live[0].client, "echo after-failover > out").await;
    let r = run_to_end(
        ExecutionClient::new(live[0].client.channel.clone())
            .execute(ExecuteRequest { action_digest: Some(d), ..Default::default() })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(r.result.unwrap().exit_code, 0);

    // The killed node restarts and catches up with what it missed (snapshots every 20 entries
    // purge the log it lacks, so this goes through InstallSnapshot).
    let cfg = dir.path().join(format!("node{victim}.toml"));
    let grpc = nodes[victim - 1].grpc;
    let (p, c) = KilnProcess::serve(&cfg, grpc).await;
    nodes[victim - 1].proc = Some(p);
    nodes[victim - 1].client = c;
    let applied = |n: &Node| {
        let ch = n.client.channel.clone();
        async move { PeerClient::new(ch).status(StatusRequest { version: PEER_VERSION }).await.map(|s| s.into_inner().last_applied_index).unwrap_or(0) }
    };
    let target = applied(&nodes[survivors[0] - 1]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while applied(&nodes[victim - 1]).await < target {
        assert!(tokio::time::Instant::now() < deadline, "the restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn with_two_of_three_down_scheduling_is_refused_and_held_blobs_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(dir.path()).await;
    let members: Vec<(u64, std::net::SocketAddr)> = nodes.iter().enumerate().map(|(i, n)| (i as u64 + 1, n.grpc)).collect();
    // Four blobs node 1 owns and four it does not.
    let candidates: Vec<Vec<u8>> = (0..400).map(|i| pseudo_random(10_000 + i * 10, 700 + i as u64)).collect();
    let (mine, others): (Vec<Vec<u8>>, Vec<Vec<u8>>) = candidates.into_iter().partition(|b| owners_of(&sha256(b), &members).contains(&1));
    assert!(mine.len() >= 4 && others.len() >= 4, "400 blobs fall on both sides: {} and {}", mine.len(), others.len());
    let blobs: Vec<Vec<u8>> = mine.into_iter().take(4).chain(others.into_iter().take(4)).collect();
    for (i, b) in blobs.iter().enumerate() {
        nodes[0].client.write(&upload_resource("", &format!("s{i}"), &sha256(b)), b).await;
    }
    let d = upload_action(&nodes[0].client, "echo never > out").await;
    nodes[1].proc.take().unwrap().kill9();
    nodes[2].proc.take().unwrap().kill9();

    // No quorum: a scheduling write is refused with UNAVAILABLE, not left hanging.
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(40),
        ExecutionClient::new(nodes[0].client.channel.clone()).execute(ExecuteRequest { action_digest: Some(d), ..Default::default() }),
    )
    .await
    .expect("Execute answered instead of hanging");
    let e = match r {
        Err(e) => e,
        Ok(s) => s.into_inner().message().await.expect_err("no operation can be created without a quorum"),
    };
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(40));
    // The survivor still serves the blobs it owns. It kept no copy of the others, which it
    // forwarded to their owners as they arrived: asked for those, it says their owners cannot be
    // reached, not that they do not exist.
    let (mine, others) = blobs.split_at(4);
    for b in mine {
        assert_eq!(&nodes[0].client.read(&blob_resource("", &sha256(b))).await.unwrap(), b);
    }
    for b in others {
        let e = nodes[0].client.read(&blob_resource("", &sha256(b))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        let e = ContentAddressableStorageClient::new(nodes[0].client.channel.clone())
            .find_missing_blobs(FindMissingBlobsRequest { blob_digests: vec![sha256(b)], ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    }
}

#[tokio::test]
async fn an_upload_cut_off_on_one_node_resumes_through_another() {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    use kiln_proto::bytestream::QueryWriteStatusRequest;
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path()).await;
    // Large enough that the rest is hashed on a thread of its own, from the adopted state.
    let data = pseudo_random(12 << 20, 4242);
    let d = sha256(&data);
    let res = upload_resource("", "cross-node-upload", &d);
    let half = 1_300_000;
    // Through node 1: part of the blob, then the connection ends without finish_write.
    let reqs = write_requests(&res, &data[..half], 0, 64 << 10, false);
    ByteStreamClient::new(nodes[0].client.channel.clone()).write(futures::stream::iter(reqs)).await.unwrap();
    // Node 2 knows how far it got...
    let st = ByteStreamClient::new(nodes[1].client.channel.clone())
        .query_write_status(QueryWriteStatusRequest { resource_name: res.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.committed_size, st.complete), (half as i64, false));
    // ...and finishes it from there.
    let reqs = write_requests(&res, &data, half, 64 << 10, true);
    let committed = ByteStreamClient::new(nodes[1].client.channel.clone()).write(futures::stream::iter(reqs)).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, data.len() as i64);
    assert_eq!(nodes[2].client.read(&blob_resource("", &d)).await.unwrap(), data);
}

/// Which of `members` own `d` (the placement every node computes).
fn owners_of(d: &kiln_proto::reapi::Digest, members: &[(u64, std::net::SocketAddr)]) -> Vec<u64> {
    let ring = kiln_node::placement::Ring::new(1, members.iter().map(|(id, a)| (*id, a.to_string())).collect());
    let bd = kiln_node::digest::BlobDigest::from_proto(kiln_node::digest::DigestFunction::Sha256, d).unwrap();
    ring.owners(&bd.key(), 2).into_iter().map(|o| o.id).collect()
}

/// Whether node `n` holds `d` in its own store (peer call, no fan-out).
async fn holds(n: &ProcessClient, d: &kiln_proto::reapi::Digest) -> bool {
    let req = kiln_proto::peer::HasBlobsRequest {
        version: PEER_VERSION,
        digests: vec![kiln_proto::peer::BlobDigest { function: 1, hash: d.hash.clone(), size: d.size_bytes }],
        ..Default::default()
    };
    !PeerClient::new(n.channel.clone()).has_blobs(req).await.unwrap().into_inner().present.is_empty()
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn repair_restores_replicas_and_membership_changes_move_blobs() {
    let dir = tempfile::tempdir().unwrap();
    // Only passes something asked for run here: a replica push that failed, a start, a ring change.
    let mut nodes = start_cluster_with(dir.path(), "repair_interval_secs = 1\nrepair_full_interval_secs = 3600\n").await;
    let members: Vec<(u64, std::net::SocketAddr)> = nodes.iter().enumerate().map(|(i, n)| (i as u64 + 1, n.grpc)).collect();

    // Every node's first pass (due at start) is behind it: what follows must ask for passes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Node 3 is down while blobs are written: its share is acknowledged by the other owners.
    nodes[2].proc.take().unwrap().kill9();
    let mut blobs: Vec<Vec<u8>> = (0..16).map(|i| pseudo_random(4_000 + i * 100, 3100 + i as u64)).collect();
    for (i, b) in blobs.iter().enumerate() {
        nodes[0].client.write(&upload_resource("", &format!("h{i}"), &sha256(b)), b).await;
    }
    // And a batch: node 1 keeps the blobs node 3 was to hold, for its repair pass to push.
    let batch: Vec<Vec<u8>> = (0..16).map(|i| pseudo_random(2_000 + i * 100, 3200 + i as u64)).collect();
    let requests = batch
        .iter()
        .map(|b| kiln_proto::reapi::batch_update_blobs_request::Request { digest: Some(sha256(b)), data: b.clone(), compressor: 0 })
        .collect();
    let resp = ContentAddressableStorageClient::new(nodes[0].client.channel.clone())
        .batch_update_blobs(kiln_proto::reapi::BatchUpdateBlobsRequest { requests, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.responses.iter().all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)), "{resp:?}");
    assert!(batch.iter().any(|b| owners_of(&sha256(b), &members) == [2, 3] || owners_of(&sha256(b), &members) == [3, 2]), "a blob of nodes 2 and 3 only");
    blobs.extend(batch);
    // And a build-event stream node 3 is an owner of: its events land on the two nodes up.
    let ring = kiln_node::placement::Ring::new(1, members.iter().map(|(id, a)| (*id, a.to_string())).collect());
    let build = (0..).map(|i| format!("repair-{i}")).find(|b| ring.owners(format!("{b}.3.inv").as_bytes(), 2).iter().any(|o| o.id == 3)).unwrap();
    let sid = format!("{build}.3.inv");
    let id = common::bes::stream(&build, "inv", common::bes::TOOL);
    let (acks, end) =
        common::bes::publish(&nodes[0].client.channel, (1..=6).map(|s| common::bes::tool_event(&id, s, b"e", s == 6)).collect()).await;
    end.unwrap();
    assert_eq!(acks.len(), 6);
    // It comes back and gets every blob it owns, and its events, from the repair passes of the others.
    let cfg3 = dir.path().join("node3.toml");
    let (p3, c3) = KilnProcess::serve(&cfg3, nodes[2].grpc).await;
    nodes[2].proc = Some(p3);
    nodes[2].client = c3;
    for b in &blobs {
        let d = sha256(b);
        if owners_of(&d, &members).contains(&3) {
            eventually("node 3 got its replicas back", async || holds(&nodes[2].client, &d).await).await;
        }
    }
    eventually("node 3 got the stream's events back", async || {
        let req = kiln_proto::peer::GetBuildEventsRequest { version: PEER_VERSION, stream: sid.clone(), after_sequence_number: 0, limit: 100, count_events: false };
        PeerClient::new(nodes[2].client.channel.clone()).get_build_events(req).await.is_ok_and(|r| r.into_inner().events.len() == 6)
    })
    .await;

    // A fourth node joins; blobs it now owns move to it.
    let port4 = free_port();
    let peers: String = members.iter().map(|(id, a)| format!("  {{ id = {id}, address = \"{a}\" }},\n")).collect();
    let cfg4 = node_config(dir.path(), 4, port4, &peers, "join = true\nrepair_interval_secs = 1\nrepair_full_interval_secs = 3600\n");
    let addr4: std::net::SocketAddr = format!("127.0.0.1:{port4}").parse().unwrap();
    let (_p4, c4) = KilnProcess::serve(&cfg4, addr4).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["cluster", "add", "--endpoint", &format!("grpc://{}", nodes[0].grpc), "--id", "4", "--address", &addr4.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "kiln cluster add: {}", String::from_utf8_lossy(&out.stderr));
    let mut four = members.clone();
    four.push((4, addr4));
    let moved: Vec<_> = blobs.iter().map(|b| sha256(b)).filter(|d| owners_of(d, &four).contains(&4)).collect();
    assert!(!moved.is_empty(), "some of 16 blobs belong to the new node");
    for d in &moved {
        eventually("the new member got its share", async || holds(&c4, d).await).await;
    }
    // Every blob stays readable through every node.
    for b in &blobs {
        assert_eq!(&c4.read(&blob_resource("", &sha256(b))).await.unwrap(), b);
    }
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["cluster", "status", "--endpoint", &format!("grpc://{addr4}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&addr4.to_string()) && text.matches("SERVING").count() >= 4, "{text}");

    // And leaves again.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["cluster", "remove", "--endpoint", &format!("grpc://{}", nodes[1].grpc), "--id", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "kiln cluster remove: {}", String::from_utf8_lossy(&out.stderr));
    for b in &blobs {
        assert_eq!(&nodes[1].client.read(&blob_resource("", &sha256(b))).await.unwrap(), b);
    }
}

#[tokio::test]
async fn a_build_event_stream_resent_through_another_node_is_stored_once_and_survives_a_node_loss() {
    use common::bes::*;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster(dir.path()).await;
    let id = stream("cluster-build", "cluster-inv", TOOL);
    let sid = "cluster-build.3.cluster-inv";
    // Through node 1: events 1-5, then the client loses the connection.
    let (acks, end) = publish(&nodes[0].client.channel, (1..=5).map(|s| tool_event(&id, s, format!("e{s}").as_bytes(), false)).collect()).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2, 3, 4, 5]);
    // Through node 2: it resends from 3 and goes on to the end.
    let resent = (3..=9).map(|s| tool_event(&id, s, format!("e{s}").as_bytes(), s == 9)).collect();
    let (acks, end) = publish(&nodes[1].client.channel, resent).await;
    end.unwrap();
    assert_eq!(acks, vec![3, 4, 5, 6, 7, 8, 9]);
    // Through node 3: listed finished, and read back once each, in order.
    let seqs = |evs: &[kiln_proto::events::Event]| evs.iter().map(|e| e.sequence_number).collect::<Vec<_>>();
    let events = read_all(&nodes[2].client.channel, sid).await.unwrap();
    assert_eq!(seqs(&events), (1..=9).collect::<Vec<_>>());
    let listed = kiln_proto::events::build_events_client::BuildEventsClient::new(nodes[2].client.channel.clone())
        .list_streams(kiln_proto::events::ListStreamsRequest { pattern: "cluster-inv$".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.streams.iter().map(|s| (s.stream_id.as_str(), s.event_count, s.finished)).collect::<Vec<_>>(), vec![(sid, 9, true)]);
    // Each event is on two nodes: whichever node dies, the survivors still read them all.
    // Node 1 took the first events in; it is the one killed.
    nodes[0].proc.take().unwrap().kill9();
    for n in &nodes[1..] {
        assert_eq!(seqs(&read_all(&n.client.channel, sid).await.unwrap()), (1..=9).collect::<Vec<_>>());
    }
    // And a new stream is still taken in, on the two nodes left.
    let id2 = stream("cluster-build", "after-loss", TOOL);
    let (acks, end) = publish(&nodes[2].client.channel, (1..=3).map(|s| tool_event(&id2, s, b"x", s == 3)).collect()).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2, 3]);
    assert_eq!(seqs(&read_all(&nodes[1].client.channel, "cluster-build.3.after-loss").await.unwrap()), vec![1, 2, 3]);
}

#[tokio::test]
async fn a_running_actions_output_is_read_live_through_a_node_its_worker_does_not_talk_to() {
    use kiln_proto::reapi::ExecuteOperationMetadata;
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path()).await;
    // The only worker is node 2's; the client talks to nodes 1 and 3.
    let d = upload_action(&nodes[0].client, "echo live; sleep 2; echo done; : > out").await;
    let mut s = ExecutionClient::new(nodes[0].client.channel.clone())
        .execute(ExecuteRequest { action_digest: Some(d), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let stdout = loop {
        let op = tokio::time::timeout_at(deadline, s.message()).await.expect("in time").unwrap().unwrap();
        let md = ExecuteOperationMetadata::decode(&op.metadata.unwrap().value[..]).unwrap();
        if !md.stdout_stream_name.is_empty() {
            break md.stdout_stream_name;
        }
        assert!(!op.done);
    };
    let mut live = open_log_stream(&nodes[2].client.channel, &stdout, deadline).await;
    let mut all = Vec::new();
    while let Some(m) = tokio::time::timeout_at(deadline, live.message()).await.unwrap().unwrap() {
        all.extend(m.data);
    }
    assert_eq!(all, b"live\ndone\n");
    assert_eq!(run_to_end(s).await.result.unwrap().exit_code, 0);
}

/// A BatchUpdateBlobs through one node is on every owner of each blob when it is answered
/// (one batched peer write per owner), and a peer refuses replicas whose bytes do not match.
#[tokio::test]
async fn a_batch_through_one_node_is_on_every_owner_when_acknowledged() {
    use kiln_proto::reapi::{batch_update_blobs_request, BatchUpdateBlobsRequest};
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path()).await;
    let members: Vec<(u64, std::net::SocketAddr)> = nodes.iter().enumerate().map(|(i, n)| (i as u64 + 1, n.grpc)).collect();
    let blobs: Vec<Vec<u8>> = (0..60).map(|i| pseudo_random(100 + i * 70, 7000 + i as u64)).collect();
    let requests = blobs.iter().map(|b| batch_update_blobs_request::Request { digest: Some(sha256(b)), data: b.clone(), compressor: 0 }).collect();
    let resp = ContentAddressableStorageClient::new(nodes[0].client.channel.clone())
        .batch_update_blobs(BatchUpdateBlobsRequest { instance_name: String::new(), requests, digest_function: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.responses.iter().all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)), "{resp:?}");
    for b in &blobs {
        let d = sha256(b);
        for owner in owners_of(&d, &members) {
            assert!(holds(&nodes[owner as usize - 1].client, &d).await, "owner {owner} lacks {}", d.hash);
        }
    }

    let good = pseudo_random(500, 7100);
    let liar = kiln_proto::peer::WholeBlob {
        digest: Some(kiln_proto::peer::BlobDigest { function: 1, hash: sha256(b"something else").hash, size: 500 }),
        data: pseudo_random(500, 7101),
    };
    let honest = kiln_proto::peer::WholeBlob {
        digest: Some(kiln_proto::peer::BlobDigest { function: 1, hash: sha256(&good).hash, size: 500 }),
        data: good.clone(),
    };
    let r = PeerClient::new(nodes[1].client.channel.clone())
        .put_blobs(kiln_proto::peer::PutBlobsRequest { version: PEER_VERSION, blobs: vec![liar, honest] })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors[0].contains("hash mismatch"), "{:?}", r.errors);
    assert_eq!(r.errors[1], "");
    assert!(!holds(&nodes[1].client, &sha256(b"something else")).await);
    assert!(holds(&nodes[1].client, &sha256(&good)).await);
    // The lighter presence answer: positions in the request.
    let peer = |d: &kiln_proto::reapi::Digest| kiln_proto::peer::BlobDigest { function: 1, hash: d.hash.clone(), size: d.size_bytes };
    let r = PeerClient::new(nodes[1].client.channel.clone())
        .has_blobs(kiln_proto::peer::HasBlobsRequest {
            version: PEER_VERSION,
            digests: vec![peer(&sha256(b"something else")), peer(&sha256(&good)), peer(&sha256(b"nothing"))],
            want_indices: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.present, r.present_indices), (vec![], vec![1]));

    // A batch read through a node that holds none of the blobs: they come from their owners in
    // one call each (nothing cached on the way, as this node owns none of them), checked.
    let node3 = 3u64;
    let foreign: Vec<&Vec<u8>> = blobs.iter().filter(|b| !owners_of(&sha256(b), &members).contains(&node3)).collect();
    assert!(foreign.len() >= 5, "some of 60 blobs are not node 3's");
    for b in &foreign {
        assert!(!holds(&nodes[2].client, &sha256(b)).await);
    }
    let resp = ContentAddressableStorageClient::new(nodes[2].client.channel.clone())
        .batch_read_blobs(kiln_proto::reapi::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: foreign.iter().map(|b| sha256(b)).collect(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses.len(), foreign.len());
    for (r, b) in resp.responses.iter().zip(&foreign) {
        assert_eq!((r.status.as_ref().map(|s| s.code), &r.data), (Some(0), *b));
    }
    for b in &foreign {
        assert!(!holds(&nodes[2].client, &sha256(b)).await, "read through the batched path, not copied");
    }
    let r = PeerClient::new(nodes[1].client.channel.clone())
        .get_blobs(kiln_proto::peer::GetBlobsRequest { version: PEER_VERSION, digests: vec![peer(&sha256(b"nothing")), peer(&sha256(&good))] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.blobs.iter().map(|b| (b.found, b.data.clone())).collect::<Vec<_>>(), vec![(false, vec![]), (true, good.clone())]);
}

#[tokio::test]
async fn a_streamed_upload_through_a_non_owner_is_on_its_owners_when_acknowledged_and_a_false_one_nowhere() {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(dir.path()).await;
    let members: Vec<(u64, std::net::SocketAddr)> = nodes.iter().enumerate().map(|(i, n)| (i as u64 + 1, n.grpc)).collect();
    // Blobs node 1 does not own: it forwards them to both owners while they arrive.
    let foreign = |size: usize, from: u64| {
        (from..from + 64)
            .map(|seed| pseudo_random(size, seed))
            .find(|b| !owners_of(&sha256(b), &members).contains(&1))
            .expect("one of 64 blobs is not node 1's")
    };
    let data = foreign(5 << 20, 9100);
    let d = sha256(&data);
    let res = upload_resource("", "tee-upload", &d);
    let bs = || ByteStreamClient::new(nodes[0].client.channel.clone());
    let committed = bs().write(futures::stream::iter(write_requests(&res, &data, 0, 64 << 10, true))).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, data.len() as i64);
    for owner in owners_of(&d, &members) {
        assert!(holds(&nodes[owner as usize - 1].client, &d).await, "owner {owner} lacks the blob when the write is acknowledged");
        assert_eq!(nodes[owner as usize - 1].client.read(&blob_resource("", &d)).await.unwrap(), data);
    }
    // Forwarded while it arrived (to both owners), not pushed afterwards.
    let cfg = std::fs::read_to_string(dir.path().join("node1.toml")).unwrap();
    let http = cfg.lines().find_map(|l| l.strip_prefix("http = \"")).and_then(|l| l.strip_suffix('"')).unwrap().parse().unwrap();
    let metrics = http_get(http, "/metrics").await;
    let teed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_cas_tee_bytes_total "))
        .unwrap_or_else(|| panic!("no tee counter in {metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(teed, 2.0 * data.len() as f64);
    // Read back through node 1: relayed from an owner as it streams, not stored there first.
    assert!(!holds(&nodes[0].client, &d).await);
    assert_eq!(nodes[0].client.read(&blob_resource("", &d)).await.unwrap(), data);
    assert!(!holds(&nodes[0].client, &d).await, "node 1 stored a blob it only relayed");

    // Bytes that do not hash to their digest: refused, and stored by no node.
    let other = foreign(1 << 20, 9300);
    let mut wrong = other.clone();
    wrong[12345] ^= 1;
    let od = sha256(&other);
    let err = bs()
        .write(futures::stream::iter(write_requests(&upload_resource("", "tee-false", &od), &wrong, 0, 64 << 10, true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    for n in &nodes {
        assert!(!holds(&n.client, &od).await, "a node stored bytes that do not match their digest");
    }

    // Cut off half-way: node 1 kept nothing, its owners parked what they got, which every node
    // reports; the upload resumes through node 1 and reaches the owners.
    let res = upload_resource("", "tee-cut", &od);
    let half = 600_000;
    let cut = bs().write(futures::stream::iter(write_requests(&res, &other[..half], 0, 64 << 10, false))).await.unwrap().into_inner();
    assert_eq!(cut.committed_size, half as i64);
    for n in &nodes {
        let st = ByteStreamClient::new(n.client.channel.clone())
            .query_write_status(kiln_proto::bytestream::QueryWriteStatusRequest { resource_name: res.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((st.committed_size, st.complete), (half as i64, false));
    }
    let committed = bs().write(futures::stream::iter(write_requests(&res, &other, half, 64 << 10, true))).await.unwrap().into_inner().committed_size;
    assert_eq!(committed, other.len() as i64);
    for owner in owners_of(&od, &members) {
        assert!(holds(&nodes[owner as usize - 1].client, &od).await, "owner {owner} lacks the resumed blob");
    }
}
