//! The [`Executor`]: runs one action end to end, as four explicit phases (prepare → execute →
//! upload → clean up), and turns whatever happened into the `ExecuteResponse` to report.
//!
//! Layout of `work_dir`:
//! - `actions/<uuid>/root/`: the input root of one running action, its working directory
//!   somewhere below; `actions/<uuid>/stdout` and `stderr` sit beside the root so that an
//!   output directory `""` (the whole root) does not capture them. After an action its
//!   directory is emptied (root cleared, output files truncated) and kept for a later one;
//! - `cache/`: the local content cache ([`super::cache`]);
//! - `tmp/`: files being fetched into the cache.
//!
//! `actions/` and `tmp/` are emptied when an [`Executor`] is created: whatever is there belongs
//! to a worker that died mid-action.
//!
//! Cancellation is a [`CancellationToken`]: the bot cancels it when the lease is cancelled or
//! lost. A cancelled action stops at once, whatever its phase: the process group is killed, no
//! output is uploaded, the action directory is removed, and the status is CANCELLED. Dropping
//! the `execute` future instead also kills the process group and removes the directory (on the
//! blocking pool), but returns nothing.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::{self, Action, ActionResult, Command, ExecuteResponse, ExecutedActionMetadata};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cache::{ContentCache, Pins};
use super::materialize::{self, resolve_command_path};
use super::outputs::{self, Collected, OutputKind, OutputRequest, Upload};
use super::remote::{batches, run_bounded, BlobSource, RemoteCas, SendFuture, SMALL_BLOB_MAX_BYTES};
use super::ExecError;
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};

/// Timeout of an action whose `Action.timeout` is unset or zero.
pub const DEFAULT_ACTION_TIMEOUT: Duration = Duration::from_secs(3600);
/// The digest function of every blob the worker fetches, builds or uploads.
// TODO(worker): take it from the lease (`ExecuteRequest.digest_function`) to serve BLAKE3.
pub const DIGEST_FUNCTION: DigestFunction = DigestFunction::Sha256;
/// Name of the input root inside an action directory.
const ROOT_DIR: &str = "root";
const STDOUT_FILE: &str = "stdout";
const STDERR_FILE: &str = "stderr";

/// What an [`Executor`] needs to know.
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// Root of the action directories and of the local content cache; created if missing.
    /// Action directories are hardlinked from the cache, so both live on this one file system.
    pub work_dir: PathBuf,
    /// Bound of the local content cache, in bytes. Files in use by running actions are never
    /// evicted, so the cache may exceed it while they run.
    pub cache_max_bytes: u64,
    /// Reported as `ExecutedActionMetadata.worker`.
    pub worker_name: String,
}

/// Counters since the [`Executor`] was created (see [`Executor::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecutorStats {
    /// Calls to [`Executor::execute`] that returned, whatever the outcome.
    pub actions_executed: u64,
    /// Input files (distinct per action, by content and mode) found in the local cache.
    pub cache_hits: u64,
    /// Input files that were not in the local cache.
    pub cache_misses: u64,
    /// Input file blobs downloaded from the CAS, and their bytes (Action, Command and
    /// Directory messages are not counted).
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    /// Blobs uploaded to the CAS (the ones `FindMissingBlobs` said it lacked), and their bytes.
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Bytes in the local cache now, and files it evicted so far.
    pub cache_bytes: u64,
    pub cache_evictions: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub actions_executed: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub blobs_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub blobs_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
}

/// Runs actions; cheap to clone, and clones share the cache. Several actions may run at once.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ExecutorConfig,
    actions_dir: PathBuf,
    cache: Arc<ContentCache>,
    counters: Counters,
    /// Action directories being removed after their result was returned, at most this many.
    cleanups: Arc<tokio::sync::Semaphore>,
    /// Emptied action directories kept for the next actions (see [`recycle`]).
    spare: Arc<parking_lot::Mutex<Vec<PathBuf>>>,
}

/// Emptied action directories kept for reuse at most.
const MAX_SPARE_DIRS: usize = 32;

