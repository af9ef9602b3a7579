//! # The load generator behind `kiln-load` and `scripts/bench.sh`
//!
//! Measures a REAPI server from the outside, the way build tools load it, and puts each figure
//! next to what the machine itself can do (see [`limits`]): a ratio travels between machines,
//! an absolute MB/s does not.
//!
//! - [`client`]: connections (TCP_NODELAY, HTTP/2 windows and frames, 16 MiB messages) and REAPI clients;
//! - [`blobs`]: unique blob contents, digests, resource names;
//! - [`runner`]: prepare-untimed / execute-timed rounds at a fixed concurrency;
//! - [`workloads`]: the suite — ByteStream, batches, FindMissingBlobs, Action Cache, and
//!   ([`execute`]) remote execution of unique trivial actions;
//! - [`limits`]: the machine probes — SHA-256, loopback TCP, disk with fsync, process spawns;
//! - [`memory`]: a server's idle resident set and what one large upload adds to its peak;
//! - [`stats`]: percentiles; [`report`]: ratios, the checks, JSON and the table.
//!
//! A run: connect, GetCapabilities (to size batches and learn whether execution is served),
//! then every workload in order, each bounded in operations and seconds, each failure recorded
//! without stopping the others.

pub mod blobs;
pub mod client;
pub mod execute;
pub mod limits;
pub mod memory;
pub mod report;
pub mod runner;
pub mod stats;
pub mod workloads;
