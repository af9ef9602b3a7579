//! Runs one workload: prepared operations, executed at a fixed concurrency, in timed rounds.
//!
//! A workload alternates two phases until it has done `max_ops` operations or spent
//! `max_seconds` of timed execution, whichever comes first:
//!
//! 1. **prepare** (untimed): make the next round's operations — generate blob contents, hash
//!    them, build the request messages. Nothing the client does to *make* a request is charged
//!    to the server.
//! 2. **execute** (timed): `concurrency` worker tasks pull operations from the round's queue
//!    until it is empty or the time budget is spent; each operation's latency is recorded,
//!    and the round's wall time is added to the workload's time.
//!
//! Throughput is then operations (or bytes) over the summed round times. The road not taken:
//! one clock over the whole workload with operations made on the fly, which on a 2-core
//! machine would charge the client's SHA-256 of a 64 MiB blob to the server. Rounds cost a
//! little at their edges (the last few operations of a round run below full concurrency), so
//! a round holds several times `concurrency` operations.
//!
//! Workers are separate tokio tasks, not futures polled by one task (`buffer_unordered`), so
//! that at concurrency 16 the client's encoding work spreads over both cores.
//!
//! Preparation may itself talk to the server ([`run_rounds_async`]: the Execute workload
//! uploads each round's Commands and Actions there), still outside the timed phase.
//!
//! An operation that returns an error ends the run, except an [`OpFailed`]: the server
//! answered, but not what the workload expects (an action that exited non-zero, a cached
//! result where a fresh one was due). Those are counted in [`RunTotals::failed`], kept out of
//! the figures, and the run goes on, so that a report says "12 of 900 actions failed" rather
//! than stopping at the first.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::stats::Samples;

/// How long a workload runs at most.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Operations, at most (failed ones included).
    pub max_ops: u64,
    /// Seconds of timed execution, at most (checked between rounds).
    pub max_seconds: f64,
    /// Operations prepared and executed per round.
    pub round_ops: usize,
}

impl Bounds {
    /// Wall-clock limit including untimed preparation, so a slow client cannot stretch a run.
    fn wall_limit(&self) -> Duration {
        Duration::from_secs_f64(self.max_seconds * 4.0 + 10.0)
    }
}

/// What one operation moved, and its kind (for workloads that mix kinds, e.g. get/update).
#[derive(Debug, Clone, Copy)]
pub struct OpOutcome {
    pub bytes: u64,
    pub items: u64,
    pub kind: &'static str,
}

/// An operation the server completed wrongly: counted as a failure, the run goes on.
#[derive(Debug)]
pub struct OpFailed(pub String);

impl std::fmt::Display for OpFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OpFailed {}

/// Failure messages kept per run (the count is exact, the messages are examples).
const FAILURE_EXAMPLES: usize = 5;

/// Totals of one workload run.
#[derive(Debug, Default)]
pub struct RunTotals {
    pub ops: u64,
    pub items: u64,
    pub bytes: u64,
    /// Sum of the timed rounds.
    pub timed: Duration,
    pub latencies: Samples,
    pub latencies_by_kind: BTreeMap<&'static str, Samples>,
    /// Operations that ended in [`OpFailed`] (not in `ops` nor in the latencies).
    pub failed: u64,
    /// The first few of their messages.
    pub failures: Vec<String>,
}

/// Runs prepare/execute rounds as described in the module docs. `prepare(n)` makes up to `n`
/// operations (none ends the run); `exec(op)` performs one. Prepared operations may be left
/// unexecuted when the time budget runs out, so only `exec` may record an operation as done.
pub async fn run_rounds<T, P, E, F>(
    concurrency: usize,
    bounds: Bounds,
    mut prepare: P,
    exec: E,
) -> anyhow::Result<RunTotals>
where
    T: Send + 'static,
    P: FnMut(usize) -> anyhow::Result<Vec<T>>,
    E: Fn(T) -> F + Send + Sync + 'static,
    F: Future<Output = anyhow::Result<OpOutcome>> + Send + 'static,
{
    run_rounds_async(
        concurrency,
        bounds,
        move |n| std::future::ready(prepare(n)),
        exec,
    )
    .await
}

