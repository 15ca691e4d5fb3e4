use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::{ProtocolError, Service};

/// Exit code the driver uses for a build (script) failure; always `1` (§1.1).
pub const BUILD_FAILURE_EXIT_CODE: &str = "BUILD_FAILURE_EXIT_CODE";
/// Exit code the driver uses for a system failure; always `2` (§1.1).
pub const SYSTEM_FAILURE_EXIT_CODE: &str = "SYSTEM_FAILURE_EXIT_CODE";
/// Path of the job payload as the runner re-encodes it (§3.1).
pub const JOB_RESPONSE_FILE: &str = "JOB_RESPONSE_FILE";
/// Path where the driver may write the script's real exit code (§4.5, since v17.9.0).
pub const BUILD_EXIT_CODE_FILE: &str = "BUILD_EXIT_CODE_FILE";
/// The per-job temp dir, also the driver's working directory (§1.1).
pub const TMPDIR: &str = "TMPDIR";
/// Prefix of every job variable in the driver's environment (§3.4).
pub const CUSTOM_ENV_PREFIX: &str = "CUSTOM_ENV_";

/// The five unprefixed control variables every call gets (§3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlVariables {
    /// Value of `BUILD_FAILURE_EXIT_CODE` (1 in every runner version).
    pub build_failure_exit_code: i32,
    /// Value of `SYSTEM_FAILURE_EXIT_CODE` (2 in every runner version).
    pub system_failure_exit_code: i32,
    /// `JOB_RESPONSE_FILE`.
    pub job_response_file: PathBuf,
    /// `BUILD_EXIT_CODE_FILE`; absent before runner v17.9.0.
    pub build_exit_code_file: Option<PathBuf>,
    /// `TMPDIR`, the per-attempt scratch directory.
    pub tmpdir: Option<PathBuf>,
}

/// Everything a driver learns from its environment, read from a map so it can be tested without
/// touching the process environment.
///
/// Job variables (`CUSTOM_ENV_*`) are user input: a job can override even the predefined ones
/// (§3.4). Use them for what the job asks for (image, services), never for identity; that comes
/// from [`crate::JobResponse`].
#[derive(Debug, Clone)]
pub struct JobEnv {
    /// The control variables.
    pub control: ControlVariables,
    /// Job variables with the `CUSTOM_ENV_` prefix removed.
    pub variables: BTreeMap<String, String>,
    /// Services the job asked for (`CUSTOM_ENV_CI_JOB_SERVICES`); empty when none.
    pub services: Vec<Service>,
}

impl JobEnv {
    /// Reads the driver's environment. Fails, naming the variable, when a control variable is
    /// missing or malformed or `CI_JOB_SERVICES` is not valid JSON.
    pub fn from_map(env: &BTreeMap<String, String>) -> Result<JobEnv, ProtocolError> {
        let control = ControlVariables {
            build_failure_exit_code: exit_code(env, BUILD_FAILURE_EXIT_CODE)?,
            system_failure_exit_code: exit_code(env, SYSTEM_FAILURE_EXIT_CODE)?,
            job_response_file: PathBuf::from(required(env, JOB_RESPONSE_FILE)?),
            build_exit_code_file: optional_path(env, BUILD_EXIT_CODE_FILE),
            tmpdir: optional_path(env, TMPDIR),
        };
        let variables: BTreeMap<String, String> = env
            .iter()
            .filter_map(|(key, value)| {
                key.strip_prefix(CUSTOM_ENV_PREFIX)
                    .map(|key| (key.to_owned(), value.clone()))
            })
            .collect();
        let services = Service::parse_list(
            variables
                .get("CI_JOB_SERVICES")
                .map(String::as_str)
                .unwrap_or_default(),
        )?;
        Ok(JobEnv {
            control,
            variables,
            services,
        })
    }

    /// A job variable by its GitLab name (without the prefix).
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables.get(key).map(String::as_str)
    }

    /// The image the job asked for (`image:`), if any. User input: check it against an
    /// allow-list before use (§10 item 12).
    pub fn requested_image(&self) -> Option<&str> {
        self.variable("CI_JOB_IMAGE")
            .filter(|image| !image.is_empty())
    }
}

fn required<'a>(env: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, ProtocolError> {
    match env.get(name) {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(ProtocolError::MissingVariable { name: name.into() }),
    }
}

fn optional_path(env: &BTreeMap<String, String>, name: &str) -> Option<PathBuf> {
    env.get(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn exit_code(env: &BTreeMap<String, String>, name: &str) -> Result<i32, ProtocolError> {
    let value = required(env, name)?;
    value
        .parse::<i32>()
        .ok()
        .filter(|code| (1..=255).contains(code))
        .ok_or_else(|| ProtocolError::InvalidVariable {
            name: name.into(),
            value: value.into(),
            reason: "expected an exit code from 1 to 255".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner_env() -> BTreeMap<String, String> {
        BTreeMap::from(
            [
                ("BUILD_FAILURE_EXIT_CODE", "1"),
                ("SYSTEM_FAILURE_EXIT_CODE", "2"),
                ("JOB_RESPONSE_FILE", "/tmp/custom-executor1/response.json"),
                (
                    "BUILD_EXIT_CODE_FILE",
                    "/tmp/custom-executor1/build_exit_code",
                ),
                ("TMPDIR", "/tmp/custom-executor1"),
                ("CUSTOM_ENV_CI_JOB_IMAGE", "debian:12"),
                ("CUSTOM_ENV_CI_JOB_SERVICES", ""),
                ("PATH", "/usr/bin"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
    }

    #[test]
    fn reads_control_and_job_variables() {
        let env = JobEnv::from_map(&runner_env()).expect("valid");
        assert_eq!(env.control.build_failure_exit_code, 1);
        assert_eq!(env.control.system_failure_exit_code, 2);
        assert_eq!(
            env.control.build_exit_code_file.as_deref(),
            Some(std::path::Path::new(
                "/tmp/custom-executor1/build_exit_code"
            ))
        );
        assert_eq!(env.requested_image(), Some("debian:12"));
        assert!(env.services.is_empty());
        assert_eq!(
            env.variable("PATH"),
            None,
            "unprefixed runner env is not a job variable"
        );
    }

    #[test]
    fn a_missing_control_variable_is_named() {
        let mut env = runner_env();
        env.remove("JOB_RESPONSE_FILE");
        let err = JobEnv::from_map(&env).expect_err("missing");
        assert!(
            err.to_string().starts_with("JOB_RESPONSE_FILE is not set"),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_exit_code_is_named_with_its_value() {
        let mut env = runner_env();
        env.insert("SYSTEM_FAILURE_EXIT_CODE".into(), "two".into());
        let err = JobEnv::from_map(&env).expect_err("malformed");
        assert_eq!(
            err.to_string(),
            "SYSTEM_FAILURE_EXIT_CODE=\"two\" is not valid: expected an exit code from 1 to 255"
        );
    }

    #[test]
    fn build_exit_code_file_is_optional_for_runners_before_17_9() {
        let mut env = runner_env();
        env.remove("BUILD_EXIT_CODE_FILE");
        assert_eq!(
            JobEnv::from_map(&env)
                .expect("valid")
                .control
                .build_exit_code_file,
            None
        );
    }

    #[test]
    fn malformed_services_are_named() {
        let mut env = runner_env();
        env.insert("CUSTOM_ENV_CI_JOB_SERVICES".into(), "[{".into());
        let err = JobEnv::from_map(&env).expect_err("malformed");
        assert!(
            err.to_string().starts_with("CUSTOM_ENV_CI_JOB_SERVICES"),
            "{err}"
        );
    }
}
