use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use crate::ProtocolError;

/// One invocation of a driver executable (§1): which of the four `*_exec` settings started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// `config_exec`: print the job's configuration as one JSON value (§1.2, §2).
    Config,
    /// `prepare_exec`: create the job's environment (§1.3).
    Prepare,
    /// `run_exec`: run one generated script in the environment (§1.4).
    Run {
        /// Absolute path of the script on the runner host (`<tempdir>/scriptNNN/script`).
        script: PathBuf,
        /// Which part of the job the script is.
        sub_stage: SubStage,
    },
    /// `cleanup_exec`: remove whatever prepare made; may run without prepare (§1.5).
    Cleanup,
}

impl Stage {
    /// The stage's name as the runner's settings spell it.
    pub fn name(&self) -> &str {
        match self {
            Stage::Config => "config",
            Stage::Prepare => "prepare",
            Stage::Run { .. } => "run",
            Stage::Cleanup => "cleanup",
        }
    }

    /// Reads the script path and sub-stage of a `run` call from the arguments that followed the
    /// word `run`. GitLab Runner appends them after the operator's `run_args`, so only the **last
    /// two** arguments count, whatever precedes them (§1.4, §10 item 3).
    pub fn run_from_trailing_args(args: &[OsString]) -> Result<Stage, ProtocolError> {
        let [.., script, stage] = args else {
            return Err(ProtocolError::BadArguments(format!(
                "run needs the script path and the stage name as its last two arguments, got {} argument(s)",
                args.len()
            )));
        };
        let sub_stage = stage.to_str().ok_or_else(|| {
            ProtocolError::BadArguments(format!("the stage name {stage:?} is not UTF-8"))
        })?;
        if sub_stage.is_empty() {
            return Err(ProtocolError::BadArguments(
                "the stage name is empty".into(),
            ));
        }
        Ok(Stage::Run {
            script: PathBuf::from(script),
            sub_stage: SubStage::from(sub_stage),
        })
    }
}

/// A run sub-stage: the second of the two arguments GitLab Runner appends to `run_args` (§4.1).
///
/// Names the runner adds in later versions are valid and kept as [`SubStage::Other`], so a
/// driver runs them like any other script (§10 item 11).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubStage {
    /// `prepare_script`: the banner and removal of stale dotenv files; always first.
    PrepareScript,
    /// `get_sources`: clone or fetch the repository.
    GetSources,
    /// `clear_worktree`: only before a second get_sources attempt (since v16.9, undocumented).
    ClearWorktree,
    /// `restore_cache`: only when the job has cache paths.
    RestoreCache,
    /// `download_artifacts`: only when a dependency has artifacts.
    DownloadArtifacts,
    /// `build_script`: the job's `script` (the runner renames `step_script` to this).
    BuildScript,
    /// `step_<name>`: any other user step, e.g. `step_release`.
    Step(String),
    /// `after_script`: runs after the user steps whatever their result.
    AfterScript,
    /// `archive_cache`: after the user steps succeeded.
    ArchiveCache,
    /// `archive_cache_on_failure`: after the user steps failed.
    ArchiveCacheOnFailure,
    /// `upload_artifacts_on_success`.
    UploadArtifactsOnSuccess,
    /// `upload_artifacts_on_failure`.
    UploadArtifactsOnFailure,
    /// `cleanup_file_variables`: always last once prepare_script passed.
    CleanupFileVariables,
    /// A name this version of the contract does not know. Valid: run it generically.
    Other(String),
}

impl SubStage {
    /// The name exactly as it appears on the command line.
    pub fn name(&self) -> &str {
        match self {
            SubStage::PrepareScript => "prepare_script",
            SubStage::GetSources => "get_sources",
            SubStage::ClearWorktree => "clear_worktree",
            SubStage::RestoreCache => "restore_cache",
            SubStage::DownloadArtifacts => "download_artifacts",
            SubStage::BuildScript => "build_script",
            SubStage::Step(name) | SubStage::Other(name) => name,
            SubStage::AfterScript => "after_script",
            SubStage::ArchiveCache => "archive_cache",
            SubStage::ArchiveCacheOnFailure => "archive_cache_on_failure",
            SubStage::UploadArtifactsOnSuccess => "upload_artifacts_on_success",
            SubStage::UploadArtifactsOnFailure => "upload_artifacts_on_failure",
            SubStage::CleanupFileVariables => "cleanup_file_variables",
        }
    }

