use crate::ControlVariables;

/// How a stage ended, as the runner must learn it (§1.1, §4.4).
///
/// This is the only place where an outcome becomes a process exit code, so no driver can pass
/// a raw status through (§10 item 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The stage did what it should. Exit 0.
    Success,
    /// The job's script ran and exited non-zero. Exit `BUILD_FAILURE_EXIT_CODE`; the real code
    /// goes to `BUILD_EXIT_CODE_FILE` (§4.5).
    BuildFailure {
        /// The script's own exit status.
        exit_code: i32,
    },
    /// The infrastructure failed. Exit `SYSTEM_FAILURE_EXIT_CODE`.
    SystemFailure,
}

impl Outcome {
    /// The driver's exit status for this outcome. Without control variables (a driver started
    /// by hand) the runner's constants 1 and 2 apply.
    pub fn process_exit_code(&self, control: Option<&ControlVariables>) -> u8 {
        let (build, system) = control
            .map(|c| (c.build_failure_exit_code, c.system_failure_exit_code))
            .unwrap_or((1, 2));
        let code = match self {
            Outcome::Success => 0,
            Outcome::BuildFailure { .. } => build,
            Outcome::SystemFailure => system,
        };
        u8::try_from(code).unwrap_or(2)
    }

    /// What to write to `BUILD_EXIT_CODE_FILE`, if anything (§4.5): the bare integer with no
    /// whitespace, because the runner applies `Atoi` to the first line without trimming and a
    /// stray space turns a script failure into a system failure. `None` means the file must
    /// not exist, so a later stage never picks up a stale code.
    pub fn build_exit_code_file_contents(&self) -> Option<String> {
        match self {
            Outcome::BuildFailure { exit_code } => Some(exit_code.to_string()),
            Outcome::Success | Outcome::SystemFailure => None,
        }
    }

    /// The outcome of a script that exited with `status` (0 or not).
    pub fn from_script_status(status: i32) -> Outcome {
        if status == 0 {
            Outcome::Success
        } else {
            Outcome::BuildFailure { exit_code: status }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_exiting_2_is_a_build_failure_not_a_system_failure() {
        let outcome = Outcome::from_script_status(2);
        assert_eq!(outcome.process_exit_code(None), 1);
        assert_eq!(
            outcome.build_exit_code_file_contents().as_deref(),
            Some("2")
        );
    }

    #[test]
    fn exit_codes_are_only_0_1_and_2() {
        for status in [0, 1, 2, 3, 127, 255, -1] {
            let code = Outcome::from_script_status(status).process_exit_code(None);
            assert!(code <= 1, "{status} -> {code}");
        }
        assert_eq!(Outcome::SystemFailure.process_exit_code(None), 2);
    }

    #[test]
    fn success_and_system_failure_leave_no_build_exit_code() {
        assert_eq!(Outcome::Success.build_exit_code_file_contents(), None);
        assert_eq!(Outcome::SystemFailure.build_exit_code_file_contents(), None);
    }
}
