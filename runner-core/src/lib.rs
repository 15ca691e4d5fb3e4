//! The runner core of drover: everything a custom-executor driver needs except the backend.
//!
//! A driver implements [`Driver`] and its `main` is one line, `drover_core::run::<MyDriver>()`.
//! The core then does, for every driver alike, what GitLab Runner's contract asks (section
//! numbers § refer to the project's `contract.md`):
//!
//! - parses argv as the runner passes it: `*_args` first, and for `run` the script path and
//!   stage as the **last two** arguments (§1.4); adds `gc`, `doctor` and `--version`;
//! - loads the operator's settings ([`Settings`]: `--config PATH` plus `DROVER_*` overrides)
//!   and the job ([`Job`]: environment, trusted identity from `JOB_RESPONSE_FILE`, names);
//! - turns SIGTERM/SIGINT into cancellation ([`Job::cancel_token`]) so a stage can stop remote
//!   work; a cancelled config or prepare exits with a system failure (§6.3);
//! - is the single place where outcomes become exit codes: 0, `BUILD_FAILURE_EXIT_CODE` or
//!   `SYSTEM_FAILURE_EXIT_CODE`, with the script's real code in `BUILD_EXIT_CODE_FILE` (§4.4,
//!   §4.5); a panic becomes a system failure, never 101;
//! - runs local children in their own process group with byte-exact, unbuffered streaming
//!   into the job log ([`JobCommand`]), and kills what they leave behind (§10 item 4);
//! - retries transient backend errors with backoff and jitter ([`retry`]);
//! - names resources deterministically and labels them for `gc` ([`ResourceNames`]);
//! - applies the operator's job-override [`Policy`] (image allow-list, CPU and memory caps,
//!   offered mounts);
//! - writes progress lines to the job log ([`progress!`]).
//!
//! A driver's methods return [`Error`]s that carry their class (build or system) and whether
//! they are transient; they never print the final error or choose an exit code themselves.

pub use drover_protocol as protocol;

pub mod cache;
pub mod channel;
mod driver;
mod entry;
mod error;
mod job;
mod log;
pub mod naming;
pub mod policy;
pub mod pool;
mod process;
mod retry;
pub mod settings;
mod signals;
pub mod ssh;
pub mod state;

pub use driver::{
    Check, Driver, GcReport, GcRequest, Script, base_config, fresh_environment_config,
};
pub use entry::run;
pub use error::{Error, ErrorClass, Result, ResultExt};
pub use job::Job;
pub use log::{Stream, progress as progress_line, write_all};
pub use naming::ResourceNames;
pub use policy::{Limits, Policy, Resources};
pub use process::{JobCommand, KILL_GRACE};
pub use retry::{Backoff, retry};
pub use settings::Settings;

/// Writes a progress line to the job log (stderr, §1.3), e.g.
/// `progress!("Creating container {name}")`.
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {
        $crate::progress_line(format_args!($($arg)*))
    };
}

pub(crate) use log::progress;
