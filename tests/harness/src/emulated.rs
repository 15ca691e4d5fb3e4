//! The emulated GitLab Runner: runs one job against a driver exactly the way the real runner's
//! custom executor calls it (contract §1–§6).

use std::borrow::Cow;
use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use drover_protocol::{
    BUILD_EXIT_CODE_FILE, BUILD_FAILURE_EXIT_CODE, CUSTOM_ENV_PREFIX, ConfigOutput,
    JOB_RESPONSE_FILE, JobResponse, JobVariable, SYSTEM_FAILURE_EXIT_CODE, Service, SubStage,
    TMPDIR,
};
use tokio::sync::{Notify, watch};

use crate::payload::PayloadDependency;
use crate::process::{self, CallExit, Invocation, KillTimeouts, Sink};
use crate::script::{self, ArtifactEntry, CacheEntry, Dependency, ScriptInfo};

/// `PreparationRetries` (§5.1).
const PREPARATION_ATTEMPTS: u32 = 3;
/// The runner version the emulation follows; drivers see it as `CUSTOM_ENV_CI_RUNNER_VERSION`.
pub const EMULATED_RUNNER_VERSION: &str = "19.3.0";
/// The link the runner appends to a prepare_script failure (§4.1).
const SHELL_PROFILE_HINT: &str =
    "Check https://docs.gitlab.com/runner/shells/#shell-profile-loading for more information";

const ANSI_BOLD_CYAN: &str = "\x1b[36;1m";
const ANSI_BOLD_GREEN: &str = "\x1b[32;1m";
const ANSI_BOLD_RED: &str = "\x1b[31;1m";
const ANSI_YELLOW: &str = "\x1b[0;33m";
const ANSI_RESET: &str = "\x1b[0;m";

/// The driver executable and the `*_args` that precede the stage word (§1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Driver {
    /// Path of the executable.
    pub program: PathBuf,
    /// Arguments placed before `config`, `prepare`, `run <script> <stage>` and `cleanup`.
    pub args: Vec<OsString>,
}

impl Driver {
    /// A driver called with no extra arguments.
    pub fn new(program: impl Into<PathBuf>) -> Driver {
        Driver {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// Appends one leading argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Driver {
        self.args.push(arg.into());
        self
    }
}

/// How to cut the first prepare attempt short, emulating a `prepare_exec_timeout` (§6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareTermination {
    /// Once prepare has written its first byte to stdout or stderr.
    AfterFirstByte,
    /// After this long.
    After(Duration),
}

/// The runner's settings that matter to a driver. Defaults are the real runner's.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// `[[runners]] builds_dir`, unless config_exec overrides it.
    pub builds_dir: String,
    /// `[[runners]] cache_dir`, unless config_exec overrides it.
    pub cache_dir: String,
    /// `config_exec_timeout` (default 3600 s).
    pub config_exec_timeout: Duration,
    /// `prepare_exec_timeout` (default 3600 s).
    pub prepare_exec_timeout: Duration,
    /// `cleanup_exec_timeout` (default 3600 s).
    pub cleanup_exec_timeout: Duration,
    /// `graceful_kill_timeout` (default 600 s).
    pub graceful_kill_timeout: Duration,
    /// `force_kill_timeout` (default 10 s).
    pub force_kill_timeout: Duration,
    /// `PreparationRetryInterval` (3 s).
    pub prepare_retry_interval: Duration,
    /// The concurrency slot: `CI_CONCURRENT_ID` and `CI_CONCURRENT_PROJECT_ID`.
    pub concurrent_id: u32,
    /// `CI_RUNNER_SHORT_TOKEN`.
    pub runner_short_token: String,
    /// Keep at most this many bytes of the job log in the report (`None`: all).
    pub log_cap: Option<usize>,
    /// Keep build_script's stdout separately in the report.
    pub capture_build_stdout: bool,
    /// Cut the first prepare attempt short (emulates a prepare_exec timeout).
    pub terminate_first_prepare: Option<PrepareTermination>,
    /// Where `custom-executorNNNN` dirs are made (default: the system temp dir).
    pub temp_root: Option<PathBuf>,
    /// Harness-only: call cleanup_exec this many more times after the job's own cleanup, to
    /// check that cleanup is idempotent (§6.3).
    pub extra_cleanup_calls: u32,
    /// A directory put first on the `PATH` the driver inherits, as if the runner process had
    /// been started with it: where a `gitlab-runner` for the job environment is found (§8).
    pub path_prefix: Option<PathBuf>,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerOptions {
            builds_dir: "/builds".into(),
            cache_dir: "/cache".into(),
            config_exec_timeout: Duration::from_secs(3600),
            prepare_exec_timeout: Duration::from_secs(3600),
            cleanup_exec_timeout: Duration::from_secs(3600),
            graceful_kill_timeout: Duration::from_secs(600),
            force_kill_timeout: Duration::from_secs(10),
            prepare_retry_interval: Duration::from_secs(3),
            concurrent_id: 0,
            runner_short_token: "drover00".into(),
            log_cap: None,
            capture_build_stdout: false,
            terminate_first_prepare: None,
            temp_root: None,
            extra_cleanup_calls: 0,
            path_prefix: None,
        }
    }
}

/// A driver call that has just started.
#[derive(Debug, Clone)]
pub struct CallStart {
    /// `config`, `prepare`, `run` or `cleanup`.
    pub stage: &'static str,
    /// The run sub-stage.
    pub sub_stage: Option<String>,
    /// The Prepare attempt (1–3) it belongs to.
    pub attempt: u32,
    /// Its pid, which is also its process group id (§6.1).
    pub pid: u32,
}

