//! `kiln-load`: Kiln's load generator. Speaks only public REAPI, so it measures any server.
//!
//! ```text
//! kiln-load sha256-rate [--json FILE]            one core's SHA-256 bytes/s
//! kiln-load tcp-rate [--json FILE]               one loopback TCP stream's bytes/s
//! kiln-load disk-rate --dir DIR [--json FILE]    sequential write + fsync bytes/s, fsyncs/s
//! kiln-load spawn-rate [--json FILE]             /bin/true started and waited for, per second
//! kiln-load suite --endpoint grpc://127.0.0.1:8980 [--quick] [--limits FILE]... [--json FILE]
//! ```
//!
//! The probes' `--json` files are what `suite --limits` reads, so one run can put every
//! figure next to the machine's ceilings. `scripts/bench.sh` does all of it against a fresh
//! node.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use chaos_tests::load::client::Clients;
use chaos_tests::load::limits::{self, MachineLimits};
use chaos_tests::load::memory;
use chaos_tests::load::report::{evaluate_checks, render_table, SuiteReport};
use chaos_tests::load::workloads::{Suite, SuiteOptions};
use clap::{Parser, Subcommand};

const MIB: u64 = 1 << 20;

#[derive(Parser)]
#[command(
    name = "kiln-load",
    version,
    about = "Load generator and machine-limit probes for REAPI servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every workload against a server; prints a table, optionally writes JSON.
    Suite {
        /// The server: grpc://host:port (or host:port).
        #[arg(long)]
        endpoint: String,
        /// REAPI instance name sent with every request.
        #[arg(long, default_value = "")]
        instance: String,
        /// About 1 s per workload instead of about 5 s.
        #[arg(long)]
        quick: bool,
        /// Writes the full report here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Machine-limit records written by the probe subcommands (repeatable); adds ratios
        /// and the benchmark checks to the report.
        #[arg(long)]
        limits: Vec<PathBuf>,
        /// gRPC connections, operations spread round-robin over them.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Data bytes per ByteStream WriteRequest.
        #[arg(long, default_value_t = 1 << 20)]
        write_chunk_bytes: usize,
        /// Concurrency levels (comma-separated) of the workloads that run at several.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16])]
        concurrency: Vec<usize>,
        /// Concurrency levels (comma-separated) of execute-trivial.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 32])]
        exec_concurrency: Vec<usize>,
        /// Runs only workloads whose name contains this (repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// KEY=VALUE recorded in the JSON report (repeatable): git revision, machine, notes.
        #[arg(long, value_parser = parse_meta)]
        meta: Vec<(String, String)>,
    },
    /// One core's SHA-256 rate over data in memory, bytes/s (best of 3).
    Sha256Rate {
        /// Bytes hashed per attempt.
        #[arg(long, default_value_t = 256 * MIB)]
        bytes: u64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One loopback TCP stream's throughput, bytes/s (1 MiB writes, TCP_NODELAY both ends).
    TcpRate {
        /// Bytes pushed through the connection per attempt.
        #[arg(long, default_value_t = 1024 * MIB)]
        bytes: u64,
        /// Attempts, each on a new connection; the best counts.
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A file in the page cache sent over one loopback TCP stream by 1 MiB pread + write,
    /// bytes/s (best of 3): what serving cached blob bytes costs without any protocol.
    FileSendRate {
        /// Directory to hold the probe file (the server's data directory's file system).
        #[arg(long)]
        dir: PathBuf,
        /// Size of the probe file: larger than the CPU caches.
        #[arg(long, default_value_t = 64 * MIB)]
        bytes: u64,
        /// Times the file is sent per attempt.
        #[arg(long, default_value_t = 4)]
        passes: u32,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Joins reports of partial runs of the suite against one server (`suite --only ...`) into
    /// one: the first report's header, every run's workloads, and the checks evaluated anew
    /// over all of them. Prints the table.
    Merge {
        /// Writes the merged report here as JSON.
        #[arg(long)]
        json: PathBuf,
        /// The reports, in order.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
    /// Processes started and waited for per second, one at a time (/bin/true; best of 3).
    SpawnRate {
        /// Processes per attempt.
        #[arg(long, default_value_t = 1000)]
        count: u32,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A server's memory (it must run on this machine): its idle resident set, then how far
    /// one large streamed upload raises its peak. Checks the targets: idle under 100 MiB, the
    /// upload's growth under 64 MiB. Run it on a fresh server, before other load.
    Memory {
        /// The server: grpc://host:port (or host:port).
        #[arg(long)]
        endpoint: String,
        /// The server's process id (its /proc/PID/status is read).
        #[arg(long)]
        pid: u32,
        /// REAPI instance name.
        #[arg(long, default_value = "")]
        instance: String,
        /// Size of the upload.
        #[arg(long, default_value_t = 1024 * MIB)]
        bytes: u64,
        /// Seconds the server is left idle before its resident set is read.
        #[arg(long, default_value_t = 2.0)]
        settle_secs: f64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Sequential write in 1 MiB writes then fsync, bytes/s (and the writes alone); 4 KiB
    /// append + fdatasync pairs per second.
    DiskRate {
        /// Directory on the file system to measure (the server's data directory's).
        #[arg(long)]
        dir: PathBuf,
        /// Bytes written sequentially: more than the page cache recycles quickly, so the
        /// figure is the steady state a server writing gigabytes sees.
        #[arg(long, default_value_t = 1024 * MIB)]
        bytes: u64,
        /// Small write + fdatasync pairs timed.
        #[arg(long, default_value_t = 200)]
        fsyncs: u32,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn write_json<T: serde::Serialize>(path: &Option<PathBuf>, value: &T) -> anyhow::Result<()> {
    if let Some(p) = path {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn mbs(bytes_per_sec: f64) -> String {
    format!("{:.0} MB/s", bytes_per_sec / 1e6)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Sha256Rate { bytes, json } => {
            let rate = tokio::task::spawn_blocking(move || limits::sha256_rate(bytes, 3)).await?;
            println!(
                "sha256-rate: {} (one core, {} MiB in 1 MiB updates, best of 3)",
                mbs(rate),
                bytes / MIB
            );
            write_json(
                &json,
                &MachineLimits {
                    sha256_bytes_per_sec: Some(rate),
                    ..Default::default()
                },
            )
        }
        Command::TcpRate {
            bytes,
            attempts,
            json,
        } => {
            let mut rate: f64 = 0.0;
            for _ in 0..attempts.max(1) {
                rate = rate.max(limits::tcp_rate(bytes).await?);
            }
            println!(
                "tcp-rate: {} (one loopback stream, {} MiB in 1 MiB writes, best of {attempts})",
                mbs(rate),
                bytes / MIB
            );
            write_json(
                &json,
                &MachineLimits {
                    tcp_loopback_bytes_per_sec: Some(rate),
                    ..Default::default()
                },
            )
        }
        Command::FileSendRate {
            dir,
            bytes,
            passes,
            json,
        } => {
            let d = dir.clone();
            let rate =
                tokio::task::spawn_blocking(move || limits::file_send_rate(&d, bytes, passes, 3))
                    .await??;
            println!(
                "file-send-rate: {} (a {} MiB file in the page cache of {}, sent {passes} times over one \
                 loopback stream by 1 MiB pread + write, best of 3)",
                mbs(rate),
                bytes / MIB,
                dir.display()
            );
            write_json(
                &json,
                &MachineLimits {
                    file_send_bytes_per_sec: Some(rate),
                    ..Default::default()
                },
            )
        }
        Command::Merge { json, reports } => {
            let mut parts = reports.iter().map(|p| {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                serde_json::from_str::<SuiteReport>(&text).with_context(|| format!("{} is not a kiln-load report", p.display()))
            });
            let mut merged = parts.next().expect("clap requires one")?;
            for part in parts {
                let part = part?;
                merged.workloads.extend(part.workloads);
                merged.skipped.extend(part.skipped);
            }
            merged.checks = evaluate_checks(&merged.workloads, merged.limits.as_ref());
            print!("\n{}", render_table(&merged));
            write_json(&Some(json), &merged)
        }
        Command::SpawnRate { count, json } => {
            let rate = tokio::task::spawn_blocking(move || limits::spawn_rate(count, 3)).await??;
            println!(
                "spawn-rate: {rate:.0}/s ({} started and waited for one at a time, {count} per attempt, best of 3; {:.2} ms each)",
                limits::TRIVIAL_PROGRAM,
                1e3 / rate
            );
            write_json(
                &json,
                &MachineLimits {
                    spawns_per_sec: Some(rate),
                    ..Default::default()
                },
            )
        }
        Command::Memory {
            endpoint,
            pid,
            instance,
            bytes,
            settle_secs,
            json,
        } => {
            let clients = Clients::connect(&endpoint, 1, &instance).await?;
            let settle = std::time::Duration::from_secs_f64(settle_secs.max(0.0));
            let r = memory::measure(&clients, pid, bytes, settle).await?;
            let mib = |b: u64| b as f64 / MIB as f64;
            println!(
                "memory: idle RSS {:.1} MiB; a {} MiB upload ({:.1} s) took the RSS from {:.1} to a peak of {:.1} MiB (+{:.1} MiB; {})",
                mib(r.idle_rss_bytes),
                bytes / MIB,
                r.upload_secs,
                mib(r.rss_before_bytes),
                mib(r.peak_rss_during_bytes),
                mib(r.upload_peak_growth_bytes),
                if r.peak_reset { "the kernel's peak, reset first" } else { "sampled every 10 ms" }
            );
            let verdict = |ok: bool| if ok { "ok   " } else { "BELOW" };
            println!(
                "check {} idle RSS < 100 MiB — {:.1} MiB",
                verdict(r.idle_rss_bytes < 100 * MIB),
                mib(r.idle_rss_bytes)
            );
            println!(
                "check {} a {} MiB upload raises the peak RSS by < 64 MiB — +{:.1} MiB",
                verdict(r.upload_peak_growth_bytes < 64 * MIB),
                bytes / MIB,
                mib(r.upload_peak_growth_bytes)
            );
            write_json(&json, &r)
        }
        Command::DiskRate {
            dir,
            bytes,
            fsyncs,
            json,
        } => {
            let d = dir.clone();
            let r =
                tokio::task::spawn_blocking(move || limits::disk_rate(&d, bytes, fsyncs)).await??;
            println!(
                "disk-rate: {} sequential write + fsync ({} MiB in 1 MiB writes; the writes alone {}), \
                 {:.0} fsyncs/s (4 KiB append + fdatasync) in {}",
                mbs(r.write_fsync_bytes_per_sec),
                bytes / MIB,
                mbs(r.page_cache_bytes_per_sec),
                r.fsyncs_per_sec,
                dir.display()
            );
            write_json(
                &json,
                &MachineLimits {
                    disk_write_fsync_bytes_per_sec: Some(r.write_fsync_bytes_per_sec),
                    page_cache_write_bytes_per_sec: Some(r.page_cache_bytes_per_sec),
                    fsyncs_per_sec: Some(r.fsyncs_per_sec),
                    ..Default::default()
                },
            )
        }
        Command::Suite {
            endpoint,
            instance,
            quick,
            json,
            limits,
            connections,
            write_chunk_bytes,
            concurrency,
            exec_concurrency,
            only,
            meta,
        } => {
            let machine = if limits.is_empty() {
                None
            } else {
                Some(MachineLimits::load_all(&limits)?)
            };
            let started_unix_secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let clients = Clients::connect(&endpoint, connections, &instance).await?;
            let opts = SuiteOptions {
                quick,
                write_chunk_bytes,
                concurrencies: concurrency,
                exec_concurrencies: exec_concurrency,
                only,
            };
            let suite = Suite::new(clients, opts).await?;
            let (mut workloads, skipped) = suite.run_all().await;
            if let Some(l) = &machine {
                for w in &mut workloads {
                    w.compute_ratios(l);
                }
            }
            let checks = evaluate_checks(&workloads, machine.as_ref());
            let report = SuiteReport {
                tool: "kiln-load".into(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
                started_unix_secs,
                endpoint,
                instance_name: instance,
                quick,
                connections,
                write_chunk_bytes,
                blobs_per_batch: suite.blobs_per_batch(),
                cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
                server: suite.server().clone(),
                limits: machine,
                meta: meta.into_iter().collect::<BTreeMap<_, _>>(),
                workloads,
                skipped,
                checks,
            };
            print!("\n{}", render_table(&report));
            write_json(&json, &report)?;
            let failed = report
                .workloads
                .iter()
                .filter(|w| w.error.is_some())
                .count();
            anyhow::ensure!(failed == 0, "{failed} workload(s) failed (see the table)");
            Ok(())
        }
    }
}
