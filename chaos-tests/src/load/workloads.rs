//! The workloads of `kiln-load suite`, each a public-REAPI conversation a build tool has with
//! a cache, and the order they run in.
//!
//! | workload | RPC | per operation | concurrency |
//! |---|---|---|---|
//! | `bytestream-write-1MiB` / `-64MiB` | ByteStream.Write | one new blob, streamed in chunks | 1, 16 / 1 |
//! | `bytestream-read-1MiB` / `-64MiB` | ByteStream.Read | one blob written above, whole | 1, 16 / 1 |
//! | `batch-update-4KiB` | CAS.BatchUpdateBlobs | 500 new 4 KiB blobs | 1, 16 |
//! | `batch-read-4KiB` | CAS.BatchReadBlobs | 500 blobs written above | 1, 16 |
//! | `find-missing-10k` | CAS.FindMissingBlobs | 10,000 digests, half present | 1, 16 |
//! | `action-cache-mix` | ActionCache.Update/GetActionResult | 50/50: update a new entry, or get a stored one | 1, 16 |
//! | `execute-trivial` | Execution.Execute | one new `/bin/true` action, to its done Operation ([`execute`](super::execute)) | 1, 16, 32 |
//!
//! 64 MiB blobs run at concurrency 1 only, to keep the client's memory (a round's requests)
//! and the run's length bounded. Reads use blobs the write workloads stored; if those did not
//! run (`--only`) or stored too few, a few are uploaded untimed first. Every read is checked
//! for length while timed, and one read per workload is checked against its digest, untimed.
//! `execute-trivial` runs only when the server reports `exec_enabled`; otherwise it is listed
//! as skipped with that reason.

use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context};
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::{
    batch_update_blobs_request, digest_function, ActionResult, BatchReadBlobsRequest,
    BatchUpdateBlobsRequest, Digest, FindMissingBlobsRequest, GetActionResultRequest,
    GetCapabilitiesRequest, OutputFile, UpdateActionResultRequest,
};

use super::blobs::{digest_of, read_resource, write_resource, BlobFactory, XorShift};
use super::client::Clients;
use super::execute::{self, TrivialActions};
use super::report::{ServerInfo, Skipped, WorkloadResult};
use super::runner::{run_rounds, Bounds, OpOutcome, RunTotals};

/// 1 MiB, the "large but ordinary" blob (an object file, a small jar).
pub const MEDIUM_BLOB_BYTES: usize = 1 << 20;
/// 64 MiB, the blob that must stream (a linked binary, an archive).
pub const LARGE_BLOB_BYTES: usize = 64 << 20;
/// 4 KiB, the typical small source or header file.
pub const SMALL_BLOB_BYTES: usize = 4 << 10;
/// Blobs per BatchUpdateBlobs / BatchReadBlobs call (2 MB of payload), unless the server's
/// `max_batch_total_size_bytes` is smaller.
pub const BLOBS_PER_BATCH: usize = 500;
/// Digests per FindMissingBlobs call, half of them present.
pub const FIND_MISSING_DIGESTS: usize = 10_000;
/// Action Cache entries stored before the timed mix, so that its first gets have targets.
const AC_SEED_ENTRIES: usize = 64;
/// Blobs uploaded untimed for a read workload whose write workload stored none.
const READ_POOL_TOP_UP: usize = 4;

/// What the suite may vary.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Shorter bounds for every workload (a smoke run, ~1 s each).
    pub quick: bool,
    /// Bytes of data per ByteStream WriteRequest.
    pub write_chunk_bytes: usize,
    /// Concurrency levels of the workloads that run at several.
    pub concurrencies: Vec<usize>,
    /// Concurrency levels of `execute-trivial`.
    pub exec_concurrencies: Vec<usize>,
    /// Run only workloads whose name contains one of these (all when empty).
    pub only: Vec<String>,
}

