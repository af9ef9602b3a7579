//! What a suite run reports: per-workload figures, their ratios to the machine's limits, the
//! checks of the benchmark issue, as JSON (for `bench/results/`) and as a table (for people).
//!
//! Units: MB is 10^6 bytes; latencies are in milliseconds; ratios are plain fractions
//! (0.62 = 62 % of the limit).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::limits::MachineLimits;
use super::runner::RunTotals;
use super::stats::LatencySummary;

/// Bytes in the MB of every MB/s figure.
const MB: f64 = 1e6;

/// The figures of one workload at one concurrency.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadResult {
    /// e.g. `bytestream-write-64MiB`.
    pub name: String,
    pub concurrency: usize,
    /// RPCs completed.
    pub ops: u64,
    /// Units of work inside those RPCs (blobs, digests, entries); equals `ops` for one-item RPCs.
    pub items: u64,
    pub item_unit: String,
    /// Payload bytes moved (blob contents only, not framing).
    pub bytes: u64,
    /// Timed seconds (preparation excluded).
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub items_per_sec: f64,
    /// Payload MB/s, for workloads that move blob contents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mb_per_sec: Option<f64>,
    /// Latency of one RPC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    /// Latency per kind of RPC, for mixed workloads; for `execute-trivial`, the phases of one
    /// action from the server's and worker's timestamps (see `load::execute`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_by_kind: BTreeMap<String, LatencySummary>,
    /// This figure over the machine limits that bound it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ratios: Vec<Ratio>,
    /// Operations the server completed wrongly (e.g. an action that did not exit 0); they
    /// are not in `ops` nor in the figures, and set `error`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_ops: u64,
    /// Why the workload did not complete, or how many of its operations failed; its figures
    /// are then partial or zero.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A figure divided by a machine limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratio {
    /// `sha256`, `tcp`, `disk`, `pagecache`, `fsync` or `spawn`.
    pub limit: String,
    /// What was divided by what, e.g. "MB/s ÷ one core's SHA-256 MB/s".
    pub formula: String,
    pub value: f64,
}

/// A workload the suite knows of but did not run, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// One expectation of the benchmark issue, evaluated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    /// `ok`, `BELOW` or `n/a` (a figure it needs is missing).
    pub status: String,
    pub detail: String,
}

/// What the server said about itself in GetCapabilities.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerInfo {
    pub max_batch_total_size_bytes: i64,
    pub exec_enabled: bool,
}

/// Everything one `kiln-load suite` run found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteReport {
    pub tool: String,
    pub tool_version: String,
    pub started_unix_secs: u64,
    pub endpoint: String,
    pub instance_name: String,
    pub quick: bool,
    pub connections: usize,
    pub write_chunk_bytes: usize,
    pub blobs_per_batch: usize,
    pub cpus: usize,
    pub server: ServerInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<MachineLimits>,
    /// Free-form context given with `--meta KEY=VALUE` (git revision, machine, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    pub workloads: Vec<WorkloadResult>,
    pub skipped: Vec<Skipped>,
    pub checks: Vec<Check>,
}

impl WorkloadResult {
    /// Figures from a run's totals; `moves_bytes` says whether MB/s means anything here.
    pub fn from_totals(
        name: &str,
        concurrency: usize,
        item_unit: &str,
        moves_bytes: bool,
        t: &RunTotals,
    ) -> Self {
        let secs = t.timed.as_secs_f64();
        let per_sec = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        let by_kind = if t.latencies_by_kind.len() > 1 {
            t.latencies_by_kind
                .iter()
                .filter_map(|(k, s)| Some((k.to_string(), s.summary()?)))
                .collect()
        } else {
            BTreeMap::new()
        };
        Self {
            name: name.to_string(),
            concurrency,
            ops: t.ops,
            items: t.items,
            item_unit: item_unit.to_string(),
            bytes: t.bytes,
            seconds: secs,
            ops_per_sec: per_sec(t.ops as f64),
            items_per_sec: per_sec(t.items as f64),
            mb_per_sec: moves_bytes.then(|| per_sec(t.bytes as f64) / MB),
            latency: t.latencies.summary(),
            latency_by_kind: by_kind,
            ratios: Vec::new(),
            failed_ops: 0,
            error: None,
        }
    }

    /// Records `t`'s failed operations: their count, and an error naming the first few.
    pub fn with_failures(mut self, t: &RunTotals) -> Self {
        self.failed_ops = t.failed;
        if t.failed > 0 {
            self.error = Some(format!(
                "{} of {} {}s failed; first: {}",
                t.failed,
                t.failed + self.ops,
                self.item_unit,
                t.failures.join(" | ")
            ));
        }
        self
    }

