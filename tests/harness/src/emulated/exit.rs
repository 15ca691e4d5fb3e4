//! How the runner classifies what went wrong: a call's exit becomes a build or system failure
//! (`command.go`, §1.1, §4.5), and the job's failure becomes the result GitLab records.

use std::borrow::Cow;
use std::fmt;

use crate::process::CallExit;

use super::{Emulator, JobResult};

/// Why a stage or the job failed, as the runner classifies errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
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

/// The result GitLab records for how the job ended.
pub(super) fn job_result(outcome: Result<(), Failure>) -> JobResult {
    match outcome {
        Ok(()) => JobResult::Success,
        Err(Failure::Build { exit_code, .. }) => JobResult::ScriptFailure { exit_code },
        Err(Failure::Config(_)) => JobResult::ScriptFailure { exit_code: 0 },
        Err(Failure::System(reason)) => JobResult::RunnerSystemFailure { reason },
        Err(Failure::Canceled) => JobResult::Canceled,
        Err(Failure::TimedOut) => JobResult::TimedOut,
    }
}

impl Emulator<'_> {
    /// The exit-code mapping of `command.go` (§1.1, §4.5).
    pub(super) fn exit_failure(&self, exit: &CallExit) -> Result<(), Failure> {
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
}