/// One suite run against one server.
pub struct Suite {
    clients: Arc<Clients>,
    factory: Arc<BlobFactory>,
    opts: SuiteOptions,
    blobs_per_batch: usize,
    server: ServerInfo,
    /// Digests of stored 1 MiB and 64 MiB blobs (for the reads).
    medium: Arc<Mutex<Vec<Digest>>>,
    large: Arc<Mutex<Vec<Digest>>>,
    /// Stored 4 KiB blobs, one inner vector per batch (for batch reads and FindMissing).
    small_batches: Arc<Mutex<Vec<Vec<Digest>>>>,
}

/// A workload's name, per-operation item unit, and bounds in full and `--quick` runs.
struct Spec {
    name: &'static str,
    item_unit: &'static str,
    moves_bytes: bool,
    full: Bounds,
    quick: Bounds,
}

const fn bounds(max_ops: u64, max_seconds: f64, round_ops: usize) -> Bounds {
    Bounds {
        max_ops,
        max_seconds,
        round_ops,
    }
}

// Bounds: ~5 s of timed work per workload (~1 s in --quick), and an operation cap that keeps
// disk use and preparation time reasonable on a fast server. A round holds several times the
// highest concurrency so that rounds' edges (tails below full concurrency) stay small.
const BS_WRITE_MEDIUM: Spec = Spec {
    name: "bytestream-write-1MiB",
    item_unit: "blob",
    moves_bytes: true,
    full: bounds(2000, 5.0, 64),
    quick: bounds(192, 1.0, 64),
};
const BS_WRITE_LARGE: Spec = Spec {
    name: "bytestream-write-64MiB",
    item_unit: "blob",
    moves_bytes: true,
    full: bounds(12, 5.0, 1),
    quick: bounds(3, 1.0, 1),
};
const BS_READ_MEDIUM: Spec = Spec {
    name: "bytestream-read-1MiB",
    item_unit: "blob",
    moves_bytes: true,
    full: bounds(4000, 5.0, 128),
    quick: bounds(384, 1.0, 128),
};
const BS_READ_LARGE: Spec = Spec {
    name: "bytestream-read-64MiB",
    item_unit: "blob",
    moves_bytes: true,
    full: bounds(24, 5.0, 1),
    quick: bounds(4, 1.0, 1),
};
const BATCH_UPDATE: Spec = Spec {
    name: "batch-update-4KiB",
    item_unit: "blob",
    moves_bytes: true,
    full: bounds(400, 5.0, 32),
    quick: bounds(48, 1.0, 32),
};
const BATCH_READ: Spec = Spec {
    name: "batch-read-4KiB",
    item_unit: "blob",
    moves_bytes: true,
    full: bounds(800, 5.0, 64),
    quick: bounds(96, 1.0, 64),
};
const FIND_MISSING: Spec = Spec {
    name: "find-missing-10k",
    item_unit: "digest",
    moves_bytes: false,
    full: bounds(2000, 5.0, 64),
    quick: bounds(128, 1.0, 32),
};
const AC_MIX: Spec = Spec {
    name: "action-cache-mix",
    item_unit: "entry",
    moves_bytes: false,
    full: bounds(20_000, 5.0, 256),
    quick: bounds(1000, 1.0, 128),
};
// ~10 s per level (2 s in --quick): each action leaves an operation and an Action Cache entry
// behind, and a worker running real processes is slower to settle than a cache.
const EXECUTE: Spec = Spec {
    name: "execute-trivial",
    item_unit: "action",
    moves_bytes: false,
    full: bounds(2000, 10.0, 256),
    quick: bounds(256, 2.0, 128),
};

/// An Action Cache operation of the mix.
enum AcOp {
    Update(Box<UpdateActionResultRequest>),
    Get(GetActionResultRequest),
}

const SHA256: i32 = digest_function::Value::Sha256 as i32;