    /// An entry for a workload that failed before producing figures.
    pub fn failed(name: &str, concurrency: usize, item_unit: &str, error: String) -> Self {
        let mut w = Self::from_totals(name, concurrency, item_unit, false, &RunTotals::default());
        w.error = Some(error);
        w
    }

    /// Fills [`Self::ratios`] with the limits that bound this workload:
    /// writes are bound by hashing (every byte is hashed once, on one core per stream) and by
    /// durable disk writes; reads by the loopback copy; Action Cache updates by fsyncs.
    pub fn compute_ratios(&mut self, limits: &MachineLimits) {
        self.ratios.clear();
        let mbs = self.mb_per_sec.map(|m| m * MB);
        let mut add = |limit: &str, formula: &str, figure: Option<f64>, ceiling: Option<f64>| {
            if let (Some(f), Some(c)) = (figure, ceiling) {
                if c > 0.0 {
                    self.ratios.push(Ratio {
                        limit: limit.into(),
                        formula: formula.into(),
                        value: f / c,
                    });
                }
            }
        };
        let n = self.name.clone();
        if n.starts_with("bytestream-write") || n.starts_with("batch-update") {
            add(
                "sha256",
                "MB/s ÷ one core's SHA-256 MB/s",
                mbs,
                limits.sha256_bytes_per_sec,
            );
            add(
                "disk",
                "MB/s ÷ sequential write+fsync MB/s",
                mbs,
                limits.disk_write_fsync_bytes_per_sec,
            );
            add(
                "pagecache",
                "MB/s ÷ sequential write into new page-cache pages MB/s",
                mbs,
                limits.page_cache_write_bytes_per_sec,
            );
        } else if n.starts_with("bytestream-read") || n.starts_with("batch-read") {
            add(
                "tcp",
                "MB/s ÷ one loopback TCP stream MB/s",
                mbs,
                limits.tcp_loopback_bytes_per_sec,
            );
            add(
                "filesend",
                "MB/s ÷ a page-cache file sent over one loopback stream (pread + write) MB/s",
                mbs,
                limits.file_send_bytes_per_sec,
            );
        } else if n.starts_with("execute") {
            add(
                "spawn",
                "actions/s ÷ sequential /bin/true spawn+wait/s",
                Some(self.ops_per_sec),
                limits.spawns_per_sec,
            );
        } else if n.starts_with("action-cache") {
            let updates = self
                .latency_by_kind
                .get("update")
                .map(|_| self.ops_per_sec / 2.0);
            add(
                "fsync",
                "update ops/s ÷ 4 KiB write+fdatasync/s",
                updates,
                limits.fsyncs_per_sec,
            );
        }
    }
}

fn find<'a>(
    ws: &'a [WorkloadResult],
    name: &str,
    concurrency: usize,
) -> Option<&'a WorkloadResult> {
    ws.iter()
        .find(|w| w.name == name && w.concurrency == concurrency && w.error.is_none() && w.ops > 0)
}

fn check(name: String, verdict: Option<(bool, String)>) -> Check {
    match verdict {
        Some((ok, detail)) => Check {
            name,
            status: if ok { "ok" } else { "BELOW" }.into(),
            detail,
        },
        None => Check {
            name,
            status: "n/a".into(),
            detail: "a figure it needs is missing".into(),
        },
    }
}

