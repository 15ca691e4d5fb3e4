//! What the caller of the emulated runner sets and holds: the driver, the runner's settings,
//! hooks into a running job, and the cancel button.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::SubStage;
use tokio::sync::watch;

use super::ExecStage;

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
    /// Which `*_exec` it runs.
    pub stage: ExecStage,
    /// The run sub-stage.
    pub sub_stage: Option<SubStage>,
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