impl Suite {
    /// Asks the server for its capabilities and sizes the batches to fit them.
    pub async fn new(clients: Clients, opts: SuiteOptions) -> anyhow::Result<Self> {
        let caps = clients
            .capabilities()
            .get_capabilities(GetCapabilitiesRequest {
                instance_name: clients.instance.clone(),
            })
            .await
            .context("GetCapabilities")?
            .into_inner();
        let server = ServerInfo {
            max_batch_total_size_bytes: caps
                .cache_capabilities
                .as_ref()
                .map_or(0, |c| c.max_batch_total_size_bytes),
            exec_enabled: caps
                .execution_capabilities
                .as_ref()
                .is_some_and(|e| e.exec_enabled),
        };
        // 0 means "no limit" in REAPI; leave 64 KiB of room for the message framing otherwise.
        let blobs_per_batch = match server.max_batch_total_size_bytes {
            n if n <= 0 => BLOBS_PER_BATCH,
            n => BLOBS_PER_BATCH
                .min((n as usize).saturating_sub(64 << 10) / SMALL_BLOB_BYTES)
                .max(1),
        };
        Ok(Self {
            clients: Arc::new(clients),
            factory: Arc::new(BlobFactory::new(BlobFactory::clock_nonce())),
            opts,
            blobs_per_batch,
            server,
            medium: Arc::default(),
            large: Arc::default(),
            small_batches: Arc::default(),
        })
    }

    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    pub fn blobs_per_batch(&self) -> usize {
        self.blobs_per_batch
    }

    fn wanted(&self, name: &str) -> bool {
        self.opts.only.is_empty() || self.opts.only.iter().any(|o| name.contains(o.as_str()))
    }

    fn bounds(&self, spec: &Spec) -> Bounds {
        if self.opts.quick {
            spec.quick
        } else {
            spec.full
        }
    }

    /// Runs every workload in order; a failed workload is reported and the next one runs.
    pub async fn run_all(&self) -> (Vec<WorkloadResult>, Vec<Skipped>) {
        let mut results = Vec::new();
        let cs = self.opts.concurrencies.clone();
        let mut plan: Vec<(&Spec, usize)> = Vec::new();
        plan.extend(cs.iter().map(|&c| (&BS_WRITE_MEDIUM, c)));
        plan.push((&BS_WRITE_LARGE, 1));
        plan.extend(cs.iter().map(|&c| (&BS_READ_MEDIUM, c)));
        plan.push((&BS_READ_LARGE, 1));
        plan.extend(cs.iter().map(|&c| (&BATCH_UPDATE, c)));
        plan.extend(cs.iter().map(|&c| (&BATCH_READ, c)));
        plan.extend(cs.iter().map(|&c| (&FIND_MISSING, c)));
        plan.extend(cs.iter().map(|&c| (&AC_MIX, c)));
        let mut skipped = Vec::new();
        if !self.server.exec_enabled {
            skipped.push(Skipped {
                name: EXECUTE.name.into(),
                reason: "the server reports exec_enabled = false (no remote execution to measure)"
                    .into(),
            });
        } else {
            plan.extend(self.opts.exec_concurrencies.iter().map(|&c| (&EXECUTE, c)));
        }
        let mut actions: Option<Arc<TrivialActions>> = None;
        for (spec, c) in plan {
            if !self.wanted(spec.name) {
                continue;
            }
            eprintln!("kiln-load: {} at concurrency {c} ...", spec.name);
            let b = self.bounds(spec);
            let run = match spec.name {
                n if n == BS_WRITE_MEDIUM.name => {
                    self.bytestream_write(MEDIUM_BLOB_BYTES, &self.medium, c, b)
                        .await
                }
                n if n == BS_WRITE_LARGE.name => {
                    self.bytestream_write(LARGE_BLOB_BYTES, &self.large, c, b)
                        .await
                }
                n if n == BS_READ_MEDIUM.name => {
                    self.bytestream_read(MEDIUM_BLOB_BYTES, &self.medium, c, b)
                        .await
                }
                n if n == BS_READ_LARGE.name => {
                    self.bytestream_read(LARGE_BLOB_BYTES, &self.large, c, b)
                        .await
                }
                n if n == BATCH_UPDATE.name => self.batch_update(c, b).await,
                n if n == BATCH_READ.name => self.batch_read(c, b).await,
                n if n == FIND_MISSING.name => self.find_missing(c, b).await,
                n if n == AC_MIX.name => self.action_cache_mix(c, b).await,
                n if n == EXECUTE.name => self.execute_trivial(&mut actions, c, b).await,
                n => Err(anyhow::anyhow!("workload {n} has no implementation")),
            };
            let result = match run {
                Ok(t) => {
                    WorkloadResult::from_totals(spec.name, c, spec.item_unit, spec.moves_bytes, &t)
                        .with_failures(&t)
                }
                Err(e) => WorkloadResult::failed(spec.name, c, spec.item_unit, format!("{e:#}")),
            };
            match &result.error {
                Some(e) if result.ops > 0 => eprintln!(
                    "kiln-load:   {} ops in {:.2} s, FAILED: {e}",
                    result.ops, result.seconds
                ),
                Some(e) => eprintln!("kiln-load:   FAILED: {e}"),
                None => eprintln!(
                    "kiln-load:   {} ops in {:.2} s{}",
                    result.ops,
                    result.seconds,
                    result
                        .mb_per_sec
                        .map_or(String::new(), |m| format!(", {m:.1} MB/s"))
                ),
            }
            results.push(result);
        }
        (results, skipped)
    }