/// The expectations of the benchmark issue, on this 2-core machine:
/// ByteStream write of 64 MiB blobs at ≥ 50 % of one core's SHA-256 rate; reads faster than
/// writes; FindMissingBlobs of 10,000 digests with p99 under 10 ms (at concurrency 1: with 16
/// callers on 2 cores a call waits for others by construction).
pub fn evaluate_checks(ws: &[WorkloadResult], limits: Option<&MachineLimits>) -> Vec<Check> {
    let mut checks = Vec::new();
    let sha = limits.and_then(|l| l.sha256_bytes_per_sec);
    let w64 = find(ws, "bytestream-write-64MiB", 1);
    checks.push(check(
        "ByteStream write 64 MiB (c=1) >= 50% of one core's SHA-256 rate".into(),
        w64.and_then(|w| w.mb_per_sec).zip(sha).map(|(m, s)| {
            let r = m * MB / s;
            (
                r >= 0.5,
                format!("{m:.0} MB/s = {:.0}% of {:.0} MB/s", r * 100.0, s / MB),
            )
        }),
    ));
    for (size, c) in [("1MiB", 1), ("1MiB", 16), ("64MiB", 1)] {
        let w = find(ws, &format!("bytestream-write-{size}"), c).and_then(|w| w.mb_per_sec);
        let r = find(ws, &format!("bytestream-read-{size}"), c).and_then(|w| w.mb_per_sec);
        checks.push(check(
            format!("ByteStream read faster than write ({size}, c={c})"),
            w.zip(r)
                .map(|(w, r)| (r > w, format!("read {r:.0} MB/s vs write {w:.0} MB/s"))),
        ));
    }
    let fm = find(ws, "find-missing-10k", 1).and_then(|w| w.latency);
    checks.push(check(
        "FindMissingBlobs 10,000 digests (c=1) p99 < 10 ms".into(),
        fm.map(|l| {
            (
                l.p99_ms < 10.0,
                format!("p50 {:.2} ms, p99 {:.2} ms", l.p50_ms, l.p99_ms),
            )
        }),
    ));
    let e1 = find(ws, "execute-trivial", 1).and_then(|w| w.latency);
    checks.push(check(
        "Execute trivial action (c=1) p50 <= 5 ms (informational)".into(),
        e1.map(|l| {
            (
                l.p50_ms <= 5.0,
                format!("p50 {:.2} ms, p99 {:.2} ms", l.p50_ms, l.p99_ms),
            )
        }),
    ));
    let e16 = find(ws, "execute-trivial", 16);
    checks.push(check(
        "Execute trivial actions (c=16) >= 500 actions/s (informational)".into(),
        e16.map(|w| {
            let lat = w
                .latency
                .map_or(String::new(), |l| format!(", p50 {:.2} ms", l.p50_ms));
            (
                w.ops_per_sec >= 500.0,
                format!("{:.0} actions/s{lat}", w.ops_per_sec),
            )
        }),
    ));
    checks
}

fn mbs(bytes_per_sec: Option<f64>) -> String {
    bytes_per_sec.map_or("—".into(), |b| format!("{:.0} MB/s", b / MB))
}

/// The machine limits as one line.
pub fn render_limits(l: &MachineLimits) -> String {
    format!(
        "machine limits: SHA-256 one core {} · loopback TCP one stream {} (a cached file sent over it {}) · disk sequential write+fsync {} \
         (writes alone {}) · 4 KiB append+fdatasync {} · /bin/true spawn+wait {}",
        mbs(l.sha256_bytes_per_sec),
        mbs(l.tcp_loopback_bytes_per_sec),
        mbs(l.file_send_bytes_per_sec),
        mbs(l.disk_write_fsync_bytes_per_sec),
        mbs(l.page_cache_write_bytes_per_sec),
        l.fsyncs_per_sec.map_or("—".into(), |f| format!("{f:.0}/s")),
        l.spawns_per_sec.map_or("—".into(), |f| format!("{f:.0}/s")),
    )
}