/// Action directories removed in the background at once; a worker that finishes actions faster
/// than it can remove their directories waits for a removal before returning the next result.
const MAX_PENDING_CLEANUPS: u32 = 64;

/// How the command ended, when it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Exited,
    TimedOut(Duration),
}

struct RunOutcome {
    exit_code: i32,
    ended: Ended,
}

/// The result of the prepare phase.
struct Prepared {
    command: Command,
    timeout: Duration,
    root: PathBuf,
    workdir: PathBuf,
    outputs: Vec<OutputRequest>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Executor {
    /// Creates the work directory's layout, removes what a previous worker left in
    /// `actions/` and `tmp/`, and opens the local content cache (keeping its intact files).
    /// Blocking: call it at start-up.
    pub fn new(cfg: ExecutorConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.work_dir).map_err(|e| KilnError::io(format!("create {}", cfg.work_dir.display()), e))?;
        // Absolute, so that argv[0] and the working directory never depend on the worker's.
        let work_dir = std::fs::canonicalize(&cfg.work_dir).map_err(|e| KilnError::io(format!("resolve {}", cfg.work_dir.display()), e))?;
        let actions_dir = work_dir.join("actions");
        std::fs::create_dir_all(&actions_dir).map_err(|e| KilnError::io(format!("create {}", actions_dir.display()), e))?;
        empty_dir(&actions_dir)?;
        let cache = ContentCache::open(work_dir.join("cache"), work_dir.join("tmp"), cfg.cache_max_bytes)?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                actions_dir,
                cache: Arc::new(cache),
                counters: Counters::default(),
                cleanups: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_CLEANUPS as usize)),
                spare: Arc::new(parking_lot::Mutex::new(Vec::new())),
            }),
        })
    }

    pub fn config(&self) -> &ExecutorConfig {
        &self.inner.cfg
    }

    /// Waits until the directories of every action returned so far are removed.
    pub async fn settled(&self) {
        let _all = self.inner.cleanups.acquire_many(MAX_PENDING_CLEANUPS).await;
    }

    pub fn stats(&self) -> ExecutorStats {
        let c = &self.inner.counters;
        ExecutorStats {
            actions_executed: c.actions_executed.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_misses: c.cache_misses.load(Ordering::Relaxed),
            blobs_fetched: c.blobs_fetched.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            blobs_uploaded: c.blobs_uploaded.load(Ordering::Relaxed),
            bytes_uploaded: c.bytes_uploaded.load(Ordering::Relaxed),
            cache_bytes: self.inner.cache.bytes(),
            cache_evictions: self.inner.cache.evictions(),
        }
    }

    /// Runs the action `action_digest` (SHA-256) of `instance_name`, reading and writing blobs
    /// through the CAS behind `cas`, and returns the ExecuteResponse to report: `status` OK
    /// with the result when the command ran (whatever its exit code), DEADLINE_EXCEEDED with
    /// the partial result (logs and outputs as they were) when `Action.timeout` ran out,
    /// CANCELLED when `cancel` fired, FAILED_PRECONDITION with a `PreconditionFailure` naming
    /// every missing blob, INVALID_ARGUMENT naming the bad name, path or field, or the CAS's
    /// own code when it failed. `result.execution_metadata` is always set. Never panics on
    /// what comes off the network.
    pub async fn execute(
        &self,
        cas: tonic::transport::Channel,
        instance_name: &str,
        action_digest: reapi::Digest,
        cancel: CancellationToken,
    ) -> ExecuteResponse {
        self.execute_live(cas, instance_name, action_digest, None, cancel, None).await
    }

    /// [`Self::execute`], also streaming the command's stdout and stderr live to `logs` if it
    /// runs long enough ([`super::livelog::LIVE_AFTER`]).
    /// `action` is the Action itself when the lease carried it (then it is not fetched).
    pub async fn execute_live(
        &self,
        cas: tonic::transport::Channel,
        instance_name: &str,
        action_digest: reapi::Digest,
        action: Option<Action>,
        cancel: CancellationToken,
        logs: Option<super::livelog::LiveTarget>,
    ) -> ExecuteResponse {
        let span = tracing::info_span!(
            "execute_action",
            action = %format!("{}/{}", action_digest.hash, action_digest.size_bytes),
            instance = %instance_name,
            worker = %self.inner.cfg.worker_name,
        );
        self.run_action(cas, instance_name, action_digest, action, cancel, logs).instrument(span).await
    }

    async fn run_action(
        &self,
        cas: tonic::transport::Channel,
        instance_name: &str,
        action_digest: reapi::Digest,
        action: Option<Action>,
        cancel: CancellationToken,
        logs: Option<super::livelog::LiveTarget>,
    ) -> ExecuteResponse {
        let mut meta = ExecutedActionMetadata {
            worker: self.inner.cfg.worker_name.clone(),
            worker_start_timestamp: Some(now()),
            ..Default::default()
        };
        let mut result = ActionResult::default();
        let spare = self.inner.spare.lock().pop();
        let action_dir = spare.unwrap_or_else(|| self.inner.actions_dir.join(uuid::Uuid::new_v4().to_string()));
        let mut guard = ActionDirGuard(Some(action_dir.clone()));
        let mut pins = Pins::new(self.inner.cache.clone());
        let remote = RemoteCas::new(cas, instance_name, DIGEST_FUNCTION);

        let outcome = self.phases(&remote, &action_digest, action, &action_dir, cancel, &mut pins, &mut meta, &mut result, logs).await;

        // Clean up, always: the directory, then the pins (their files may now be evicted). In
        // the background: the result does not wait for it (bounded by MAX_PENDING_CLEANUPS).
        guard.0 = None;
        let cache = self.inner.cache.clone();
        let spare = self.inner.spare.clone();
        let permit = self.inner.cleanups.clone().acquire_owned().await.ok(); // never closed
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let kept = match recycle(&action_dir) {
                Ok(()) => {
                    let mut s = spare.lock();
                    let keep = s.len() < MAX_SPARE_DIRS;
                    if keep {
                        s.push(action_dir.clone());
                    }
                    keep
                }
                Err(e) => {
                    tracing::debug!(error = %e, "action directory not reused");
                    false
                }
            };
            if !kept {
                if let Err(e) = remove_tree(&action_dir) {
                    tracing::warn!(error = %e, "cannot remove the action directory");
                }
            }
            drop(pins);
            cache.trim();
            record_phase("cleanup", started);
            drop(permit);
        });

        meta.worker_completed_timestamp = Some(now());
        result.execution_metadata = Some(meta);
        let (status, label) = match &outcome {
            Ok(Ended::Exited) => (kiln_proto::rpc_status(tonic::Code::Ok, "", vec![]), "ok"),
            Ok(Ended::TimedOut(t)) => (
                kiln_proto::rpc_status(
                    tonic::Code::DeadlineExceeded,
                    format!("the action timed out after {t:?}; its process group was killed"),
                    vec![],
                ),
                "timeout",
            ),
            Err(ExecError::Cancelled) => (ExecError::Cancelled.to_rpc_status(), "cancelled"),
            Err(e) => (e.to_rpc_status(), "error"),
        };
        self.inner.counters.actions_executed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(super::ACTIONS_EXECUTED, "outcome" => label).increment(1);
        match &outcome {
            Err(e) if !matches!(e, ExecError::Cancelled) => {
                tracing::warn!(outcome = label, code = ?e.code(), error = %e, "action failed")
            }
            _ => tracing::info!(outcome = label, exit_code = result.exit_code, "action done"),
        }
        ExecuteResponse {
            result: Some(result),
            cached_result: false,
            message: status.message.clone(),
            status: Some(status),
            server_logs: Default::default(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn phases(
        &self,
        remote: &RemoteCas,
        action_digest: &reapi::Digest,
        action: Option<Action>,
        action_dir: &Path,
        cancel: CancellationToken,
        pins: &mut Pins,
        meta: &mut ExecutedActionMetadata,
        result: &mut ActionResult,
        logs: Option<super::livelog::LiveTarget>,
    ) -> Result<Ended, ExecError> {
        let digest =
            BlobDigest::from_proto(DIGEST_FUNCTION, action_digest).map_err(|e| KilnError::invalid(format!("action_digest: {e}")))?;

        meta.input_fetch_start_timestamp = Some(now());
        let started = Instant::now();
        let prepared = cancellable(cancel.clone(), self.prepare(remote, digest, action, action_dir, pins)).await;
        meta.input_fetch_completed_timestamp = Some(now());
        record_phase("prepare", started);
        let prepared = prepared?;

        meta.execution_start_timestamp = Some(now());
        let started = Instant::now();
        let run = self.run_command(&prepared, cancel.clone(), logs).await;
        meta.execution_completed_timestamp = Some(now());
        record_phase("execute", started);
        let run = run?;
        result.exit_code = run.exit_code;

        // Uploaded after a timeout too: the logs and partial outputs tell why it took so long.
        meta.output_upload_start_timestamp = Some(now());
        let started = Instant::now();
        let uploaded = cancellable(cancel, self.upload(remote, &prepared, result)).await;
        meta.output_upload_completed_timestamp = Some(now());
        record_phase("upload", started);
        uploaded?;
        Ok(run.ended)
    }

    // ---- prepare ----

    async fn prepare(
        &self,
        remote: &RemoteCas,
        digest: BlobDigest,
        given: Option<Action>,
        action_dir: &Path,
        pins: &mut Pins,
    ) -> Result<Prepared, ExecError> {
        let action = match given {
            Some(a) => a,
            None => {
                let blobs = remote.fetch_to_memory("the action", &[digest]).await?;
                let bytes = blobs.get(&digest).ok_or_else(|| KilnError::Internal(format!("action {digest} was fetched but is absent")))?;
                Action::decode(&bytes[..]).map_err(|e| KilnError::invalid(format!("action {digest} does not decode: {e}")))?
            }
        };
        let command_digest = BlobDigest::from_proto_opt(DIGEST_FUNCTION, action.command_digest.as_ref())
            .map_err(|e| KilnError::invalid(format!("action {digest}: command_digest: {e}")))?;
        let input_root = BlobDigest::from_proto_opt(DIGEST_FUNCTION, action.input_root_digest.as_ref())
            .map_err(|e| KilnError::invalid(format!("action {digest}: input_root_digest: {e}")))?;
        let timeout = action_timeout(&action)?;

        // The Command and the tree together, so that all their missing blobs are named at once.
        let wanted = [command_digest];
        let (command, tree) =
            futures::join!(remote.fetch_to_memory("the command", &wanted), materialize::fetch_tree(remote, DIGEST_FUNCTION, input_root));
        let (command, tree) = match (command, tree) {
            (Ok(c), Ok(t)) => (c, t),
            (
                Err(ExecError::Kiln(KilnError::MissingBlobs { missing: mut a, .. })),
                Err(ExecError::Kiln(KilnError::MissingBlobs { missing: b, .. })),
            ) => {
                a.extend(b);
                return Err(ExecError::missing("the command and the input tree", a));
            }
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let bytes = command
            .get(&command_digest)
            .ok_or_else(|| KilnError::Internal(format!("command {command_digest} was fetched but is absent")))?;
        let command =
            Command::decode(&bytes[..]).map_err(|e| KilnError::invalid(format!("command {command_digest} does not decode: {e}")))?;
        let (workdir_rel, outputs) = check_command(&command)?;

        let plan = blocking(move || materialize::plan(&tree, DIGEST_FUNCTION)).await?;
        materialize::fill_cache(remote, &self.inner.cache, plan.keys(), pins, &self.inner.counters).await?;

        let root = action_dir.join(ROOT_DIR);
        let workdir = workdir_rel.iter().fold(root.clone(), |p, c| p.join(c));
        let cache = self.inner.cache.clone();
        let (dir, r, w, outs) = (action_dir.to_path_buf(), root.clone(), workdir.clone(), outputs.clone());
        blocking(move || {
            materialize::reuse_or_create_dir(&dir)?;
            materialize::materialize(&r, &plan, &cache)?;
            std::fs::create_dir_all(&w)
                .map_err(|e| KilnError::invalid(format!("cannot create the working directory {}: {e}", w.display())))?;
            // REAPI: the worker creates the parents of every output before the command runs.
            for o in &outs {
                if let Some((_, parent)) = o.rel.split_last() {
                    let p = parent.iter().fold(r.clone(), |p, c| p.join(c));
                    std::fs::create_dir_all(&p)
                        .map_err(|e| KilnError::invalid(format!("cannot create the parent directory of output {:?}: {e}", o.path)))?;
                }
            }
            Ok(())
        })
        .await?;
        Ok(Prepared {
            command,
            timeout,
            root,
            workdir,
            outputs,
            stdout: action_dir.join(STDOUT_FILE),
            stderr: action_dir.join(STDERR_FILE),
        })
    }

    // ---- execute ----

    async fn run_command(&self, p: &Prepared, cancel: CancellationToken, logs: Option<super::livelog::LiveTarget>) -> Result<RunOutcome, ExecError> {
        let open = |path: &Path| -> Result<std::fs::File> {
            std::fs::File::create(path).map_err(|e| KilnError::io(format!("create {}", path.display()), e))
        };
        let (stdout, stderr) = (open(&p.stdout)?, open(&p.stderr)?);
        let args = &p.command.arguments;
        let arg0 = &args[0];
        // With a `/`, argv[0] is a path from the working directory; without, the OS searches
        // the PATH of the command's own environment (std's exec does, once the environment is
        // replaced).
        let program = if arg0.contains('/') { p.workdir.join(arg0) } else { PathBuf::from(arg0) };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.arg0(arg0)
            .args(&args[1..])
            .env_clear()
            .envs(p.command.environment_variables.iter().map(|v| (&v.name, &v.value)))
            .current_dir(&p.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            KilnError::FailedPrecondition(format!("cannot start {arg0:?} in working directory {:?}: {e}", p.command.working_directory))
        })?;
        let mut group = ProcessGroup(child.id());
        tracing::debug!(pid = ?child.id(), ?program, "command started");
        let (done, done_rx) = tokio::sync::watch::channel(false);
        let tailers: Vec<_> =
            logs.into_iter().map(|t| tokio::spawn(super::livelog::follow(t, p.stdout.clone(), p.stderr.clone(), done_rx.clone()))).collect();

        enum Event {
            Exited(std::io::Result<std::process::ExitStatus>),
            Cancelled,
            TimedOut,
        }
        let event = tokio::select! {
            biased;
            s = child.wait() => Event::Exited(s),
            () = cancel.cancelled() => Event::Cancelled,
            () = tokio::time::sleep(p.timeout) => Event::TimedOut,
        };
        let wait_error = |e: std::io::Error| KilnError::io("wait for the command", e);
        let outcome = match event {
            Event::Exited(status) => {
                // Whatever the command left running in its group goes with it.
                group.kill();
                let status = status.map_err(wait_error)?;
                Ok(RunOutcome { exit_code: exit_code(status), ended: Ended::Exited })
            }
            Event::TimedOut => {
                group.kill();
                let status = child.wait().await.map_err(wait_error)?;
                Ok(RunOutcome { exit_code: exit_code(status), ended: Ended::TimedOut(p.timeout) })
            }
            Event::Cancelled => {
                group.kill();
                let _ = child.wait().await;
                Err(ExecError::Cancelled)
            }
        };
        // The live streams get the rest of the output and their end.
        let _ = done.send(true);
        for mut t in tailers {
            // Best effort: a stalled log stream never holds the action's result back.
            if tokio::time::timeout(super::livelog::FINISH_TIMEOUT, &mut t).await.is_err() {
                t.abort();
            }
        }
        outcome
    }

    // ---- upload ----

    async fn upload(&self, remote: &RemoteCas, p: &Prepared, result: &mut ActionResult) -> Result<(), ExecError> {
        let (root, requests, format) = (p.root.clone(), p.outputs.clone(), p.command.output_directory_format);
        let (out, err) = (p.stdout.clone(), p.stderr.clone());
        let (collected, stdout, stderr) = blocking(move || {
            let c = outputs::collect(&root, &requests, format, DIGEST_FUNCTION)?;
            Ok((c, outputs::hash_file(DIGEST_FUNCTION, &out)?, outputs::hash_file(DIGEST_FUNCTION, &err)?))
        })
        .await?;
        let mut collected = collected;
        let mut uploads = std::mem::take(&mut collected.uploads);
        uploads.push(Upload { digest: stdout, source: BlobSource::File(p.stdout.clone()) });
        uploads.push(Upload { digest: stderr, source: BlobSource::File(p.stderr.clone()) });
        self.upload_blobs(remote, uploads).await?;
        fill_result(result, collected, stdout, stderr);
        Ok(())
    }

    /// FindMissingBlobs, then the missing ones: small in batches, big streamed.
    async fn upload_blobs(&self, remote: &RemoteCas, uploads: Vec<Upload>) -> Result<(), ExecError> {
        let mut sources: HashMap<BlobDigest, BlobSource> = HashMap::new();
        for u in uploads {
            // REAPI servers treat the empty blob as always present.
            if u.digest.size > 0 {
                sources.entry(u.digest).or_insert(u.source);
            }
        }
        if sources.is_empty() {
            return Ok(());
        }
        let mut digests: Vec<BlobDigest> = sources.keys().copied().collect();
        digests.sort();
        let mut missing = remote.find_missing(&digests).await?;
        missing.sort();
        missing.dedup();
        missing.retain(|d| sources.contains_key(d));
        let (small, big): (Vec<BlobDigest>, Vec<BlobDigest>) = missing.iter().partition(|d| d.size <= SMALL_BLOB_MAX_BYTES);
        let sources = Arc::new(sources);

        // The futures own what they use (see `run_bounded`).
        let small_uploads: Vec<SendFuture<_>> = batches(small)
            .into_iter()
            .map(|batch| {
                let (remote, sources) = (remote.clone(), sources.clone());
                Box::pin(async move {
                    let blobs = blocking(move || {
                        batch
                            .iter()
                            .filter_map(|d| sources.get(d).map(|s| s.read_small(d).map(|data| (*d, data))))
                            .collect::<Result<Vec<_>>>()
                    })
                    .await?;
                    remote.batch_update(blobs).await
                }) as SendFuture<_>
            })
            .collect();
        run_bounded(small_uploads).await.into_iter().collect::<Result<Vec<()>, ExecError>>()?;
        let big_uploads: Vec<SendFuture<_>> = big
            .into_iter()
            .filter_map(|d| {
                let (remote, source) = (remote.clone(), sources.get(&d)?.clone());
                Some(remote.write_boxed(d, source))
            })
            .collect();
        run_bounded(big_uploads).await.into_iter().collect::<Result<Vec<()>, ExecError>>()?;

        let c = &self.inner.counters;
        c.blobs_uploaded.fetch_add(missing.len() as u64, Ordering::Relaxed);
        c.bytes_uploaded.fetch_add(missing.iter().map(|d| d.size).sum(), Ordering::Relaxed);
        Ok(())
    }
}

#[allow(deprecated)] // output_file_symlinks and output_directory_symlinks: filled for v2.0 clients
fn fill_result(result: &mut ActionResult, c: Collected, stdout: BlobDigest, stderr: BlobDigest) {
    result.output_files = c.files;
    result.output_directories = c.directories;
    result.output_symlinks = c.symlinks;
    result.output_file_symlinks = c.file_symlinks;
    result.output_directory_symlinks = c.directory_symlinks;
    result.stdout_digest = Some(stdout.to_proto());
    result.stderr_digest = Some(stderr.to_proto());
}

/// Checks the Command and resolves its working directory and outputs below the root.
/// `output_paths` (v2.1) wins over `output_files`/`output_directories` when set, as REAPI says.
#[allow(deprecated)] // output_files and output_directories: still sent by v2.0 clients
fn check_command(c: &Command) -> Result<(Vec<String>, Vec<OutputRequest>)> {
    if c.arguments.is_empty() || c.arguments[0].is_empty() {
        return Err(KilnError::invalid("the command has no arguments (argv[0] is missing or empty)"));
    }
    if let Some((i, a)) = c.arguments.iter().enumerate().find(|(_, a)| a.contains('\0')) {
        return Err(KilnError::invalid(format!("arguments[{i}] {a:?} contains a NUL character")));
    }
    for v in &c.environment_variables {
        if v.name.is_empty() || v.name.contains('=') || v.name.contains('\0') || v.value.contains('\0') {
            return Err(KilnError::invalid(format!(
                "environment variable {:?} is invalid: its name must be non-empty without '=' or NUL, its value without NUL",
                v.name
            )));
        }
    }
    let workdir = resolve_command_path("working_directory", &c.working_directory, &[], true)?;
    let mut outputs = Vec::new();
    let mut add = |field: &str, path: &String, kind: OutputKind, allow_empty: bool| -> Result<()> {
        let rel = resolve_command_path(field, path, &workdir, allow_empty)?;
        outputs.push(OutputRequest { path: path.clone(), rel, kind });
        Ok(())
    };
    if !c.output_paths.is_empty() {
        for p in &c.output_paths {
            add("output path", p, OutputKind::Path, true)?;
        }
    } else {
        for p in &c.output_files {
            add("output file", p, OutputKind::File, false)?;
        }
        for p in &c.output_directories {
            add("output directory", p, OutputKind::Directory, true)?;
        }
    }
    Ok((workdir, outputs))
}

fn action_timeout(a: &Action) -> Result<Duration> {
    match &a.timeout {
        None => Ok(DEFAULT_ACTION_TIMEOUT),
        Some(t) if t.seconds == 0 && t.nanos == 0 => Ok(DEFAULT_ACTION_TIMEOUT),
        Some(t) if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) => {
            Err(KilnError::invalid(format!("Action.timeout {}s {}ns is not a valid positive duration", t.seconds, t.nanos)))
        }
        Some(t) => Ok(Duration::new(t.seconds as u64, t.nanos as u32)),
    }
}