    /// Execute of unique trivial actions at `concurrency`; the empty input root is uploaded
    /// by the first level that runs, and the action counter runs on across levels.
    async fn execute_trivial(
        &self,
        actions: &mut Option<Arc<TrivialActions>>,
        concurrency: usize,
        b: Bounds,
    ) -> anyhow::Result<RunTotals> {
        let a = match actions {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(
                    TrivialActions::new(self.clients.clone(), BlobFactory::clock_nonce()).await?,
                );
                *actions = Some(a.clone());
                a
            }
        };
        execute::run(a, concurrency, b).await
    }

    fn write_requests(&self, d: &Digest, data: &[u8]) -> Vec<WriteRequest> {
        let resource = write_resource(&self.clients.instance, &self.factory.upload_id(), d);
        let chunk = self.opts.write_chunk_bytes.max(1);
        let n = data.len().div_ceil(chunk).max(1);
        (0..n)
            .map(|i| {
                let start = i * chunk;
                let end = (start + chunk).min(data.len());
                WriteRequest {
                    // REAPI: the resource name is required on the first request only.
                    resource_name: if i == 0 {
                        resource.clone()
                    } else {
                        String::new()
                    },
                    write_offset: start as i64,
                    finish_write: i + 1 == n,
                    data: data[start..end].to_vec(),
                }
            })
            .collect()
    }

    async fn bytestream_write(
        &self,
        size: usize,
        pool: &Arc<Mutex<Vec<Digest>>>,
        concurrency: usize,
        b: Bounds,
    ) -> anyhow::Result<RunTotals> {
        let prepare = |n: usize| {
            let mut ops = Vec::with_capacity(n);
            for _ in 0..n {
                let (d, data) = self.factory.blob(size);
                let reqs = self.write_requests(&d, &data);
                ops.push((d, reqs));
            }
            Ok(ops)
        };
        let clients = self.clients.clone();
        let pool = pool.clone();
        run_rounds(
            concurrency,
            b,
            prepare,
            move |(d, reqs): (Digest, Vec<WriteRequest>)| {
                let mut bs = clients.bytestream();
                let pool = pool.clone();
                async move {
                    let r = bs
                        .write(futures::stream::iter(reqs))
                        .await
                        .with_context(|| format!("Write of {}", d.hash))?;
                    let committed = r.into_inner().committed_size;
                    ensure!(
                        committed == d.size_bytes,
                        "Write of {} committed {committed} bytes of {}",
                        d.hash,
                        d.size_bytes
                    );
                    lock(&pool)?.push(d.clone());
                    Ok(OpOutcome {
                        bytes: d.size_bytes as u64,
                        items: 1,
                        kind: "write",
                    })
                }
            },
        )
        .await
    }

    /// Reads one blob whole; returns its bytes.
    async fn read_blob(clients: &Clients, d: &Digest) -> anyhow::Result<Vec<u8>> {
        let req = ReadRequest {
            resource_name: read_resource(&clients.instance, d),
            read_offset: 0,
            read_limit: 0,
        };
        let mut s = clients
            .bytestream()
            .read(req)
            .await
            .with_context(|| format!("Read of {}", d.hash))?
            .into_inner();
        let mut out = Vec::with_capacity(d.size_bytes as usize);
        while let Some(m) = s
            .message()
            .await
            .with_context(|| format!("Read of {}", d.hash))?
        {
            out.extend_from_slice(&m.data);
        }
        Ok(out)
    }

    async fn bytestream_read(
        &self,
        size: usize,
        pool: &Arc<Mutex<Vec<Digest>>>,
        concurrency: usize,
        b: Bounds,
    ) -> anyhow::Result<RunTotals> {
        if lock(pool)?.is_empty() {
            for _ in 0..READ_POOL_TOP_UP {
                let (d, data) = self.factory.blob(size);
                let reqs = self.write_requests(&d, &data);
                self.clients
                    .bytestream()
                    .write(futures::stream::iter(reqs))
                    .await
                    .context("untimed upload for reads")?;
                lock(pool)?.push(d);
            }
        }
        let digests = lock(pool)?.clone();
        let first = &digests[0];
        let data = Self::read_blob(&self.clients, first).await?;
        ensure!(
            digest_of(&data) == *first,
            "Read of {} returned other contents",
            first.hash
        );
        drop(data);

        let mut next = 0usize;
        let prepare = move |n: usize| {
            let ops: Vec<Digest> = (0..n)
                .map(|i| digests[(next + i) % digests.len()].clone())
                .collect();
            next += n;
            Ok(ops)
        };
        let clients = self.clients.clone();
        run_rounds(concurrency, b, prepare, move |d: Digest| {
            let clients = clients.clone();
            async move {
                let req = ReadRequest {
                    resource_name: read_resource(&clients.instance, &d),
                    read_offset: 0,
                    read_limit: 0,
                };
                let n = clients
                    .read_counted(&req)
                    .await
                    .with_context(|| format!("Read of {}", d.hash))?;
                ensure!(
                    n == d.size_bytes as u64,
                    "Read of {} returned {n} bytes",
                    d.hash
                );
                Ok(OpOutcome {
                    bytes: n,
                    items: 1,
                    kind: "read",
                })
            }
        })
        .await
    }

    fn batch_update_request(&self) -> BatchUpdateBlobsRequest {
        let mut requests = Vec::with_capacity(self.blobs_per_batch);
        for _ in 0..self.blobs_per_batch {
            let (d, data) = self.factory.blob(SMALL_BLOB_BYTES);
            requests.push(batch_update_blobs_request::Request {
                digest: Some(d),
                data,
                compressor: 0,
            });
        }
        BatchUpdateBlobsRequest {
            instance_name: self.clients.instance.clone(),
            requests,
            digest_function: SHA256,
        }
    }

    /// Sends one batch; once every blob is acknowledged, records them in `stored`.
    async fn send_batch_update(
        clients: &Clients,
        stored: &Mutex<Vec<Vec<Digest>>>,
        req: BatchUpdateBlobsRequest,
    ) -> anyhow::Result<OpOutcome> {
        let n = req.requests.len();
        let digests: Vec<Digest> = req
            .requests
            .iter()
            .filter_map(|r| r.digest.clone())
            .collect();
        let bytes: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        let resp = clients
            .cas()
            .batch_update_blobs(req)
            .await
            .context("BatchUpdateBlobs")?
            .into_inner();
        ensure!(
            resp.responses.len() == n,
            "BatchUpdateBlobs answered {} of {n} blobs",
            resp.responses.len()
        );
        if let Some(bad) = resp
            .responses
            .iter()
            .find(|r| r.status.as_ref().is_some_and(|s| s.code != 0))
        {
            anyhow::bail!(
                "BatchUpdateBlobs refused {:?}: {:?}",
                bad.digest,
                bad.status
            );
        }
        lock(stored)?.push(digests);
        Ok(OpOutcome {
            bytes,
            items: n as u64,
            kind: "batch-update",
        })
    }

    async fn batch_update(&self, concurrency: usize, b: Bounds) -> anyhow::Result<RunTotals> {
        let prepare = |n: usize| Ok((0..n).map(|_| self.batch_update_request()).collect());
        let clients = self.clients.clone();
        let stored = self.small_batches.clone();
        run_rounds(concurrency, b, prepare, move |req| {
            let clients = clients.clone();
            let stored = stored.clone();
            async move { Self::send_batch_update(&clients, &stored, req).await }
        })
        .await
    }

    /// Uploads small blobs untimed until at least `n` are stored.
    async fn ensure_small_blobs(&self, n: usize) -> anyhow::Result<()> {
        while lock(&self.small_batches)?
            .iter()
            .map(Vec::len)
            .sum::<usize>()
            < n
        {
            let req = self.batch_update_request();
            Self::send_batch_update(&self.clients, &self.small_batches, req)
                .await
                .context("untimed upload of small blobs")?;
        }
        Ok(())
    }

    async fn batch_read(&self, concurrency: usize, b: Bounds) -> anyhow::Result<RunTotals> {
        self.ensure_small_blobs(self.blobs_per_batch).await?;
        let batches = lock(&self.small_batches)?.clone();
        let instance = self.clients.instance.clone();
        let request = move |ds: &[Digest]| BatchReadBlobsRequest {
            instance_name: instance.clone(),
            digests: ds.to_vec(),
            acceptable_compressors: Vec::new(),
            digest_function: SHA256,
        };
        // One batch checked against its digests, untimed.
        let first = self
            .clients
            .cas()
            .batch_read_blobs(request(&batches[0]))
            .await
            .context("BatchReadBlobs")?
            .into_inner();
        for r in &first.responses {
            ensure!(
                r.status.as_ref().is_none_or(|s| s.code == 0),
                "BatchReadBlobs: {:?}",
                r.status
            );
            ensure!(
                r.digest.as_ref() == Some(&digest_of(&r.data)),
                "BatchReadBlobs returned other contents for {:?}",
                r.digest
            );
        }

        let mut next = 0usize;
        let prepare = move |n: usize| {
            let ops: Vec<BatchReadBlobsRequest> = (0..n)
                .map(|i| request(&batches[(next + i) % batches.len()]))
                .collect();
            next += n;
            Ok(ops)
        };
        let clients = self.clients.clone();
        run_rounds(
            concurrency,
            b,
            prepare,
            move |req: BatchReadBlobsRequest| {
                let clients = clients.clone();
                async move {
                    let n = req.digests.len();
                    let resp = clients
                        .cas()
                        .batch_read_blobs(req)
                        .await
                        .context("BatchReadBlobs")?
                        .into_inner();
                    ensure!(
                        resp.responses.len() == n,
                        "BatchReadBlobs answered {} of {n} blobs",
                        resp.responses.len()
                    );
                    let mut bytes = 0u64;
                    for r in &resp.responses {
                        ensure!(
                            r.status.as_ref().is_none_or(|s| s.code == 0),
                            "BatchReadBlobs: {:?}",
                            r.status
                        );
                        ensure!(
                            r.data.len() == SMALL_BLOB_BYTES,
                            "BatchReadBlobs returned {} bytes",
                            r.data.len()
                        );
                        bytes += r.data.len() as u64;
                    }
                    Ok(OpOutcome {
                        bytes,
                        items: n as u64,
                        kind: "batch-read",
                    })
                }
            },
        )
        .await
    }

    async fn find_missing(&self, concurrency: usize, b: Bounds) -> anyhow::Result<RunTotals> {
        let half = FIND_MISSING_DIGESTS / 2;
        self.ensure_small_blobs(half).await?;
        let present: Vec<Digest> = lock(&self.small_batches)?
            .iter()
            .flatten()
            .cloned()
            .collect();
        let mut next = 0usize;
        let factory = self.factory.clone();
        let instance = self.clients.instance.clone();
        // Present and absent digests alternate, and each call asks about another window of the
        // stored blobs: no two consecutive calls are the same request.
        let prepare = move |n: usize| {
            let mut ops = Vec::with_capacity(n);
            for _ in 0..n {
                let mut blob_digests = Vec::with_capacity(FIND_MISSING_DIGESTS);
                for i in 0..half {
                    blob_digests.push(present[(next + i) % present.len()].clone());
                    blob_digests.push(factory.absent_digest(SMALL_BLOB_BYTES as i64));
                }
                next += half;
                ops.push(FindMissingBlobsRequest {
                    instance_name: instance.clone(),
                    blob_digests,
                    digest_function: SHA256,
                });
            }
            Ok(ops)
        };
        let clients = self.clients.clone();
        run_rounds(
            concurrency,
            b,
            prepare,
            move |req: FindMissingBlobsRequest| {
                let clients = clients.clone();
                async move {
                    let n = req.blob_digests.len() as u64;
                    let resp = clients
                        .cas()
                        .find_missing_blobs(req)
                        .await
                        .context("FindMissingBlobs")?
                        .into_inner();
                    let missing = resp.missing_blob_digests.len();
                    ensure!(
                        missing == half,
                        "FindMissingBlobs reported {missing} missing, expected {half}"
                    );
                    Ok(OpOutcome {
                        bytes: 0,
                        items: n,
                        kind: "find-missing",
                    })
                }
            },
        )
        .await
    }

    async fn action_cache_mix(&self, concurrency: usize, b: Bounds) -> anyhow::Result<RunTotals> {
        // Each result names one stored blob as its output, so a get exercises the server's
        // "are the outputs still there" check as a real hit does.
        self.ensure_small_blobs(1).await?;
        let output = lock(&self.small_batches)?[0][0].clone();
        let factory = self.factory.clone();
        let instance = self.clients.instance.clone();
        let update = move |key: &Digest| UpdateActionResultRequest {
            instance_name: instance.clone(),
            action_digest: Some(key.clone()),
            action_result: Some(ActionResult {
                output_files: vec![OutputFile {
                    path: "bazel-out/k8-fastbuild/bin/bench.o".into(),
                    digest: Some(output.clone()),
                    ..Default::default()
                }],
                exit_code: 0,
                ..Default::default()
            }),
            results_cache_policy: None,
            digest_function: SHA256,
        };
        let new_key = move || factory.blob(64).0;
        let mut known: Vec<Digest> = Vec::new();
        let mut ac = self.clients.action_cache();
        for _ in 0..AC_SEED_ENTRIES {
            let k = new_key();
            ac.update_action_result(update(&k))
                .await
                .context("UpdateActionResult (seeding)")?;
            known.push(k);
        }

        let instance = self.clients.instance.clone();
        let mut rng = XorShift::new(BlobFactory::clock_nonce());
        // Operations alternate get, update, get, update…: a 50/50 mix in every round.
        let mut get_turn = true;
        // Gets only name entries stored in earlier rounds, which have all been acknowledged.
        let prepare = move |n: usize| {
            let stored = known.len();
            let mut ops = Vec::with_capacity(n);
            for _ in 0..n {
                if get_turn {
                    ops.push(AcOp::Get(GetActionResultRequest {
                        instance_name: instance.clone(),
                        action_digest: Some(known[rng.below(stored)].clone()),
                        inline_stdout: false,
                        inline_stderr: false,
                        inline_output_files: Vec::new(),
                        digest_function: SHA256,
                    }));
                } else {
                    let k = new_key();
                    ops.push(AcOp::Update(Box::new(update(&k))));
                    known.push(k);
                }
                get_turn = !get_turn;
            }
            Ok(ops)
        };
        let clients = self.clients.clone();
        run_rounds(concurrency, b, prepare, move |op: AcOp| {
            let mut ac = clients.action_cache();
            async move {
                match op {
                    AcOp::Update(req) => {
                        ac.update_action_result(*req)
                            .await
                            .context("UpdateActionResult")?;
                        Ok(OpOutcome {
                            bytes: 0,
                            items: 1,
                            kind: "update",
                        })
                    }
                    AcOp::Get(req) => {
                        let r = ac
                            .get_action_result(req)
                            .await
                            .context("GetActionResult of a stored entry")?
                            .into_inner();
                        ensure!(
                            r.output_files.len() == 1,
                            "GetActionResult returned another result"
                        );
                        Ok(OpOutcome {
                            bytes: 0,
                            items: 1,
                            kind: "get",
                        })
                    }
                }
            }
        })
        .await
    }
}

fn lock<T>(m: &Mutex<T>) -> anyhow::Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| anyhow::anyhow!("a workload task panicked while holding shared state"))
}
