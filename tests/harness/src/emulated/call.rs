//! One driver call: which `*_exec` it runs, how the runner starts it, and why the runner kills
//! it (§1.1, §6).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::SubStage;
use tokio::sync::Notify;

use crate::process::{self, CallExit, Invocation, KillTimeouts, Sink};

#[cfg(doc)]
use super::RunnerOptions;
use super::exit::Failure;
use super::log::buffer_sink;
use super::{CallRecord, CallStart, Emulator, Phase, PrepareTermination};

/// Which of the four `*_exec` settings a driver call runs: `config_exec`, `prepare_exec`,
/// `run_exec` or `cleanup_exec` (§1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecStage {
    /// `config_exec`.
    Config,
    /// `prepare_exec`.
    Prepare,
    /// `run_exec`, with a script and a sub-stage.
    Run,
    /// `cleanup_exec`.
    Cleanup,
}

impl ExecStage {
    /// The stage word the runner passes after the `*_args` (§1.1).
    pub fn name(self) -> &'static str {
        match self {
            ExecStage::Config => "config",
            ExecStage::Prepare => "prepare",
            ExecStage::Run => "run",
            ExecStage::Cleanup => "cleanup",
        }
    }
}

impl fmt::Display for ExecStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the runner started the kill sequence on a call (§6.2): which of the contexts a call runs
/// under ended first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillCause {
    /// config/prepare/cleanup exec timeout, or after_script's and the script's own timeouts.
    StageTimeout,
    /// The job timeout (`runner_info.timeout`).
    JobTimeout,
    /// Abort, or a graceful cancel before the user steps: the whole job context.
    JobCanceled,
    /// A graceful cancel during the user steps: only the script context.
    ScriptCanceled,
    /// The harness cut the first prepare short ([`RunnerOptions::terminate_first_prepare`]).
    PrepareHook,
}

impl fmt::Display for KillCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KillCause::StageTimeout => "stage timeout",
            KillCause::JobTimeout => "job timeout",
            KillCause::JobCanceled => "job canceled",
            KillCause::ScriptCanceled => "script canceled",
            KillCause::PrepareHook => "prepare terminated by the harness",
        })
    }
}

/// A call to make: its `*_exec` and, for run_exec, the sub-stage the script is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    Config,
    Prepare,
    Run(SubStage),
    Cleanup,
}

impl Call {
    fn stage(&self) -> ExecStage {
        match self {
            Call::Config => ExecStage::Config,
            Call::Prepare => ExecStage::Prepare,
            Call::Run(_) => ExecStage::Run,
            Call::Cleanup => ExecStage::Cleanup,
        }
    }
}

impl Emulator<'_> {
    /// Starts one driver call and waits for it as the runner does; `script` is the run script's
    /// path, `stdout_override` replaces the job log as stdout's destination.
    pub(super) async fn call(
        &mut self,
        call: Call,
        script: Option<PathBuf>,
        stdout_override: Option<Sink>,
    ) -> CallExit {
        let Some(temp_dir) = self.attempt.temp_dir.clone() else {
            return CallExit::StartFailed("no executor temp dir".into());
        };
        let mut args = self.driver.args.clone();
        args.push(call.stage().name().into());
        let sub_stage = match &call {
            Call::Run(sub) => {
                args.extend(script.iter().map(|s| s.clone().into_os_string()));
                args.push(sub.name().into());
                Some(sub.clone())
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
            Some(KillCause::JobTimeout) => {
                self.job_dead.get_or_insert(Failure::TimedOut);
            }
            Some(KillCause::JobCanceled) => {
                self.job_dead.get_or_insert(Failure::Canceled);
            }
            Some(KillCause::ScriptCanceled) => self.script_canceled = true,
            _ => {}
        }
        self.seen_cancel = self.seen_cancel.max(*self.cancel_rx.borrow());
        self.calls.push(CallRecord {
            stage: call.stage(),
            sub_stage,
            attempt: self.attempt_no,
            pid: ended.pid,
            exit: ended.exit.clone(),
            killed_by: ended.killed_by,
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
    ) -> impl std::future::Future<Output = KillCause> + use<> {
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
                    _ = tokio::time::sleep_until(stage_deadline) => return KillCause::StageTimeout,
                    _ = tokio::time::sleep_until(job_deadline) => return KillCause::JobTimeout,
                    _ = tokio::time::sleep_until(hook_sleep) => return KillCause::PrepareHook,
                    _ = first_byte.notified(), if wait_first_byte => return KillCause::PrepareHook,
                    changed = rx.changed(), if job_bound => {
                        if changed.is_err() {
                            std::future::pending::<()>().await;
                        }
                        match (*rx.borrow_and_update(), phase) {
                            (2.., _) | (1, Phase::Before) => return KillCause::JobCanceled,
                            (1, _) if user_step => return KillCause::ScriptCanceled,
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
}
