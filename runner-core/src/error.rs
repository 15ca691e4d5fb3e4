use std::fmt;

use drover_protocol::{Outcome, ProtocolError};

/// Who is to blame for a failed stage, which decides the exit code GitLab Runner sees (§4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The job's own fault (a script failure): `BUILD_FAILURE_EXIT_CODE`. Not retried by the
    /// runner, and shown as `script_failure`.
    Build,
    /// The infrastructure's fault: `SYSTEM_FAILURE_EXIT_CODE`, shown as
    /// `runner_system_failure`; prepare is retried (§5.1).
    System,
}

/// A driver or core failure. It carries its [`ErrorClass`], so the core alone turns it into an
/// exit code, and whether it is transient, so [`crate::retry`] knows what to try again.
///
/// The message is the one line an operator reads in the job log: say what failed and what to
/// fix, e.g. `podman socket /run/podman/podman.sock: connection refused; is the service running?`.
#[derive(Debug)]
pub struct Error {
    class: ErrorClass,
    transient: bool,
    message: String,
}

impl Error {
    /// An infrastructure failure.
    pub fn system(message: impl fmt::Display) -> Error {
        Error {
            class: ErrorClass::System,
            transient: false,
            message: message.to_string(),
        }
    }

    /// A failure of the job's own making that the runner should report as `script_failure`.
    /// Policy refusals are not this: they are system failures (the operator's settings decide
    /// them, and GitLab's own executors report a refused image that way, §1.1).
    pub fn build(message: impl fmt::Display) -> Error {
        Error {
            class: ErrorClass::Build,
            transient: false,
            message: message.to_string(),
        }
    }

    /// An infrastructure failure that may go away if tried again (a busy daemon, a timeout).
    pub fn transient(message: impl fmt::Display) -> Error {
        Error {
            class: ErrorClass::System,
            transient: true,
            message: message.to_string(),
        }
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Error {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// Who is to blame.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The outcome this error gives the stage.
    pub fn outcome(&self) -> Outcome {
        match self.class {
            // A build error raised by a driver has no script exit status of its own; 1 is what
            // the runner reports when BUILD_EXIT_CODE_FILE is absent (§4.5).
            ErrorClass::Build => Outcome::BuildFailure { exit_code: 1 },
            ErrorClass::System => Outcome::SystemFailure,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, whatever the source said: the job log shows each line separately.
        let mut lines = self
            .message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty());
        if let Some(first) = lines.next() {
            f.write_str(first)?;
        }
        for line in lines {
            write!(f, "; {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<ProtocolError> for Error {
    fn from(err: ProtocolError) -> Error {
        Error::system(err)
    }
}

/// Shorthand for driver results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to any error, turning it into a system [`Error`].
pub trait ResultExt<T> {
    /// Wraps the error as a system failure, prefixed by `what`.
    fn or_system(self, what: impl fmt::Display) -> Result<T>;
    /// Wraps the error as a transient system failure, prefixed by `what`.
    fn or_transient(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: fmt::Display> ResultExt<T> for std::result::Result<T, E> {
    fn or_system(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|err| Error::system(format!("{what}: {err}")))
    }

    fn or_transient(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|err| Error::transient(format!("{what}: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_line_message_is_shown_on_one_line() {
        let err = Error::system("first\n\n  second  \nthird");
        assert_eq!(err.to_string(), "first; second; third");
    }

    #[test]
    fn classes_map_to_outcomes() {
        assert_eq!(Error::system("x").outcome(), Outcome::SystemFailure);
        assert_eq!(Error::transient("x").outcome(), Outcome::SystemFailure);
        assert_eq!(
            Error::build("x").outcome(),
            Outcome::BuildFailure { exit_code: 1 }
        );
        assert!(Error::transient("x").is_transient());
        assert!(!Error::system("x").context("while").is_transient());
    }
}
