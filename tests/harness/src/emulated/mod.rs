//! The emulated GitLab Runner: runs one job against a driver exactly the way the real runner's
//! custom executor calls it (contract §1–§6).
//!
//! [`run_job`] and [`config_then_cleanup`] drive one `Emulator`; each submodule adds one
//! concern to it, named after the runner code it follows:
//!
//! * `options`: what the caller sets and holds: the driver, the runner's settings, hooks, cancel;
//! * `report`: what the caller gets back, in GitLab's words;
//! * `flow`: the job as `common/build.go` runs it: Prepare with retries, the script stages,
//!   Cleanup;
//! * `call`: one driver call: which `*_exec` it runs, and why the runner kills it;
//! * `env`: what each call is given: the executor temp dir, its files and the environment;
//! * `exit`: how a call's exit becomes a job failure (`command.go`, §1.1, §4.5);
//! * `log`: the job log and the runner's own lines in it.

mod call;
mod env;
mod exit;
mod flow;
mod log;
mod options;
mod report;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_protocol::JobResponse;
use tokio::sync::watch;

pub use call::{ExecStage, KillCause};
pub use env::prefixed_path;
pub use exit::parse_build_exit_code;
pub use log::go_duration;
pub use options::{
    CallStart, CallStartHook, CancelHandle, Driver, Hooks, LogHook, PrepareTermination,
    RunnerOptions,
};
pub use report::{CallRecord, ConfigCleanupReport, JobReport, JobResult, call_name};

use call::Call;
use exit::Failure;
use log::{Buffer, JobLog, buffer_sink, lock};

/// The runner version the emulation follows; drivers see it as `CUSTOM_ENV_CI_RUNNER_VERSION`.
pub const EMULATED_RUNNER_VERSION: &str = "19.3.0";

/// Runs one job against `driver` and reports what GitLab would see.
pub async fn run_job(
    driver: &Driver,
    job: &JobResponse,
    options: &RunnerOptions,
    hooks: &Hooks,
    cancel: &CancelHandle,
) -> JobReport {
    let started = Instant::now();
    let mut emulator = Emulator::new(driver, job, options, hooks, cancel);
    let outcome = emulator.run().await;
    emulator.log_final(&outcome);
    let result = exit::job_result(outcome);
    let log = lock(&emulator.log);
    JobReport {
        result,
        log: log.bytes.clone(),
        log_len: log.len,
        calls: emulator.calls.clone(),
        build_stdout: emulator.build_stdout.as_ref().map(|b| lock(b).clone()),
        cleanup_output: lock(&emulator.cleanup_output).clone(),
        duration: started.elapsed(),
    }
}

/// Runs config_exec and then cleanup_exec in one executor temp dir, with no prepare: what the
/// runner does when an attempt fails right after config (§1.5, §10 item 9).
pub async fn config_then_cleanup(
    driver: &Driver,
    job: &JobResponse,
    options: &RunnerOptions,
) -> ConfigCleanupReport {
    let hooks = Hooks::default();
    let cancel = CancelHandle::new();
    let mut emulator = Emulator::new(driver, job, options, &hooks, &cancel);
    emulator.attempt_no = 1;
    let stdout: Buffer = Arc::new(Mutex::new(Vec::new()));
    if emulator.create_temp_dir().is_ok() {
        emulator
            .call(Call::Config, None, Some(buffer_sink(&stdout)))
            .await;
        emulator.cleanup().await;
    }
    let config_stdout = lock(&stdout).clone();
    ConfigCleanupReport {
        config_stdout,
        calls: emulator.calls,
    }
}

/// One job in flight: what the runner's `Build` and the custom executor hold while it runs.
struct Emulator<'a> {
    driver: &'a Driver,
    job: &'a JobResponse,
    options: &'a RunnerOptions,
    hooks: &'a Hooks,
    cancel_rx: watch::Receiver<u8>,
    seen_cancel: u8,
    deadline: tokio::time::Instant,
    job_dead: Option<Failure>,
    script_canceled: bool,
    phase: Phase,
    attempt_no: u32,
    attempt: Attempt,
    /// `CI_BUILDS_DIR` / `CI_PROJECT_DIR` as the Build object holds them: empty until the
    /// first attempt computed them, then kept across retries (§1.2).
    builds_dir: String,
    project_dir: String,
    cache_dir: String,
    job_status: &'static str,
    log: Arc<Mutex<JobLog>>,
    calls: Vec<CallRecord>,
    build_stdout: Option<Buffer>,
    cleanup_output: Buffer,
}

impl<'a> Emulator<'a> {
    fn new(
        driver: &'a Driver,
        job: &'a JobResponse,
        options: &'a RunnerOptions,
        hooks: &'a Hooks,
        cancel: &CancelHandle,
    ) -> Self {
        let timeout = Duration::from_secs(job.runner_info.effective_timeout_secs());
        Emulator {
            driver,
            job,
            options,
            hooks,
            cancel_rx: cancel.subscribe(),
            seen_cancel: 0,
            deadline: tokio::time::Instant::now() + timeout,
            job_dead: None,
            script_canceled: false,
            phase: Phase::Before,
            attempt_no: 0,
            attempt: Attempt::default(),
            builds_dir: String::new(),
            project_dir: String::new(),
            cache_dir: String::new(),
            job_status: "running",
            log: Arc::new(Mutex::new(JobLog::new(
                options.log_cap,
                hooks.on_log.clone(),
            ))),
            calls: Vec::new(),
            build_stdout: options
                .capture_build_stdout
                .then(|| Arc::new(Mutex::new(Vec::new()))),
            cleanup_output: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

/// Where the job is relative to the user steps, which decides what a graceful cancel does
/// (§6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Before,
    User,
    After,
}

/// The state of one executor attempt (§1.1: one temp dir per attempt).
#[derive(Default)]
struct Attempt {
    temp_dir: Option<PathBuf>,
    job_env: Vec<(String, String)>,
    hostname: Option<String>,
    shell: String,
}
