//! The job as `common/build.go` runs it: Prepare with retries (§5.1), the script stages and
//! which run after which failure (§4.1), cancel and timeout handling (§6.2), and the deferred
//! Cleanup (§1.5).

use std::sync::{Arc, Mutex};

use drover_protocol::{ConfigOutput, SubStage};

use crate::script;

use super::call::Call;
use super::env::write_script;
use super::exit::Failure;
use super::log::{ANSI_BOLD_CYAN, Buffer, buffer_sink, go_duration, lock, stage_description};
use super::{EMULATED_RUNNER_VERSION, Emulator, KillCause, Phase};

/// `PreparationRetries` (§5.1).
const PREPARATION_ATTEMPTS: u32 = 3;
/// The link the runner appends to a prepare_script failure (§4.1).
const SHELL_PROFILE_HINT: &str =
    "Check https://docs.gitlab.com/runner/shells/#shell-profile-loading for more information";

impl Emulator<'_> {
    /// `Build.Run`: Prepare with retries, the script stages, then the deferred Cleanup.
    pub(super) async fn run(&mut self) -> Result<(), Failure> {
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
        let killed = self.calls.last().and_then(|c| c.killed_by);
        if self.script_canceled && sub.is_user_script() && sub != SubStage::AfterScript {
            return Err(Failure::Canceled);
        }
        if killed == Some(KillCause::StageTimeout) && sub.is_user_script() {
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
    pub(super) async fn cleanup(&mut self) {
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