/// [`run_rounds`] with a preparation that may await (e.g. upload, untimed, what the round's
/// operations refer to).
pub async fn run_rounds_async<T, P, PF, E, F>(
    concurrency: usize,
    bounds: Bounds,
    mut prepare: P,
    exec: E,
) -> anyhow::Result<RunTotals>
where
    T: Send + 'static,
    P: FnMut(usize) -> PF,
    PF: Future<Output = anyhow::Result<Vec<T>>>,
    E: Fn(T) -> F + Send + Sync + 'static,
    F: Future<Output = anyhow::Result<OpOutcome>> + Send + 'static,
{
    let exec = Arc::new(exec);
    let concurrency = concurrency.max(1);
    let wall_start = Instant::now();
    let mut totals = RunTotals::default();
    // Failed operations count towards `max_ops`: the bound is on operations attempted.
    while totals.ops + totals.failed < bounds.max_ops
        && totals.timed.as_secs_f64() < bounds.max_seconds
        && wall_start.elapsed() < bounds.wall_limit()
    {
        let want = (bounds.max_ops - totals.ops - totals.failed).min(bounds.round_ops.max(1) as u64)
            as usize;
        let ops = prepare(want).await?;
        if ops.is_empty() {
            break;
        }
        let queue = Arc::new(Mutex::new(VecDeque::from(ops)));
        let round_start = Instant::now();
        // Workers take no new operation past the workload's time budget, so a slow server
        // cannot stretch a round far beyond it; operations left in the queue are dropped.
        let budget_left = (bounds.max_seconds - totals.timed.as_secs_f64()).max(0.0);
        let deadline = round_start + Duration::from_secs_f64(budget_left);
        let mut workers = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let queue = queue.clone();
            let exec = exec.clone();
            workers.push(tokio::spawn(async move {
                let mut done: Vec<(Duration, OpOutcome)> = Vec::new();
                let mut failed: Vec<String> = Vec::new();
                while Instant::now() < deadline {
                    let next = queue
                        .lock()
                        .map_err(|_| anyhow::anyhow!("a worker panicked"))?
                        .pop_front();
                    let Some(op) = next else { break };
                    let start = Instant::now();
                    match exec(op).await {
                        Ok(outcome) => done.push((start.elapsed(), outcome)),
                        Err(e) if e.is::<OpFailed>() => failed.push(format!("{e:#}")),
                        Err(e) => return Err(e),
                    }
                }
                anyhow::Ok((done, failed))
            }));
        }
        let mut round = Vec::new();
        for w in workers {
            round.push(w.await.context("a worker task failed")?);
        }
        totals.timed += round_start.elapsed();
        for results in round {
            let (results, failed) = results?;
            totals.failed += failed.len() as u64;
            let room = FAILURE_EXAMPLES.saturating_sub(totals.failures.len());
            totals.failures.extend(failed.into_iter().take(room));
            for (latency, o) in results {
                totals.ops += 1;
                totals.items += o.items;
                totals.bytes += o.bytes;
                totals.latencies.record(latency);
                totals
                    .latencies_by_kind
                    .entry(o.kind)
                    .or_default()
                    .record(latency);
            }
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_at_max_ops_and_counts_every_outcome() {
        let mut next = 0u64;
        let bounds = Bounds {
            max_ops: 10,
            max_seconds: 60.0,
            round_ops: 4,
        };
        let totals = run_rounds(
            3,
            bounds,
            |n| {
                let ops: Vec<u64> = (next..next + n as u64).collect();
                next += n as u64;
                Ok(ops)
            },
            |i| async move {
                Ok(OpOutcome {
                    bytes: i,
                    items: 1,
                    kind: if i % 2 == 0 { "even" } else { "odd" },
                })
            },
        )
        .await
        .unwrap();
        assert_eq!(totals.ops, 10);
        assert_eq!(totals.items, 10);
        assert_eq!(totals.bytes, (0..10).sum::<u64>());
        assert_eq!(totals.latencies.len(), 10);
        assert_eq!(totals.latencies_by_kind["even"].len(), 5);
    }

    #[tokio::test]
    async fn failed_operations_are_counted_and_the_run_goes_on() {
        let mut next = 0u64;
        let bounds = Bounds {
            max_ops: 9,
            max_seconds: 60.0,
            round_ops: 3,
        };
        let totals = run_rounds_async(
            2,
            bounds,
            |n| {
                let ops: Vec<u64> = (next..next + n as u64).collect();
                next += n as u64;
                async move { Ok(ops) }
            },
            |i| async move {
                if i % 3 == 0 {
                    return Err(OpFailed(format!("op {i} failed")).into());
                }
                Ok(OpOutcome {
                    bytes: 0,
                    items: 1,
                    kind: "ok",
                })
            },
        )
        .await
        .unwrap();
        assert_eq!(totals.failed, 3);
        assert_eq!(totals.ops, 6);
        assert_eq!(totals.latencies.len(), 6);
        let mut f = totals.failures.clone();
        f.sort();
        assert_eq!(f, vec!["op 0 failed", "op 3 failed", "op 6 failed"]);
    }

    #[tokio::test]
    async fn an_operation_error_fails_the_run() {
        let bounds = Bounds {
            max_ops: 4,
            max_seconds: 60.0,
            round_ops: 4,
        };
        let r = run_rounds(
            2,
            bounds,
            |n| Ok(vec![(); n]),
            |()| async { anyhow::bail!("boom") },
        )
        .await;
        assert!(r.is_err());
    }
}
