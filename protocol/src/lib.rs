//! GitLab Runner's custom-executor contract as types.
//!
//! GitLab Runner starts a driver executable once per stage (`config`, `prepare`,
//! `run <script> <stage>` per sub-stage, `cleanup`), hands it a job through environment
//! variables and a JSON file, and reads back exit codes, a JSON document (config only) and
//! a file holding the script's exit code. This crate models exactly that, as data, so a
//! driver, a runner emulator and a test can share one definition of the contract.
//!
//! Nothing here performs I/O: every parser takes bytes or a map of variables, never the
//! process environment or a path to open. Section numbers (§) refer to the project's
//! `contract.md`, which was read from GitLab Runner's source.
//!
//! | Contract | Type |
//! |---|---|
//! | stages and sub-stages (§1, §4.1) | [`Stage`], [`SubStage`] |
//! | config_exec stdout (§2) | [`ConfigOutput`] |
//! | environment given to the driver (§3) | [`JobEnv`], [`ControlVariables`] |
//! | `CI_JOB_SERVICES` (§3.4) | [`Service`] |
//! | `JOB_RESPONSE_FILE` (§3.1) | [`JobResponse`], [`TrustedIdentity`] |
//! | exit codes and `BUILD_EXIT_CODE_FILE` (§4.4, §4.5) | [`Outcome`] |

mod config_output;
mod env;
mod error;
mod exit;
mod job_response;
mod services;
mod stage;

pub use config_output::{ConfigOutput, DriverInfo};
pub use env::{
    BUILD_EXIT_CODE_FILE, BUILD_FAILURE_EXIT_CODE, CUSTOM_ENV_PREFIX, ControlVariables,
    JOB_RESPONSE_FILE, JobEnv, SYSTEM_FAILURE_EXIT_CODE, TMPDIR,
};
pub use error::ProtocolError;
pub use exit::Outcome;
pub use job_response::{
    GitInfo, Image, JobInfo, JobResponse, JobStep, JobVariable, RunnerInfo, TrustedIdentity,
};
pub use services::{Service, ServiceVariable};
pub use stage::{Stage, SubStage};
