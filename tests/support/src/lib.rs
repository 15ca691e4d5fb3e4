//! What the drivers' tests and benchmarks share; never published.
//!
//! * [`require`] decides whether a test whose backend is missing skips (a developer's machine)
//!   or fails (CI, where `DROVER_REQUIRE` names the backend);
//! * [`setup`] is a driver under test with an operator settings file of its own;
//! * [`bench`](mod@bench) is the benchmark every driver runs against a bash baseline.
//!
//! Section numbers (§) refer to `docs/contract.md`.

pub mod bench;
pub mod require;
pub mod setup;