    /// Whether this sub-stage runs the user's own commands (`script`, other steps,
    /// `after_script`), as opposed to the runner's predefined ones.
    pub fn is_user_script(&self) -> bool {
        matches!(
            self,
            SubStage::BuildScript | SubStage::Step(_) | SubStage::AfterScript
        )
    }

    /// Whether the runner treats this sub-stage as "predefined" (§4.1, `getPredefinedEnv`): the
    /// git, cache and artifact work that needs `git` and `gitlab-runner` rather than the user's
    /// image. The docker executor runs exactly these in its helper container.
    pub fn is_predefined(&self) -> bool {
        matches!(
            self,
            SubStage::PrepareScript
                | SubStage::GetSources
                | SubStage::ClearWorktree
                | SubStage::RestoreCache
                | SubStage::DownloadArtifacts
                | SubStage::ArchiveCache
                | SubStage::ArchiveCacheOnFailure
                | SubStage::UploadArtifactsOnSuccess
                | SubStage::UploadArtifactsOnFailure
                | SubStage::CleanupFileVariables
        )
    }
}

impl From<&str> for SubStage {
    fn from(name: &str) -> Self {
        match name {
            "prepare_script" => SubStage::PrepareScript,
            "get_sources" => SubStage::GetSources,
            "clear_worktree" => SubStage::ClearWorktree,
            "restore_cache" => SubStage::RestoreCache,
            "download_artifacts" => SubStage::DownloadArtifacts,
            // The runner renames step_script before calling run_exec (§1.4); accept both.
            "build_script" | "step_script" => SubStage::BuildScript,
            "after_script" => SubStage::AfterScript,
            "archive_cache" => SubStage::ArchiveCache,
            "archive_cache_on_failure" => SubStage::ArchiveCacheOnFailure,
            "upload_artifacts_on_success" => SubStage::UploadArtifactsOnSuccess,
            "upload_artifacts_on_failure" => SubStage::UploadArtifactsOnFailure,
            "cleanup_file_variables" => SubStage::CleanupFileVariables,
            step if step.starts_with("step_") => SubStage::Step(step.to_owned()),
            other => SubStage::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for SubStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn run_takes_the_last_two_arguments_whatever_run_args_precede_them() {
        let stage = Stage::run_from_trailing_args(&args(&[
            "--verbose",
            "extra",
            "/tmp/custom-executor1/script1/script",
            "build_script",
        ]))
        .expect("valid");
        assert_eq!(
            stage,
            Stage::Run {
                script: "/tmp/custom-executor1/script1/script".into(),
                sub_stage: SubStage::BuildScript
            }
        );
    }

    #[test]
    fn run_with_fewer_than_two_arguments_is_an_error() {
        let err = Stage::run_from_trailing_args(&args(&["script"])).expect_err("one argument");
        assert!(err.to_string().contains("last two arguments"), "{err}");
    }

    #[test]
    fn unknown_and_future_stage_names_are_valid() {
        for name in ["clear_worktree", "step_release", "some_future_stage"] {
            let stage = SubStage::from(name);
            assert_eq!(stage.name(), name);
        }
        assert_eq!(
            SubStage::from("step_release"),
            SubStage::Step("step_release".into())
        );
        assert_eq!(
            SubStage::from("some_future_stage"),
            SubStage::Other("some_future_stage".into())
        );
    }

    #[test]
    fn every_known_name_round_trips() {
        for name in [
            "prepare_script",
            "get_sources",
            "clear_worktree",
            "restore_cache",
            "download_artifacts",
            "build_script",
            "after_script",
            "archive_cache",
            "archive_cache_on_failure",
            "upload_artifacts_on_success",
            "upload_artifacts_on_failure",
            "cleanup_file_variables",
        ] {
            assert_eq!(SubStage::from(name).name(), name);
            assert!(
                !matches!(SubStage::from(name), SubStage::Other(_)),
                "{name}"
            );
        }
    }

    #[test]
    fn user_and_predefined_stages_are_disjoint() {
        for stage in ["build_script", "step_release", "after_script"] {
            assert!(SubStage::from(stage).is_user_script());
            assert!(!SubStage::from(stage).is_predefined());
        }
        assert!(SubStage::from("get_sources").is_predefined());
        assert!(!SubStage::from("step_x").is_predefined());
    }
}