/// Callback types of [`Hooks`].
pub type CallStartHook = Arc<dyn Fn(&CallStart) + Send + Sync>;
/// Receives job-log bytes as they arrive.
pub type LogHook = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Notifications while a job runs.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called as each driver call starts.
    pub on_call_start: Option<CallStartHook>,
    /// Called with every chunk appended to the job log (the live trace).
    pub on_log: Option<LogHook>,
}

/// Cancels a running job the way GitLab does (§6.2): the first [`CancelHandle::cancel`] is a
/// graceful cancel (`canceling`), the second an abort (`canceled`).
#[derive(Debug, Clone)]
pub struct CancelHandle {
    level: Arc<watch::Sender<u8>>,
}

impl Default for CancelHandle {
    fn default() -> Self {
        CancelHandle::new()
    }
}

impl CancelHandle {
    /// A handle nobody has used yet.
    pub fn new() -> CancelHandle {
        CancelHandle {
            level: Arc::new(watch::channel(0).0),
        }
    }

    /// Graceful cancel the first time, abort the second.
    pub fn cancel(&self) {
        self.level.send_modify(|l| *l = (*l + 1).min(2));
    }

    /// Abort: skip everything but cleanup_exec.
    pub fn abort(&self) {
        self.level.send_replace(2);
    }

    /// Follows the handle: 0 nothing asked, 1 graceful cancel, 2 abort.
    pub fn subscribe(&self) -> watch::Receiver<u8> {
        self.level.subscribe()
    }
}

/// How the job ended, in GitLab's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// `success`.
    Success,
    /// `script_failure` with the job's exit code.
    ScriptFailure {
        /// From `BUILD_EXIT_CODE_FILE`, or 1 (§4.5); 0 for a configuration error.
        exit_code: i32,
    },
    /// `runner_system_failure`.
    RunnerSystemFailure {
        /// The error the runner logged.
        reason: String,
    },
    /// `canceled`.
    Canceled,
    /// `timedout` (failure reason `job_execution_timeout`).
    TimedOut,
}

impl fmt::Display for JobResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobResult::Success => f.write_str("success"),
            JobResult::ScriptFailure { exit_code: 0 } => f.write_str("script_failure"),
            JobResult::ScriptFailure { exit_code } => {
                write!(f, "script_failure (exit code {exit_code})")
            }
            JobResult::RunnerSystemFailure { .. } => f.write_str("runner_system_failure"),
            JobResult::Canceled => f.write_str("canceled"),
            JobResult::TimedOut => f.write_str("timedout"),
        }
    }
}

/// One driver call the emulated runner made.
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// `config`, `prepare`, `run` or `cleanup`.
    pub stage: &'static str,
    /// The run sub-stage.
    pub sub_stage: Option<String>,
    /// The Prepare attempt it belongs to.
    pub attempt: u32,
    /// Pid and process group id; `None` if it never started.
    pub pid: Option<u32>,
    /// How it ended.
    pub exit: CallExit,
    /// Why the runner signalled it, if it did (`job timeout`, `cancel`, ...).
    pub killed_by: Option<String>,
    /// From start to exit and EOF on both pipes.
    pub duration: Duration,
}

impl CallRecord {
    /// `config`, `prepare`, `run build_script`, `cleanup`.
    pub fn name(&self) -> String {
        match &self.sub_stage {
            Some(sub) => format!("{} {sub}", self.stage),
            None => self.stage.to_owned(),
        }
    }
}

/// Everything observable about one job.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The result GitLab would record.
    pub result: JobResult,
    /// The job log (up to [`RunnerOptions::log_cap`] bytes).
    pub log: Vec<u8>,
    /// The job log's full length.
    pub log_len: u64,
    /// Every driver call, in order.
    pub calls: Vec<CallRecord>,
    /// build_script's stdout, when [`RunnerOptions::capture_build_stdout`] is set.
    pub build_stdout: Option<Vec<u8>>,
    /// cleanup_exec's stdout and stderr: the runner logs them at debug level, never in the job
    /// log (§1.5).
    pub cleanup_output: Vec<u8>,
    /// Wall time of the whole job.
    pub duration: Duration,
}

impl JobReport {
    /// The job log as text (lossy for non-UTF-8 bytes).
    pub fn log_text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.log)
    }

    /// The names of the calls, e.g. `["config", "prepare", "run prepare_script", ...]`.
    pub fn call_names(&self) -> Vec<String> {
        self.calls.iter().map(CallRecord::name).collect()
    }
}

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
    let result = match outcome {
        Ok(()) => JobResult::Success,
        Err(Failure::Build { exit_code, .. }) => JobResult::ScriptFailure { exit_code },
        Err(Failure::Config(_)) => JobResult::ScriptFailure { exit_code: 0 },
        Err(Failure::System(reason)) => JobResult::RunnerSystemFailure { reason },
        Err(Failure::Canceled) => JobResult::Canceled,
        Err(Failure::TimedOut) => JobResult::TimedOut,
    };
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

/// What [`config_then_cleanup`] saw.
#[derive(Debug, Clone)]
pub struct ConfigCleanupReport {
    /// config_exec's stdout, byte for byte.
    pub config_stdout: Vec<u8>,
    /// The two calls.
    pub calls: Vec<CallRecord>,
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

/// Why a stage or the job failed, as the runner classifies errors.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// A `BuildError` from a driver exit 1 (§1.1): `script_failure`, never retried.
    Build {
        exit_code: i32,
        message: String,
    },
    /// A configuration `BuildError` (missing builds_dir...): not retried (§5.1).
    Config(String),
    /// Any other error: `runner_system_failure`.
    System(String),
    Canceled,
    TimedOut,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Build { message, .. } => f.write_str(message),
            Failure::Config(message) | Failure::System(message) => f.write_str(message),
            Failure::Canceled => f.write_str("canceled"),
            Failure::TimedOut => f.write_str("execution timed out"),
        }
    }
}