/// The exit code to report: the process's own, or 128 + the signal that killed it, as shells do.
fn exit_code(s: std::process::ExitStatus) -> i32 {
    match (s.code(), s.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => -1,
    }
}

fn now() -> Timestamp {
    let d = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn record_phase(phase: &'static str, started: Instant) {
    metrics::histogram!(super::ACTION_PHASE_SECONDS, "phase" => phase).record(started.elapsed().as_secs_f64());
}

/// Runs `fut` unless `cancel` fires first (then [`ExecError::Cancelled`]).
async fn cancellable<T>(cancel: CancellationToken, fut: impl std::future::Future<Output = Result<T, ExecError>>) -> Result<T, ExecError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(ExecError::Cancelled),
        r = fut => r,
    }
}

/// Runs blocking file-system work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T, ExecError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ExecError::Kiln(KilnError::Internal(format!("worker file-system task failed: {e}"))))?
        .map_err(ExecError::from)
}

/// The process group of a started command (its id is the leader's pid). Killed with SIGKILL
/// when dropped, so that a dropped `execute` future leaves nothing running.
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    /// SIGKILLs every process of the group, once. The group id cannot be reused while any
    /// member lives, so this reaches only the action's processes.
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let Ok(pgid) = i32::try_from(pgid) else { return };
            match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => tracing::warn!(pgid, error = %e, "cannot kill the action's process group"),
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Removes an action directory if `execute` was dropped before its clean-up phase.
struct ActionDirGuard(Option<PathBuf>);

