//! `--runner real`: the user's own `gitlab-runner` runs the job through `run-single`, against
//! drover's fake coordinator (contract §9.3), with the driver configured as
//! `[runners.custom]`. What it shows is what GitLab would show: the trace the runner PATCHed,
//! and the result of its final `PUT`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use drover_protocol::JobResponse;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;

use crate::coordinator::{Coordinator, FinalUpdate};
use crate::emulated::prefixed_path;
use crate::{CancelHandle, Driver, Hooks, JobReport, JobResult};

/// How long run-single may take to exit once it sent the final update.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// Environment variable naming a GitLab Runner binary.
pub const GITLAB_RUNNER_BIN: &str = "GITLAB_RUNNER_BIN";

/// A GitLab Runner binary: `explicit`, else `$GITLAB_RUNNER_BIN`, else `gitlab-runner` on PATH.
pub fn find_gitlab_runner(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_owned());
    }
    if let Some(path) = std::env::var_os(GITLAB_RUNNER_BIN).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("gitlab-runner"))
        .find(|candidate| candidate.is_file())
}

/// The `[[runners]]` settings of a real run.
#[derive(Debug, Clone)]
pub struct RealRunner {
    /// The `gitlab-runner` binary.
    pub binary: PathBuf,
    /// `builds_dir`, unless the driver's config overrides it.
    pub builds_dir: String,
    /// `cache_dir`, unless the driver's config overrides it.
    pub cache_dir: String,
    /// Where the runner's own log and its `gitlab-runner` link for the job environment go.
    pub work_dir: PathBuf,
}

impl RealRunner {
    /// The runner's version line, e.g. `Version:      17.9.3`.
    pub async fn version(&self) -> Option<String> {
        let output = Command::new(&self.binary)
            .arg("--version")
            .output()
            .await
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|line| line.starts_with("Version:"))
            .map(|line| line.trim_start_matches("Version:").trim().to_owned())
    }

    /// A directory holding `gitlab-runner` (a link to [`RealRunner::binary`]): the job
    /// environment finds the helper commands for cache and artifacts by that name on PATH
    /// (§8), and drivers that run jobs on the host inherit the runner's PATH.
    pub fn helper_dir(&self) -> std::io::Result<PathBuf> {
        helper_dir(&self.binary, &self.work_dir)
    }

    fn arguments(&self, coordinator: &Coordinator, driver: &Driver) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "run-single",
            "--url",
            &coordinator.url(),
            "--token",
            coordinator.runner_token(),
            "--executor",
            "custom",
            "--builds-dir",
            &self.builds_dir,
            "--cache-dir",
            &self.cache_dir,
            "--max-builds",
            "1",
            "--wait-timeout",
            "60",
            // KiB; the default 4 MiB would truncate large job logs.
            "--output-limit",
            "1048576",
        ]
        .map(OsString::from)
        .into();
        for (stage, word) in [
            ("config", "config"),
            ("prepare", "prepare"),
            ("run", "run"),
            ("cleanup", "cleanup"),
        ] {
            args.push(format!("--custom-{stage}-exec").into());
            args.push(driver.program.clone().into());
            for arg in driver
                .args
                .iter()
                .chain(std::iter::once(&OsString::from(word)))
            {
                args.push(format!("--custom-{stage}-args").into());
                args.push(arg.clone());
            }
        }
        args
    }
}

/// Makes `<work_dir>/bin/gitlab-runner` point at `binary`, and returns that directory.
pub fn helper_dir(binary: &Path, work_dir: &Path) -> std::io::Result<PathBuf> {
    let dir = work_dir.join("bin");
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("gitlab-runner");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(std::path::absolute(binary)?, &link)?;
    Ok(dir)
}

/// Runs `job` through the real runner and reports what the coordinator saw.
pub async fn run_job(
    runner: &RealRunner,
    coordinator: &Coordinator,
    driver: &Driver,
    job: &JobResponse,
    hooks: &Hooks,
    cancel: &CancelHandle,
) -> Result<JobReport, String> {
    let started = Instant::now();
    std::fs::create_dir_all(&runner.work_dir)
        .map_err(|e| format!("{}: {e}", runner.work_dir.display()))?;
    let runner_log = runner
        .work_dir
        .join(format!("gitlab-runner-{}.log", job.id));
    let log_file =
        std::fs::File::create(&runner_log).map_err(|e| format!("{}: {e}", runner_log.display()))?;
    let helpers = runner
        .helper_dir()
        .map_err(|e| format!("cannot link gitlab-runner: {e}"))?;

    let mut trace = coordinator.trace_stream(job.id);
    coordinator.enqueue(job.clone());
    let mut command = Command::new(&runner.binary);
    command
        .args(runner.arguments(coordinator, driver))
        .env("PATH", prefixed_path(&helpers))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", runner.binary.display()))?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);

    let mut log = Vec::new();
    let mut on_chunk = |chunk: Vec<u8>| {
        if let Some(hook) = &hooks.on_log {
            hook(&chunk);
        }
        log.extend_from_slice(&chunk);
    };
    let mut cancel_level = cancel.subscribe();
    let final_update = coordinator.wait_final(job.id);
    tokio::pin!(final_update);
    let outcome = loop {
        tokio::select! {
            update = &mut final_update => break Ok(update),
            Some(chunk) = trace.recv() => on_chunk(chunk),
            Ok(()) = cancel_level.changed() => {
                match *cancel_level.borrow_and_update() {
                    1 => coordinator.cancel(job.id),
                    2 => coordinator.abort(job.id),
                    _ => {}
                }
            }
            status = child.wait() => {
                break Err(format!(
                    "gitlab-runner exited ({}) without finishing the job; its log: {}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    runner_log.display()
                ));
            }
        }
    };
    // The runner flushes the trace before the final update; take what is still queued.
    while let Ok(chunk) = trace.try_recv() {
        on_chunk(chunk);
    }
    if tokio::time::timeout(EXIT_LIMIT, child.wait())
        .await
        .is_err()
    {
        if let Some(group) = group {
            let _ = killpg(group, Signal::SIGKILL);
        }
        let _ = child.wait().await;
    }
    let update = outcome?;
    Ok(JobReport {
        result: result_of(&update),
        log_len: log.len() as u64,
        log,
        calls: Vec::new(),
        build_stdout: None,
        cleanup_output: Vec::new(),
        duration: started.elapsed(),
    })
}

/// The result GitLab would record for the runner's final update (§9.3 row 5).
pub fn result_of(update: &FinalUpdate) -> JobResult {
    match (update.state.as_str(), update.failure_reason.as_deref()) {
        ("success", _) => JobResult::Success,
        (_, Some("script_failure")) => JobResult::ScriptFailure {
            exit_code: update.exit_code.unwrap_or(1),
        },
        (_, Some("job_execution_timeout")) => JobResult::TimedOut,
        (_, Some("job_canceled" | "canceled")) => JobResult::Canceled,
        (_, reason) => JobResult::RunnerSystemFailure {
            reason: reason.unwrap_or("unknown_failure").to_owned(),
        },
    }
}