/// Why the runner started the kill sequence on a call (§6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// config/prepare/cleanup exec timeout, or after_script's and the script's own timeouts.
    StageTimeout,
    /// The job timeout (`runner_info.timeout`).
    JobTimeout,
    /// Abort, or a graceful cancel before the user steps: the whole job context.
    JobCanceled,
    /// A graceful cancel during the user steps: only the script context.
    ScriptCanceled,
    /// [`RunnerOptions::terminate_first_prepare`].
    PrepareHook,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::StageTimeout => "stage timeout",
            Cause::JobTimeout => "job timeout",
            Cause::JobCanceled => "job canceled",
            Cause::ScriptCanceled => "script canceled",
            Cause::PrepareHook => "prepare terminated by the harness",
        })
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

/// The job log: kept up to a cap, forwarded live.
struct JobLog {
    bytes: Vec<u8>,
    len: u64,
    cap: Option<usize>,
    live: Option<LogHook>,
}

impl JobLog {
    fn append(&mut self, chunk: &[u8]) {
        self.len += chunk.len() as u64;
        let room = self
            .cap
            .map_or(chunk.len(), |cap| cap.saturating_sub(self.bytes.len()));
        self.bytes
            .extend_from_slice(&chunk[..room.min(chunk.len())]);
        if let Some(live) = &self.live {
            live(chunk);
        }
    }
}

/// Locks a mutex even if a sink panicked while holding it: the bytes stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A shared byte buffer a sink appends to.
type Buffer = Arc<Mutex<Vec<u8>>>;

fn buffer_sink(buffer: &Buffer) -> Sink {
    let buffer = buffer.clone();
    Arc::new(move |chunk| lock(&buffer).extend_from_slice(chunk))
}

/// The state of one executor attempt (§1.1: one temp dir per attempt).
#[derive(Default)]
struct Attempt {
    temp_dir: Option<PathBuf>,
    job_env: Vec<(String, String)>,
    hostname: Option<String>,
    shell: String,
}

/// Which of the four executables a call runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Config,
    Prepare,
    Run(SubStage),
    Cleanup,
}

