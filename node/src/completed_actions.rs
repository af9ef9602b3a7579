//! The Completed Action Logger: every action this node completes is streamed, as a
//! `CompletedAction`, to a configured receiver over one long-lived LogCompletedActions call.
//!
//! Execution never waits for it: [`CompletedActionLogger::log`] puts the action in a bounded
//! buffer and returns; when the buffer is full the action is dropped and counted
//! (`kiln_completed_actions_dropped_total`). A background task sends in order and keeps what
//! the receiver has not acknowledged (one Empty per action, in order); when the call fails it
//! reconnects with backoff and sends the unacknowledged actions again, so an action can reach
//! a receiver twice only if its acknowledgement was lost.

use std::collections::VecDeque;
use std::time::Duration;

use kiln_proto::completed_actions::{CompletedAction, CompletedActionLoggerClient, HistoricalExecuteResponse};
use kiln_proto::reapi::{Digest, ExecuteResponse};
use tokio::sync::mpsc;

pub const SENT: &str = "kiln_completed_actions_sent_total";
pub const DROPPED: &str = "kiln_completed_actions_dropped_total";
pub const RECONNECTS: &str = "kiln_completed_actions_reconnects_total";

/// Actions sent and not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 1000;
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct CompletedActionLogger {
    tx: mpsc::Sender<CompletedAction>,
}

impl CompletedActionLogger {
    /// Starts the sender task; it runs until every logger handle is dropped.
    pub fn start(endpoint: String, buffer: usize) -> Self {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        tokio::spawn(run(endpoint, rx));
        Self { tx }
    }

    /// Queues one finished action; drops it (counted) if the buffer is full.
    pub fn log(&self, instance_name: &str, action: Digest, response: ExecuteResponse) {
        let ca = CompletedAction {
            historical_execute_response: Some(HistoricalExecuteResponse { action_digest: Some(action), execute_response: Some(response) }),
            uuid: uuid::Uuid::new_v4().to_string(),
            instance_name: instance_name.to_string(),
        };
        if self.tx.try_send(ca).is_err() {
            metrics::counter!(DROPPED).increment(1);
        }
    }
}

async fn run(endpoint: String, mut rx: mpsc::Receiver<CompletedAction>) {
    let mut in_flight: VecDeque<CompletedAction> = VecDeque::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        // Nothing to do until there is something to send.
        if in_flight.is_empty() {
            match rx.recv().await {
                Some(ca) => in_flight.push_back(ca),
                None => return,
            }
        }
        match stream_once(&endpoint, &mut rx, &mut in_flight).await {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!(RECONNECTS).increment(1);
                tracing::warn!(endpoint, error = %e, unacknowledged = in_flight.len(), retry_in_ms = backoff.as_millis() as u64, "completed action logger: stream failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One call: sends `in_flight` again, then new actions, popping each as it is acknowledged.
/// Ok when the logger was dropped and everything was acknowledged.
async fn stream_once(endpoint: &str, rx: &mut mpsc::Receiver<CompletedAction>, in_flight: &mut VecDeque<CompletedAction>) -> Result<(), String> {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let (req_tx, req_rx) = mpsc::channel::<CompletedAction>(64);
    let mut acks = CompletedActionLoggerClient::new(ch)
        .log_completed_actions(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut resend: VecDeque<CompletedAction> = in_flight.iter().cloned().collect();
    let mut input_open = true;
    loop {
        if !input_open && in_flight.is_empty() {
            return Ok(());
        }
        let can_take = input_open && resend.is_empty() && in_flight.len() < MAX_IN_FLIGHT;
        tokio::select! {
            biased;
            ack = acks.message() => match ack {
                Ok(Some(())) => {
                    if in_flight.pop_front().is_none() {
                        return Err("the receiver acknowledged more actions than were sent".into());
                    }
                    metrics::counter!(SENT).increment(1);
                }
                Ok(None) => return Err("the receiver ended the call".into()),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            },
            permit = req_tx.reserve(), if !resend.is_empty() => {
                let permit = permit.map_err(|_| "the request stream closed".to_string())?;
                permit.send(resend.pop_front().expect("checked"));
            }
            next = rx.recv(), if can_take => match next {
                Some(ca) => {
                    req_tx.send(ca.clone()).await.map_err(|_| "the request stream closed".to_string())?;
                    in_flight.push_back(ca);
                }
                None => input_open = false,
            },
        }
    }
}