impl Drop for ActionDirGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let remove = move || {
                if let Err(e) = remove_tree(&path) {
                    tracing::warn!(error = %e, "cannot remove an abandoned action directory");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(remove);
                }
                Err(_) => remove(),
            }
        }
    }
}

/// Removes a file, symlink or directory tree; a missing one is fine.
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => remove_tree(path),
        Ok(_) => std::fs::remove_file(path).map_err(|e| KilnError::io(format!("remove {}", path.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KilnError::io(format!("stat {}", path.display()), e)),
    }
}

/// Empties an action directory for the next action: its `root` is emptied and the `stdout`
/// and `stderr` files truncated, but the directory, `root` and the two files stay. Creating
/// them anew costs four inode allocations, which in profiles of short actions took about a
/// tenth of the worker's time (ext4 searches for a free inode that was not recently freed).
/// Fails if the directory holds anything else, or lacks one of them (the action failed before
/// its command ran); the caller then removes it.
fn recycle(dir: &Path) -> Result<()> {
    let root = dir.join(ROOT_DIR);
    // The command may have taken its own permissions away.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).map_err(|e| KilnError::io(format!("chmod {}", root.display()), e))?;
    empty_dir(&root)?;
    for name in [STDOUT_FILE, STDERR_FILE] {
        let p = dir.join(name);
        std::fs::OpenOptions::new().write(true).truncate(true).open(&p).map_err(|e| KilnError::io(format!("truncate {}", p.display()), e))?;
    }
    let listing = std::fs::read_dir(dir).map_err(|e| KilnError::io(format!("list {}", dir.display()), e))?;
    for item in listing {
        let name = item.map_err(|e| KilnError::io(format!("list {}", dir.display()), e))?.file_name();
        if ![ROOT_DIR, STDOUT_FILE, STDERR_FILE].iter().any(|n| name == *n) {
            return Err(KilnError::Internal(format!("unexpected {name:?} in {}", dir.display())));
        }
    }
    Ok(())
}