impl Call {
    fn stage(&self) -> &'static str {
        match self {
            Call::Config => "config",
            Call::Prepare => "prepare",
            Call::Run(_) => "run",
            Call::Cleanup => "cleanup",
        }
    }
}

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
            cancel_rx: cancel.level.subscribe(),
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
            log: Arc::new(Mutex::new(JobLog {
                bytes: Vec::new(),
                len: 0,
                cap: options.log_cap,
                live: hooks.on_log.clone(),
            })),
            calls: Vec::new(),
            build_stdout: options
                .capture_build_stdout
                .then(|| Arc::new(Mutex::new(Vec::new()))),
            cleanup_output: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn log_line(&self, color: &str, prefix: &str, text: &str) {
        let line = if color.is_empty() {
            format!("{text}\n")
        } else {
            format!("{color}{prefix}{text}{ANSI_RESET}\n")
        };
        lock(&self.log).append(line.as_bytes());
    }

    fn log_warning(&self, text: &str) {
        self.log_line(ANSI_YELLOW, "WARNING: ", text);
    }

    fn log_error(&self, text: &str) {
        self.log_line(ANSI_BOLD_RED, "ERROR: ", text);
    }

    fn log_sink(&self) -> Sink {
        let log = self.log.clone();
        Arc::new(move |chunk| lock(&log).append(chunk))
    }

    /// `Build.Run`: Prepare with retries, the script stages, then the deferred Cleanup.
    async fn run(&mut self) -> Result<(), Failure> {
        self.log_line(
            "",
            "",
            &format!(
                "Running with drover-harness {} (emulating gitlab-runner {EMULATED_RUNNER_VERSION})",
                env!("CARGO_PKG_VERSION")
            ),
        );
        self.log_line(
            "",
            "",
            &format!("  on drover-emulated {}", self.options.runner_short_token),
        );
        self.log_line(ANSI_BOLD_CYAN, "", "Preparing the \"custom\" executor");
        self.prepare_with_retries().await?;
        let result = self.execute_script().await;
        for _ in 0..self.options.extra_cleanup_calls {
            let exit = self.call(Call::Cleanup, None, None).await;
            if let Err(failure) = self.exit_failure(&exit) {
                self.log_warning(&format!("Cleanup script failed: {failure}"));
            }
        }
        self.cleanup().await;
        result
    }

    fn log_final(&self, outcome: &Result<(), Failure>) {
        match outcome {
            Ok(()) => self.log_line(ANSI_BOLD_GREEN, "", "Job succeeded"),
            Err(Failure::System(reason)) => {
                self.log_error(&format!("Job failed (system failure): {reason}"))
            }
            Err(Failure::TimedOut) => self.log_error(&format!(
                "Job failed: execution took longer than {} seconds",
                go_duration(Duration::from_secs(
                    self.job.runner_info.effective_timeout_secs()
                ))
            )),
            Err(failure) => self.log_error(&format!("Job failed: {failure}")),
        }
    }

    /// Reads a cancel request that arrived since the last look and applies it to the current
    /// phase (§6.2).
    fn observe_cancel(&mut self) {
        let level = *self.cancel_rx.borrow_and_update();
        if level > self.seen_cancel {
            self.seen_cancel = level;
            match (level, self.phase) {
                (2.., _) | (1, Phase::Before) => {
                    self.job_dead.get_or_insert(Failure::Canceled);
                }
                (1, Phase::User) => self.script_canceled = true,
                _ => {}
            }
        }
        if self.job_dead.is_none() && tokio::time::Instant::now() >= self.deadline {
            self.job_dead = Some(Failure::TimedOut);
        }
    }

    /// `retryCreateExecutor` (§5.1).
    async fn prepare_with_retries(&mut self) -> Result<(), Failure> {
        let mut last = Failure::System("no preparation attempt ran".into());
        for attempt in 1..=PREPARATION_ATTEMPTS {
            self.attempt_no = attempt;
            self.observe_cancel();
            if let Some(dead) = &self.job_dead {
                return Err(dead.clone());
            }
            let Err(failure) = self.prepare_attempt().await else {
                return Ok(());
            };
            // The runner always cleans up a failed attempt first (§5.1 step 3).
            self.cleanup().await;
            self.observe_cancel();
            match failure {
                Failure::Build { .. } | Failure::Config(_) => return Err(failure),
                _ => {}
            }
            if let Some(dead) = &self.job_dead {
                return Err(dead.clone());
            }
            self.log_error(&format!("Preparation failed: {failure}"));
            self.log_line(
                "",
                "",
                &format!(
                    "Will be retried in {} ...",
                    go_duration(self.options.prepare_retry_interval)
                ),
            );
            // Since v19.0 the wait ends early when the job is canceled or times out (§5.1).
            let mut rx = self.cancel_rx.clone();
            tokio::select! {
                _ = tokio::time::sleep(self.options.prepare_retry_interval) => {}
                _ = tokio::time::sleep_until(self.deadline) => {}
                _ = rx.changed() => {}
            }
            self.observe_cancel();
            if let Some(dead) = &self.job_dead {
                return Err(dead.clone());
            }
            last = failure;
        }
        Err(last)
    }

    /// One `executor.Prepare`: temp dir, response file, config_exec, dirs, prepare_exec.
    async fn prepare_attempt(&mut self) -> Result<(), Failure> {
        self.create_temp_dir()?;
        let stdout: Buffer = Arc::new(Mutex::new(Vec::new()));
        let exit = self
            .call(Call::Config, None, Some(buffer_sink(&stdout)))
            .await;
        self.exit_failure(&exit)?;
        let stdout = lock(&stdout).clone();
        let config = ConfigOutput::parse_stdout(&stdout)
            .map_err(|e| Failure::System(e.to_string()))?
            .unwrap_or_default();
        self.apply_config(config)?;
        let exit = self.call(Call::Prepare, None, None).await;
        self.exit_failure(&exit)
    }

    /// A fresh `custom-executorNNNN` dir with `response.json` (§1.1, §3.1).
    fn create_temp_dir(&mut self) -> Result<(), Failure> {
        self.attempt = Attempt::default();
        let temp_root = self
            .options
            .temp_root
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let temp_dir = tempfile::Builder::new()
            .prefix("custom-executor")
            .rand_bytes(10)
            .tempdir_in(&temp_root)
            .map(tempfile::TempDir::keep)
            .map_err(|e| Failure::System(format!("creating the executor temp dir: {e}")))?;
        self.attempt.temp_dir = Some(temp_dir.clone());
        write_private(&temp_dir.join("response.json"), self.job)
            .map_err(|e| Failure::System(format!("writing the job response file: {e}")))
    }

    /// `InjectInto` and `PrepareBuildAndShell` (§2).
    fn apply_config(&mut self, config: ConfigOutput) -> Result<(), Failure> {
        let builds_dir = config
            .builds_dir
            .unwrap_or_else(|| self.options.builds_dir.clone());
        let cache_dir = config
            .cache_dir
            .unwrap_or_else(|| self.options.cache_dir.clone());
        self.attempt.job_env = config.job_env.unwrap_or_default().into_iter().collect();
        self.attempt.hostname = config.hostname;
        let shell = config.shell.unwrap_or_else(|| "bash".into());
        if !matches!(shell.as_str(), "bash" | "sh") {
            return Err(Failure::System(format!(
                "shell {shell} not found (the emulated runner generates bash and sh only)"
            )));
        }
        self.attempt.shell = shell;
        if builds_dir.is_empty() {
            return Err(Failure::Config("the builds_dir is not configured".into()));
        }
        if cache_dir.is_empty() {
            return Err(Failure::Config("the cache_dir is not configured".into()));
        }
        let project = self.project_path();
        self.project_dir = if config.builds_dir_is_shared == Some(true) {
            format!(
                "{}/{}/{}/{project}",
                builds_dir.trim_end_matches('/'),
                self.options.runner_short_token,
                self.options.concurrent_id
            )
        } else {
            format!("{}/{project}", builds_dir.trim_end_matches('/'))
        };
        self.builds_dir = builds_dir;
        self.cache_dir = cache_dir;
        let startup = match config.driver {
            Some(drover_protocol::DriverInfo {
                name: Some(name),
                version,
            }) => match version {
                Some(version) => format!("Using Custom executor with driver {name} {version}..."),
                None => format!("Using Custom executor with driver {name}..."),
            },
            _ => "Using Custom executor...".into(),
        };
        self.log_line("", "", &startup);
        Ok(())
    }

    /// `<namespace>/<project>` from the repo URL's path, as `ProjectSlug` does (§9.4); a
    /// malformed URL falls back to `project-<id>`.
    fn project_path(&self) -> String {
        let url = &self.job.git_info.repo_url;
        url.split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(_, path)| path.trim_end_matches(".git").trim_matches('/').to_owned())
            .filter(|p| !p.is_empty() && !p.contains(".."))
            .unwrap_or_else(|| format!("project-{}", self.job.job_info.project_id))
    }

    /// The exit-code mapping of `command.go` (§1.1, §4.5).
    fn exit_failure(&self, exit: &CallExit) -> Result<(), Failure> {
        let unknown = |code: i32| {
            Failure::System(format!(
                "unknown Custom executor executable exit code {code}; executable execution terminated with: {}",
                exit.go_text()
            ))
        };
        match exit {
            CallExit::Code(0) => Ok(()),
            CallExit::Code(1) => {
                let file = self
                    .attempt
                    .temp_dir
                    .as_ref()
                    .map(|d| d.join("build_exit_code"));
                match file.and_then(|f| std::fs::read(f).ok()) {
                    None => Err(Failure::Build {
                        exit_code: 1,
                        message: exit.go_text(),
                    }),
                    Some(bytes) => match parse_build_exit_code(&bytes) {
                        Some(code) => Err(Failure::Build {
                            exit_code: code,
                            message: format!("exit status {}", first_line(&bytes)),
                        }),
                        None => Err(unknown(2)),
                    },
                }
            }
            CallExit::Code(2) | CallExit::StartFailed(_) | CallExit::NotReaped => {
                Err(Failure::System(exit.go_text()))
            }
            other => Err(unknown(other.code())),
        }
    }

    /// `GetAllVariables` (§3.4), in the runner's order.
    fn all_variables(&self) -> Vec<JobVariable> {
        let var = |key: &str, value: String| JobVariable {
            key: key.into(),
            value,
            public: true,
            ..JobVariable::default()
        };
        let mut vars = Vec::new();
        if let Some(image) = &self.job.image {
            vars.push(var("CI_JOB_IMAGE", image.name.clone()));
        }
        let slot = self.options.concurrent_id.to_string();
        vars.extend([
            var(
                "CI_RUNNER_SHORT_TOKEN",
                self.options.runner_short_token.clone(),
            ),
            var("CI_BUILDS_DIR", self.builds_dir.clone()),
            var("CI_PROJECT_DIR", self.project_dir.clone()),
            var("CI_CONCURRENT_ID", slot.clone()),
            var("CI_CONCURRENT_PROJECT_ID", slot),
            var("CI_SERVER", "yes".into()),
            var("CI_JOB_STATUS", self.job_status.into()),
            var(
                "CI_JOB_TIMEOUT",
                self.job.runner_info.effective_timeout_secs().to_string(),
            ),
        ]);
        vars.extend(self.job.variables.iter().cloned());
        vars.extend([
            var("CI_SHARED_ENVIRONMENT", "true".into()),
            var("CI_RUNNER_VERSION", EMULATED_RUNNER_VERSION.into()),
            var("CI_RUNNER_REVISION", "drover".into()),
            var(
                "CI_RUNNER_EXECUTABLE_ARCH",
                format!("linux/{}", std::env::consts::ARCH),
            ),
            var(
                "RUNNER_TEMP_PROJECT_DIR",
                format!("{}.tmp", self.project_dir),
            ),
        ]);
        vars
    }

    /// `CI_JOB_SERVICES` (§3.4): a JSON array, or the empty string without services.
    fn services_json(&self) -> String {
        if self.job.services.is_empty() {
            return String::new();
        }
        let services: Vec<Service> = self
            .job
            .services
            .iter()
            .map(|s| Service {
                name: s.name.clone(),
                alias: s.alias.clone(),
                entrypoint: (!s.entrypoint.is_empty()).then(|| s.entrypoint.clone()),
                command: (!s.command.is_empty()).then(|| s.command.clone()),
                variables: Vec::new(),
            })
            .collect();
        serde_json::to_string(&services).unwrap_or_default()
    }

    /// The environment of a call on top of the harness's own (§1.1, §3).
    fn call_env(&self, call: &Call, temp_dir: &Path) -> Vec<(String, String)> {
        let path = |name: &str| temp_dir.join(name).to_string_lossy().into_owned();
        // The runner's own environment comes first (§1.1); only its PATH is changed here.
        let mut env: Vec<(String, String)> = self
            .options
            .path_prefix
            .iter()
            .map(|dir| ("PATH".to_owned(), prefixed_path(dir)))
            .collect();
        env.extend([
            (TMPDIR.to_owned(), temp_dir.to_string_lossy().into_owned()),
            (BUILD_FAILURE_EXIT_CODE.to_owned(), "1".to_owned()),
            (SYSTEM_FAILURE_EXIT_CODE.to_owned(), "2".to_owned()),
            (BUILD_EXIT_CODE_FILE.to_owned(), path("build_exit_code")),
            (JOB_RESPONSE_FILE.to_owned(), path("response.json")),
        ]);
        if *call != Call::Config {
            env.extend(self.attempt.job_env.iter().cloned());
        }
        env.extend(
            self.all_variables()
                .into_iter()
                .map(|v| (format!("{CUSTOM_ENV_PREFIX}{}", v.key), v.value)),
        );
        env.push((
            format!("{CUSTOM_ENV_PREFIX}CI_JOB_SERVICES"),
            self.services_json(),
        ));
        env
    }

    fn script_info(&self) -> ScriptInfo {
        let other = &self.job.other;
        let list = |key: &str| other.get(key).cloned().unwrap_or_default();
        let git_strategy = self
            .job
            .variable("GIT_STRATEGY")
            .unwrap_or("fetch")
            .to_owned();
        let suffix = if git_strategy == "empty" {
            "-empty"
        } else {
            ""
        };
        ScriptInfo {
            shell: self.attempt.shell.clone(),
            variables: self.all_variables(),
            project_dir: self.project_dir.clone(),
            cache_project_dir: format!(
                "{}/{}{suffix}",
                self.cache_dir.trim_end_matches('/'),
                self.project_path()
            ),
            hostname: self.attempt.hostname.clone(),
            git_strategy,
            git: self.job.git_info.clone(),
            steps: self.job.steps.clone(),
            cache: serde_json::from_value::<Vec<CacheEntry>>(list("cache")).unwrap_or_default(),
            artifacts: serde_json::from_value::<Vec<ArtifactEntry>>(list("artifacts"))
                .unwrap_or_default(),
            // Only dependencies that uploaded artifacts are downloaded (§4.1 row 4).
            dependencies: serde_json::from_value::<Vec<PayloadDependency>>(list("dependencies"))
                .unwrap_or_default()
                .into_iter()
                .filter(|dep| dep.artifacts_file.is_some())
                .map(|dep| Dependency {
                    id: dep.id,
                    name: dep.name,
                    token: dep.token,
                })
                .collect(),
            server_url: self.job.variable("CI_SERVER_URL").unwrap_or("").to_owned(),
            job_token: self.job.token.clone(),
            job_id: self.job.id,
        }
    }

    /// Starts one driver call and waits for it as the runner does; `script` is the run script's
    /// path, `stdout_override` replaces the job log as stdout's destination.
    async fn call(
        &mut self,
        call: Call,
        script: Option<PathBuf>,
        stdout_override: Option<Sink>,
    ) -> CallExit {
        let Some(temp_dir) = self.attempt.temp_dir.clone() else {
            return CallExit::StartFailed("no executor temp dir".into());
        };
        let mut args = self.driver.args.clone();
        args.push(call.stage().into());
        let sub_stage = match &call {
            Call::Run(sub) => {
                args.extend(script.iter().map(|s| s.clone().into_os_string()));
                args.push(sub.name().into());
                Some(sub.name().to_owned())
            }
            _ => None,
        };
        let first_byte = Arc::new(Notify::new());
        let (mut stdout, mut stderr) = match call {
            Call::Cleanup => (
                buffer_sink(&self.cleanup_output),
                buffer_sink(&self.cleanup_output),
            ),
            _ => (self.log_sink(), self.log_sink()),
        };
        if let Some(sink) = stdout_override {
            stdout = sink;
        }
        if let (Call::Run(SubStage::BuildScript), Some(capture)) = (&call, &self.build_stdout) {
            let (log, capture) = (stdout, buffer_sink(capture));
            stdout = Arc::new(move |chunk| {
                log(chunk);
                capture(chunk);
            });
        }
        let hook = match (&call, self.attempt_no) {
            (Call::Prepare, 1) => self.options.terminate_first_prepare,
            _ => None,
        };
        if hook.is_some() {
            let notify = |sink: Sink| -> Sink {
                let first_byte = first_byte.clone();
                Arc::new(move |chunk| {
                    first_byte.notify_one();
                    sink(chunk);
                })
            };
            stdout = notify(stdout);
            stderr = notify(stderr);
        }
        let invocation = Invocation {
            program: self.driver.program.clone(),
            args,
            cwd: temp_dir.clone(),
            env: self.call_env(&call, &temp_dir),
            stdout,
            stderr,
        };
        let kill = self.kill_trigger(&call, hook, first_byte);
        let on_start = {
            let hook = self.hooks.on_call_start.clone();
            let (stage, sub_stage, attempt) = (call.stage(), sub_stage.clone(), self.attempt_no);
            move |pid| {
                if let Some(hook) = hook {
                    hook(&CallStart {
                        stage,
                        sub_stage,
                        attempt,
                        pid,
                    })
                }
            }
        };
        let timeouts = KillTimeouts {
            graceful: self.options.graceful_kill_timeout,
            force: self.options.force_kill_timeout,
        };
        let ended = process::run(invocation, on_start, kill, timeouts).await;
        match ended.killed_by {
            Some(Cause::JobTimeout) => {
                self.job_dead.get_or_insert(Failure::TimedOut);
            }
            Some(Cause::JobCanceled) => {
                self.job_dead.get_or_insert(Failure::Canceled);
            }
            Some(Cause::ScriptCanceled) => self.script_canceled = true,
            _ => {}
        }
        self.seen_cancel = self.seen_cancel.max(*self.cancel_rx.borrow());
        self.calls.push(CallRecord {
            stage: call.stage(),
            sub_stage,
            attempt: self.attempt_no,
            pid: ended.pid,
            exit: ended.exit.clone(),
            killed_by: ended.killed_by.map(|c| c.to_string()),
            duration: ended.duration,
        });
        ended.exit
    }

    /// The contexts a call runs under (§4.2, §6.2), as one future that resolves with the reason
    /// to kill it.
    fn kill_trigger(
        &self,
        call: &Call,
        hook: Option<PrepareTermination>,
        first_byte: Arc<Notify>,
    ) -> impl std::future::Future<Output = Cause> + use<> {
        let far = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400);
        let now = tokio::time::Instant::now();
        let stage_timeout = match call {
            Call::Config => Some(self.options.config_exec_timeout),
            Call::Prepare => Some(self.options.prepare_exec_timeout),
            Call::Cleanup => Some(self.options.cleanup_exec_timeout),
            Call::Run(SubStage::AfterScript) => Some(
                self.variable_duration("RUNNER_AFTER_SCRIPT_TIMEOUT", Duration::from_secs(300)),
            ),
            Call::Run(sub) if sub.is_user_script() => self
                .job
                .variable("RUNNER_SCRIPT_TIMEOUT")
                .and_then(crate::job::parse_duration),
            Call::Run(_) => None,
        };
        let stage_deadline = stage_timeout.map_or(far, |t| now + t);
        // cleanup_exec runs on a background context: no job timeout, no cancel (§1.5).
        let job_bound = *call != Call::Cleanup;
        let job_deadline = if job_bound { self.deadline } else { far };
        let user_step =
            matches!(call, Call::Run(sub) if sub.is_user_script() && *sub != SubStage::AfterScript);
        let phase = self.phase;
        let mut rx = self.cancel_rx.clone();
        rx.mark_unchanged();
        async move {
            let hook_sleep = match hook {
                Some(PrepareTermination::After(after)) => now + after,
                _ => far,
            };
            let wait_first_byte = hook == Some(PrepareTermination::AfterFirstByte);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(stage_deadline) => return Cause::StageTimeout,
                    _ = tokio::time::sleep_until(job_deadline) => return Cause::JobTimeout,
                    _ = tokio::time::sleep_until(hook_sleep) => return Cause::PrepareHook,
                    _ = first_byte.notified(), if wait_first_byte => return Cause::PrepareHook,
                    changed = rx.changed(), if job_bound => {
                        if changed.is_err() {
                            std::future::pending::<()>().await;
                        }
                        match (*rx.borrow_and_update(), phase) {
                            (2.., _) | (1, Phase::Before) => return Cause::JobCanceled,
                            (1, _) if user_step => return Cause::ScriptCanceled,
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    fn variable_duration(&self, key: &str, default: Duration) -> Duration {
        self.job
            .variable(key)
            .and_then(crate::job::parse_duration)
            .unwrap_or(default)
    }

    /// Runs one sub-stage (`executeStage`): nothing when the job is dead, no call when the
    /// script generator skips it.
    async fn stage(&mut self, sub: SubStage) -> Result<(), Failure> {
        self.observe_cancel();
        if let Some(dead) = &self.job_dead {
            return Err(dead.clone());
        }
        if sub.is_user_script() && sub != SubStage::AfterScript && self.script_canceled {
            return Err(Failure::Canceled);
        }
        let Some(text) = script::generate(&self.script_info(), &sub) else {
            return Ok(());
        };
        let Some(temp_dir) = self.attempt.temp_dir.clone() else {
            return Err(Failure::System("no executor temp dir".into()));
        };
        self.log_line(ANSI_BOLD_CYAN, "", &stage_description(&sub));
        let path = write_script(&temp_dir, &text)
            .map_err(|e| Failure::System(format!("writing the script: {e}")))?;
        let exit = self.call(Call::Run(sub.clone()), Some(path), None).await;
        if let Some(dead) = &self.job_dead {
            return Err(dead.clone());
        }
        let killed = self.calls.last().and_then(|c| c.killed_by.clone());
        if self.script_canceled && sub.is_user_script() && sub != SubStage::AfterScript {
            return Err(Failure::Canceled);
        }
        if killed.as_deref() == Some("stage timeout") && sub.is_user_script() {
            return Err(Failure::TimedOut);
        }
        self.exit_failure(&exit)
    }

    /// A stage with `<NAME>_ATTEMPTS` retries (§5.2); get_sources runs clear_worktree before
    /// its 2nd attempt.
    async fn stage_with_attempts(&mut self, sub: SubStage, variable: &str) -> Result<(), Failure> {
        let attempts = self
            .job
            .variable(variable)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1)
            .clamp(1, 10);
        let mut result = Ok(());
        for attempt in 1..=attempts {
            if attempt == 2 && sub == SubStage::GetSources {
                let _ = self.stage(SubStage::ClearWorktree).await;
            }
            result = self.stage(sub.clone()).await;
            if result.is_ok() || self.job_dead.is_some() {
                break;
            }
        }
        result
    }

    /// `executeScript` (§4.1): which stages run after which failure.
    async fn execute_script(&mut self) -> Result<(), Failure> {
        self.phase = Phase::Before;
        if let Err(failure) = self.stage(SubStage::PrepareScript).await {
            return Err(match failure {
                Failure::System(msg) => {
                    Failure::System(format!("prepare environment: {msg}. {SHELL_PROFILE_HINT}"))
                }
                Failure::Build { exit_code, message } => Failure::Build {
                    exit_code,
                    message: format!("prepare environment: {message}. {SHELL_PROFILE_HINT}"),
                },
                other => other,
            });
        }
        let mut error = self
            .stage_with_attempts(SubStage::GetSources, "GET_SOURCES_ATTEMPTS")
            .await
            .err();
        for (sub, variable) in [
            (SubStage::RestoreCache, "RESTORE_CACHE_ATTEMPTS"),
            (SubStage::DownloadArtifacts, "ARTIFACT_DOWNLOAD_ATTEMPTS"),
        ] {
            if error.is_none() {
                error = self.stage_with_attempts(sub, variable).await.err();
            }
        }
        if let Some(dead) = &self.job_dead {
            return Err(dead.clone());
        }
        if error.is_none() {
            error = self.user_steps().await.err();
            if let Some(dead) = &self.job_dead {
                return Err(dead.clone());
            }
        }
        let on_success = error.is_none();
        let cache_error = self
            .stage(if on_success {
                SubStage::ArchiveCache
            } else {
                SubStage::ArchiveCacheOnFailure
            })
            .await
            .err();
        let upload_error = self
            .stage(if on_success {
                SubStage::UploadArtifactsOnSuccess
            } else {
                SubStage::UploadArtifactsOnFailure
            })
            .await
            .err();
        if let Some(dead) = &self.job_dead {
            return Err(dead.clone());
        }
        // Its errors are only logged and never fail the job (§4.1 row 9).
        if let Err(failure) = self.stage(SubStage::CleanupFileVariables).await {
            self.log_warning(&format!("Cleanup file variables failed: {failure}"));
        }
        // `pickPriorityError`: the job error wins, then the cache error, then the upload error.
        match error.or(cache_error).or(upload_error) {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// `executeUserScripts`: the steps, then after_script whatever their result.
    async fn user_steps(&mut self) -> Result<(), Failure> {
        self.phase = Phase::User;
        let mut result = self.stage(SubStage::BuildScript).await;
        let others: Vec<String> = self
            .job
            .steps
            .iter()
            .map(|s| s.name.clone())
            .filter(|n| n != "script" && n != "after_script")
            .collect();
        for name in others {
            if result.is_err() {
                break;
            }
            result = self.stage(SubStage::Step(format!("step_{name}"))).await;
        }
        self.observe_cancel();
        self.phase = Phase::After;
        if self.job_dead.is_some() {
            return result;
        }
        if self.script_canceled {
            result = Err(Failure::Canceled);
            self.log_warning("script canceled externally (UI, API)");
        }
        self.job_status = match &result {
            Ok(()) => "success",
            Err(Failure::Canceled) => "canceled",
            Err(Failure::TimedOut) => "timedout",
            Err(_) => "failed",
        };
        if let Err(failure) = self.stage(SubStage::AfterScript).await {
            if self.job_dead.is_none() {
                self.log_warning(&format!(
                    "after_script failed, but job will continue unaffected: {failure}"
                ));
            }
        }
        result
    }

    /// `executor.Cleanup`: cleanup_exec on a background context, then the temp dir goes.
    async fn cleanup(&mut self) {
        let Some(temp_dir) = self.attempt.temp_dir.clone() else {
            return;
        };
        let exit = self.call(Call::Cleanup, None, None).await;
        if let Err(failure) = self.exit_failure(&exit) {
            self.log_warning(&format!("Cleanup script failed: {failure}"));
        }
        let _ = std::fs::remove_dir_all(&temp_dir);
        self.attempt.temp_dir = None;
    }
}

/// `GetStageDescription` (`common/build.go`).
fn stage_description(sub: &SubStage) -> String {
    match sub {
        SubStage::PrepareScript => "Preparing environment".into(),
        SubStage::GetSources => "Getting source from Git repository".into(),
        SubStage::ClearWorktree => {
            "Deleting all tracked and untracked files due to source fetch failure".into()
        }
        SubStage::RestoreCache => "Restoring cache".into(),
        SubStage::DownloadArtifacts => "Downloading artifacts".into(),
        SubStage::AfterScript => "Running after_script".into(),
        SubStage::ArchiveCache => "Saving cache for successful job".into(),
        SubStage::ArchiveCacheOnFailure => "Saving cache for failed job".into(),
        SubStage::UploadArtifactsOnSuccess => "Uploading artifacts for successful job".into(),
        SubStage::UploadArtifactsOnFailure => "Uploading artifacts for failed job".into(),
        SubStage::CleanupFileVariables => {
            "Cleaning up project directory and file based variables".into()
        }
        // The runner's own stage name is step_script; it renames it only for run_exec (§1.4).
        SubStage::BuildScript => "Executing \"step_script\" stage of the job script".into(),
        SubStage::Step(name) | SubStage::Other(name) => {
            format!("Executing {name:?} stage of the job script")
        }
    }
}

/// The first line of `BUILD_EXIT_CODE_FILE`, without its `\n` or `\r\n` (Go's `ScanLines`).
fn first_line(bytes: &[u8]) -> Cow<'_, str> {
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line))
}