/// The report as a fixed-width table, then the limits, skipped workloads and checks.
pub fn render_table(r: &SuiteReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>4} {:>7} {:>9} {:>16} {:>9} {:>9} {:>9}  vs machine limits",
        "workload", "conc", "ops", "ops/s", "items/s", "MB/s", "p50 ms", "p99 ms"
    );
    let _ = writeln!(out, "{}", "-".repeat(120));
    for w in &r.workloads {
        if let (Some(e), 0) = (&w.error, w.ops) {
            let _ = writeln!(out, "{:<24} {:>4}  FAILED: {e}", w.name, w.concurrency);
            continue;
        }
        let lat = |f: fn(&LatencySummary) -> f64| {
            w.latency
                .as_ref()
                .map_or("—".into(), |l| format!("{:.2}", f(l)))
        };
        let ratios: Vec<String> = w
            .ratios
            .iter()
            .map(|x| format!("{:.2}×{}", x.value, x.limit))
            .collect();
        let _ = writeln!(
            out,
            "{:<24} {:>4} {:>7} {:>9.1} {:>16} {:>9} {:>9} {:>9}  {}",
            w.name,
            w.concurrency,
            w.ops,
            w.ops_per_sec,
            format!("{:.0} {}/s", w.items_per_sec, w.item_unit),
            w.mb_per_sec.map_or("—".into(), |m| format!("{m:.1}")),
            lat(|l| l.p50_ms),
            lat(|l| l.p99_ms),
            ratios.join(" "),
        );
        for (kind, l) in &w.latency_by_kind {
            let _ = writeln!(
                out,
                "{:<24} {:>4} {:>7} {:>9} {:>16} {:>9} {:>9.2} {:>9.2}",
                format!("  · {kind}"),
                "",
                l.count,
                "",
                "",
                "",
                l.p50_ms,
                l.p99_ms
            );
        }
        if let Some(e) = &w.error {
            let _ = writeln!(out, "{:<24} {:>4}  FAILED: {e}", "", "");
        }
    }
    if let Some(l) = &r.limits {
        let _ = writeln!(out, "\n{}", render_limits(l));
    }
    for s in &r.skipped {
        let _ = writeln!(out, "skipped {}: {}", s.name, s.reason);
    }
    if !r.checks.is_empty() {
        let _ = writeln!(out);
    }
    for c in &r.checks {
        let _ = writeln!(out, "check {:<5} {} — {}", c.status, c.name, c.detail);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, c: usize, mb: f64, p99: f64) -> WorkloadResult {
        WorkloadResult {
            name: name.into(),
            concurrency: c,
            ops: 10,
            items: 10,
            item_unit: "blob".into(),
            bytes: 0,
            seconds: 1.0,
            ops_per_sec: 10.0,
            items_per_sec: 10.0,
            mb_per_sec: Some(mb),
            latency: Some(LatencySummary {
                count: 10,
                p50_ms: p99 / 2.0,
                p99_ms: p99,
                max_ms: p99,
                mean_ms: p99 / 2.0,
            }),
            latency_by_kind: BTreeMap::new(),
            ratios: Vec::new(),
            failed_ops: 0,
            error: None,
        }
    }

    #[test]
    fn execute_checks_and_failures() {
        let mut c1 = result("execute-trivial", 1, 0.0, 8.0);
        c1.mb_per_sec = None;
        let mut c16 = result("execute-trivial", 16, 0.0, 8.0);
        c16.ops_per_sec = 600.0;
        c16.item_unit = "action".into();
        let checks = evaluate_checks(&[c1.clone(), c16.clone()], None);
        let status = |checks: &[Check], prefix: &str| {
            checks
                .iter()
                .find(|c| c.name.starts_with(prefix))
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(status(&checks, "Execute trivial action (c=1)"), "ok");
        assert_eq!(status(&checks, "Execute trivial actions (c=16)"), "ok");
        // A level with failed actions gives no verdict, and renders its error.
        let t = RunTotals {
            failed: 2,
            failures: vec!["action abc: the action exited with 1".into()],
            ..Default::default()
        };
        c16 = c16.with_failures(&t);
        assert_eq!(c16.failed_ops, 2);
        assert!(
            c16.error
                .as_deref()
                .unwrap()
                .starts_with("2 of 12 actions failed"),
            "{:?}",
            c16.error
        );
        let checks = evaluate_checks(&[c1, c16.clone()], None);
        assert_eq!(status(&checks, "Execute trivial actions (c=16)"), "n/a");
        let report = SuiteReport {
            tool: "kiln-load".into(),
            tool_version: "0".into(),
            started_unix_secs: 0,
            endpoint: String::new(),
            instance_name: String::new(),
            quick: true,
            connections: 1,
            write_chunk_bytes: 1,
            blobs_per_batch: 1,
            cpus: 2,
            server: ServerInfo::default(),
            limits: None,
            meta: BTreeMap::new(),
            workloads: vec![c16],
            skipped: Vec::new(),
            checks: Vec::new(),
        };
        let table = render_table(&report);
        assert!(table.contains("execute-trivial"), "{table}");
        assert!(table.contains("FAILED: 2 of 12 actions failed"), "{table}");
    }

    #[test]
    fn checks_follow_the_issue_thresholds() {
        let limits = MachineLimits {
            sha256_bytes_per_sec: Some(1000.0 * MB),
            ..Default::default()
        };
        let ws = vec![
            result("bytestream-write-64MiB", 1, 600.0, 1.0),
            result("bytestream-read-64MiB", 1, 500.0, 1.0),
            result("find-missing-10k", 1, 0.0, 12.0),
        ];
        let checks = evaluate_checks(&ws, Some(&limits));
        let status = |prefix: &str| {
            checks
                .iter()
                .find(|c| c.name.starts_with(prefix))
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(status("ByteStream write 64 MiB"), "ok");
        assert_eq!(status("ByteStream read faster than write (64MiB"), "BELOW");
        assert_eq!(
            status("ByteStream read faster than write (1MiB, c=1)"),
            "n/a"
        );
        assert_eq!(status("FindMissingBlobs"), "BELOW");
    }

    #[test]
    fn write_ratios_are_against_hashing_and_disk() {
        let mut w = result("bytestream-write-1MiB", 1, 500.0, 1.0);
        w.compute_ratios(&MachineLimits {
            sha256_bytes_per_sec: Some(2000.0 * MB),
            disk_write_fsync_bytes_per_sec: Some(1000.0 * MB),
            ..Default::default()
        });
        let r: Vec<(String, f64)> = w
            .ratios
            .iter()
            .map(|r| (r.limit.clone(), r.value))
            .collect();
        assert_eq!(r, vec![("sha256".into(), 0.25), ("disk".into(), 0.5)]);
    }
}
