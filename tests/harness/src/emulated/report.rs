//! What the emulated runner reports about a job: its result in GitLab's words and every driver
//! call it made.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use drover_protocol::SubStage;

use crate::process::CallExit;

use super::{ExecStage, KillCause};
#[cfg(doc)]
use super::{RunnerOptions, config_then_cleanup};

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
    /// Which `*_exec` it ran.
    pub stage: ExecStage,
    /// The run sub-stage.
    pub sub_stage: Option<SubStage>,
    /// The Prepare attempt it belongs to.
    pub attempt: u32,
    /// Pid and process group id; `None` if it never started.
    pub pid: Option<u32>,
    /// How it ended.
    pub exit: CallExit,
    /// Why the runner signalled it, if it did.
    pub killed_by: Option<KillCause>,
    /// From start to exit and EOF on both pipes.
    pub duration: Duration,
}

impl CallRecord {
    /// Which call it was, to compare with an expected sequence such as
    /// [`SIMPLE_JOB_CALLS`](crate::conformance::SIMPLE_JOB_CALLS).
    pub fn kind(&self) -> (ExecStage, Option<SubStage>) {
        (self.stage, self.sub_stage.clone())
    }

    /// `config`, `prepare`, `run build_script`, `cleanup`.
    pub fn name(&self) -> String {
        call_name(self.stage, self.sub_stage.as_ref())
    }
}

/// A call's name for messages, as the runner's arguments spell it: `config`, `prepare`,
/// `run build_script`, `cleanup`.
pub fn call_name(stage: ExecStage, sub_stage: Option<&SubStage>) -> String {
    match sub_stage {
        Some(sub) => format!("{stage} {sub}"),
        None => stage.to_string(),
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

    /// The calls, in order, as [`CallRecord::kind`] gives them.
    pub fn call_kinds(&self) -> Vec<(ExecStage, Option<SubStage>)> {
        self.calls.iter().map(CallRecord::kind).collect()
    }

    /// The names of the calls, e.g. `["config", "prepare", "run prepare_script", ...]`.
    pub fn call_names(&self) -> Vec<String> {
        self.calls.iter().map(CallRecord::name).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn call_names_read_like_the_runners_arguments() {
        assert_eq!(call_name(ExecStage::Prepare, None), "prepare");
        assert_eq!(
            call_name(ExecStage::Run, Some(&SubStage::BuildScript)),
            "run build_script"
        );
    }
}