/// `strconv.Atoi` of the first line, with no trimming (§4.5): `" 42"` is not a number.
pub fn parse_build_exit_code(bytes: &[u8]) -> Option<i32> {
    let line = first_line(bytes);
    let digits = line.strip_prefix(['+', '-']).unwrap_or(&line);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    line.parse().ok()
}

/// Go's `time.Duration` text for whole seconds: `3s`, `5m0s`, `1h0m0s`.
pub fn go_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    let millis = duration.subsec_millis();
    if secs == 0 && millis > 0 {
        return format!("{millis}ms");
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// `response.json`, mode 0600 (§3.1).
fn write_private(path: &Path, job: &JobResponse) -> std::io::Result<()> {
    let json = serde_json::to_vec(job).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&json)
}

/// A new `scriptNNNN/script` (mode 0700) under the temp dir (§1.4).
fn write_script(temp_dir: &Path, text: &str) -> std::io::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("script")
        .rand_bytes(10)
        .tempdir_in(temp_dir)?
        .keep();
    let path = dir.join("script");
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
    Ok(path)
}

/// `dir` followed by the harness's own `PATH`.
pub fn prefixed_path(dir: &Path) -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_exit_code_file_rules() {
        assert_eq!(parse_build_exit_code(b"42"), Some(42));
        assert_eq!(parse_build_exit_code(b"42\n"), Some(42));
        assert_eq!(parse_build_exit_code(b"42\r\nrest"), Some(42));
        assert_eq!(parse_build_exit_code(b"-3"), Some(-3));
        for bad in [&b" 42"[..], b"42 ", b"abc", b"", b"\n42", b"4 2"] {
            assert_eq!(parse_build_exit_code(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_print_like_go() {
        assert_eq!(go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(go_duration(Duration::from_secs(300)), "5m0s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    #[test]
    fn results_use_gitlabs_words() {
        assert_eq!(
            JobResult::ScriptFailure { exit_code: 3 }.to_string(),
            "script_failure (exit code 3)"
        );
        assert_eq!(JobResult::TimedOut.to_string(), "timedout");
        let failure = JobResult::RunnerSystemFailure { reason: "x".into() };
        assert_eq!(failure.to_string(), "runner_system_failure");
    }
}
