//! Plays GitLab Runner against any custom-executor driver.
//!
//! * [`job`] reads a small subset of `.gitlab-ci.yml`;
//! * [`payload`] turns a job into the payload GitLab would send (contract §9.4);
//! * [`script`] generates the bash scripts the runner hands to `run_exec` (§4.3);
//! * [`emulated`] runs a job against a driver exactly as the runner's custom executor calls it
//!   (§1–§6): temp dir, environment, process groups, exit-code mapping, retries, timeouts and
//!   cancellation;
//! * [`conformance`] is the suite of checks every drover driver must pass;
//! * [`repository`] serves a local git repository as the project's, and makes test ones;
//! * [`coordinator`] is a fake GitLab coordinator for running the real `gitlab-runner
//!   run-single` against a driver (§9.3).
//!
//! Section numbers (§) refer to `docs/contract.md`. The `drover` CLI (`cli/`) is its front door.

pub mod conformance;
pub mod coordinator;
pub mod emulated;
pub mod job;
pub mod payload;
pub mod pipeline;
mod process;
pub mod real;
pub mod repository;
pub mod script;

pub use coordinator::{Coordinator, FinalUpdate, RequestRecord};
pub use emulated::{
    CallRecord, CallStart, CancelHandle, ConfigCleanupReport, Driver, ExecStage, Hooks, JobReport,
    JobResult, KillCause, PrepareTermination, RunnerOptions, config_then_cleanup, run_job,
};
pub use process::CallExit;
