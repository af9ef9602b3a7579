//! `kiln cluster status|add|remove`: membership and health, for a person at a terminal.

use std::time::Duration;

use kiln_proto::peer::peer_client::PeerClient;
use kiln_proto::peer::{AddMemberRequest, RemoveMemberRequest, StatusRequest, StatusResponse, PEER_VERSION};
use tonic::transport::Channel;

pub enum Action {
    Status { endpoint: String },
    Add { endpoint: String, id: u64, address: String },
    Remove { endpoint: String, id: u64 },
}

fn host_port(endpoint: &str) -> &str {
    endpoint.split("://").nth(1).unwrap_or(endpoint).trim_end_matches('/')
}

async fn client(addr: &str) -> anyhow::Result<PeerClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", host_port(addr)))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {addr}: {e}"))?;
    Ok(PeerClient::new(ch))
}

async fn status_of(addr: &str) -> anyhow::Result<StatusResponse> {
    Ok(client(addr).await?.status(StatusRequest { version: PEER_VERSION }).await?.into_inner())
}

/// The leader's address named in a follower's refusal, if any.
fn leader_in(status: &tonic::Status) -> Option<String> {
    status.message().split("leader at ").nth(1).map(|s| s.trim().to_string())
}

pub async fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Status { endpoint } => {
            let s = status_of(&endpoint).await?;
            println!("cluster seen from node {} ({endpoint})", s.node_id);
            println!(
                "leader: {}   term: {}   ring version: {}",
                if s.leader_id == 0 { "none (election)".to_string() } else { s.leader_id.to_string() },
                s.term,
                s.ring_version
            );
            println!("{:<6} {:<24} {:<8} {:<10} {:<10} {:<8} {:<14} health", "node", "address", "role", "applied", "log", "term", "cas bytes");
            for m in &s.members {
                let role = if m.id == s.leader_id { "leader" } else if m.voter { "voter" } else { "learner" };
                match status_of(&m.address).await {
                    Ok(ms) => println!(
                        "{:<6} {:<24} {:<8} {:<10} {:<10} {:<8} {:<14} {}",
                        m.id,
                        m.address,
                        role,
                        ms.last_applied_index,
                        ms.last_log_index,
                        ms.term,
                        ms.cas_stored_bytes,
                        if ms.serving { "SERVING" } else { "NOT_SERVING" }
                    ),
                    Err(e) => println!("{:<6} {:<24} {:<8} {:<10} {:<10} {:<8} {:<14} UNREACHABLE ({e})", m.id, m.address, role, "-", "-", "-", "-"),
                }
            }
            Ok(())
        }
        Action::Add { endpoint, id, address } => {
            let req = AddMemberRequest { version: PEER_VERSION, id, address: address.clone() };
            let r = match client(&endpoint).await?.add_member(req.clone()).await {
                Err(s) if leader_in(&s).is_some() => client(&leader_in(&s).unwrap_or_default()).await?.add_member(req).await,
                r => r,
            };
            let s = r.map_err(|e| anyhow::anyhow!("adding node {id}: {}", e.message()))?.into_inner();
            println!("node {id} ({address}) added; members: {:?}", s.members.iter().map(|m| m.id).collect::<Vec<_>>());
            Ok(())
        }
        Action::Remove { endpoint, id } => {
            let req = RemoveMemberRequest { version: PEER_VERSION, id };
            let r = match client(&endpoint).await?.remove_member(req).await {
                Err(s) if leader_in(&s).is_some() => client(&leader_in(&s).unwrap_or_default()).await?.remove_member(req).await,
                r => r,
            };
            let s = r.map_err(|e| anyhow::anyhow!("removing node {id}: {}", e.message()))?.into_inner();
            println!("node {id} removed; members: {:?}", s.members.iter().map(|m| m.id).collect::<Vec<_>>());
            Ok(())
        }
    }
}
