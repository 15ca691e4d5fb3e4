//! The job log: the driver's output and the runner's own lines, kept up to a cap and forwarded
//! live, with the runner's wording and colours.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use drover_protocol::SubStage;

use crate::process::Sink;

use super::exit::Failure;
use super::{Emulator, LogHook};

pub(super) const ANSI_BOLD_CYAN: &str = "\x1b[36;1m";
const ANSI_BOLD_GREEN: &str = "\x1b[32;1m";
const ANSI_BOLD_RED: &str = "\x1b[31;1m";
const ANSI_YELLOW: &str = "\x1b[0;33m";
const ANSI_RESET: &str = "\x1b[0;m";

/// The job log: kept up to a cap, forwarded live.
pub(super) struct JobLog {
    /// The bytes kept, at most `cap` of them.
    pub(super) bytes: Vec<u8>,
    /// Every byte appended, kept or not.
    pub(super) len: u64,
    cap: Option<usize>,
    live: Option<LogHook>,
}

impl JobLog {
    pub(super) fn new(cap: Option<usize>, live: Option<LogHook>) -> JobLog {
        JobLog {
            bytes: Vec::new(),
            len: 0,
            cap,
            live,
        }
    }

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
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A shared byte buffer a sink appends to.
pub(super) type Buffer = Arc<Mutex<Vec<u8>>>;

pub(super) fn buffer_sink(buffer: &Buffer) -> Sink {
    let buffer = buffer.clone();
    Arc::new(move |chunk| lock(&buffer).extend_from_slice(chunk))
}

impl Emulator<'_> {
    pub(super) fn log_line(&self, color: &str, prefix: &str, text: &str) {
        let line = if color.is_empty() {
            format!("{text}\n")
        } else {
            format!("{color}{prefix}{text}{ANSI_RESET}\n")
        };
        lock(&self.log).append(line.as_bytes());
    }

    pub(super) fn log_warning(&self, text: &str) {
        self.log_line(ANSI_YELLOW, "WARNING: ", text);
    }

    pub(super) fn log_error(&self, text: &str) {
        self.log_line(ANSI_BOLD_RED, "ERROR: ", text);
    }

    pub(super) fn log_sink(&self) -> Sink {
        let log = self.log.clone();
        Arc::new(move |chunk| lock(&log).append(chunk))
    }

    pub(super) fn log_final(&self, outcome: &Result<(), Failure>) {
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
}

/// `GetStageDescription` (`common/build.go`).
pub(super) fn stage_description(sub: &SubStage) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_go() {
        assert_eq!(go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(go_duration(Duration::from_secs(300)), "5m0s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }
}
