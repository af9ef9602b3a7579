//! # chaos-tests: Kiln seen from the outside
//!
//! Everything here talks to a running `kiln` (or any other REAPI server) through public
//! protocols only — REAPI v2, ByteStream — exactly as a build tool would. Nothing links the
//! server's crates: the only Kiln dependency is `kiln-proto`, for the wire types and the tonic
//! clients.
//!
//! Today the crate holds the benchmark's load generator, [`load`], driven by the `kiln-load`
//! binary and `scripts/bench.sh`. The seed-driven chaos suite (one test file per invariant,
//! a client oracle that reads back every acknowledged write) will live beside it.
//!
//! Architecture Invariant: this crate depends on no Kiln crate but `kiln-proto`, and never on
//! server types; it starts the server as a process when it needs one. Being test tooling, it
//! reports errors with `anyhow` rather than a typed enum.

pub mod load;