/// Removes everything inside `dir`.
pub(crate) fn empty_dir(dir: &Path) -> Result<()> {
    let listing = std::fs::read_dir(dir).map_err(|e| KilnError::io(format!("list {}", dir.display()), e))?;
    for item in listing {
        let item = item.map_err(|e| KilnError::io(format!("list {}", dir.display()), e))?;
        remove_any(&item.path())?;
    }
    Ok(())
}

/// Removes a directory tree even where the action took away its own write permission: on a
/// first failure every directory below gets `u+rwx` (symlinks are not followed) and the
/// removal is tried again.
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => tracing::debug!(path = %path.display(), error = %e, "removal failed; making the tree writable"),
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&dir) else { continue };
        if !m.is_dir() {
            continue;
        }
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m.permissions().mode() | 0o700));
        if let Ok(listing) = std::fs::read_dir(&dir) {
            stack.extend(listing.flatten().map(|e| e.path()));
        }
    }
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KilnError::io(format!("remove {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::command::EnvironmentVariable;

    /// The bot loop spawns `execute`: its future must be `Send + 'static` given owned inputs.
    #[allow(dead_code)]
    fn execute_can_be_spawned(e: Executor, channel: tonic::transport::Channel, d: reapi::Digest) {
        drop(tokio::spawn(async move { e.execute(channel, "", d, CancellationToken::new()).await }));
    }

    #[test]
    fn timeouts_default_and_refuse_negative_values() {
        let mut a = Action::default();
        assert_eq!(action_timeout(&a).unwrap(), DEFAULT_ACTION_TIMEOUT);
        a.timeout = Some(kiln_proto::protobuf::Duration { seconds: 2, nanos: 5 });
        assert_eq!(action_timeout(&a).unwrap(), Duration::new(2, 5));
        a.timeout = Some(kiln_proto::protobuf::Duration { seconds: -1, nanos: 0 });
        assert_eq!(action_timeout(&a).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    #[allow(deprecated)]
    fn commands_are_checked_and_output_paths_win_over_the_legacy_fields() {
        let mut c = Command { arguments: vec!["true".into()], working_directory: "w".into(), ..Default::default() };
        c.output_files = vec!["f".into()];
        c.output_paths = vec!["../p".into()];
        let (wd, outs) = check_command(&c).unwrap();
        assert_eq!(wd, vec!["w"]);
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].rel, vec!["p"]);
        c.environment_variables = vec![EnvironmentVariable { name: "A=B".into(), value: "x".into() }];
        assert!(check_command(&c).unwrap_err().to_string().contains("\"A=B\""));
        c.environment_variables.clear();
        c.working_directory = "..".into();
        assert!(check_command(&c).unwrap_err().to_string().contains("working_directory"));
        c.working_directory.clear();
        c.arguments.clear();
        assert!(check_command(&c).is_err());
    }

    #[test]
    fn signal_deaths_report_128_plus_the_signal() {
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(3 << 8)), 3);
    }
}
