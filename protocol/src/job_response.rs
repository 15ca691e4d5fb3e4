use serde::{Deserialize, Deserializer, Serialize};

use crate::ProtocolError;

/// The job payload in `JOB_RESPONSE_FILE` (§3.1), written by the runner before config_exec.
///
/// Only the fields drivers and the project's harnesses use are typed; the runner writes more,
/// and they are ignored. The top-level fields come from GitLab and **cannot** be changed by a
/// job variable, unlike `CUSTOM_ENV_*` (§3.4); [`JobResponse::trusted_identity`] reads identity
/// from them alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobResponse {
    /// The job id, unique within the GitLab instance.
    pub id: u64,
    /// The job token: a secret. Never log it.
    #[serde(default)]
    pub token: String,
    /// Whether the runner may fetch into an existing checkout.
    #[serde(default)]
    pub allow_git_fetch: bool,
    /// Job name, stage and project.
    pub job_info: JobInfo,
    /// Repository to check out.
    #[serde(default)]
    pub git_info: GitInfo,
    /// Limits GitLab sets for the job.
    #[serde(default)]
    pub runner_info: RunnerInfo,
    /// All job variables, predefined and the user's (user-influenced, like `CUSTOM_ENV_*`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub variables: Vec<JobVariable>,
    /// User steps (`script`, `after_script`, `release`...).
    #[serde(default, deserialize_with = "null_as_default")]
    pub steps: Vec<JobStep>,
    /// The job's `image:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// The job's `services:`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub services: Vec<Image>,
    /// Everything else the runner wrote, kept so a payload survives a round trip.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `job_info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The job's name in `.gitlab-ci.yml`.
    #[serde(default)]
    pub name: String,
    /// The job's stage.
    #[serde(default)]
    pub stage: String,
    /// The project's numeric id.
    pub project_id: u64,
    /// The project's name.
    #[serde(default)]
    pub project_name: String,
}

/// `git_info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitInfo {
    /// Clone URL; its path decides the project directory (§9.4).
    #[serde(default)]
    pub repo_url: String,
    /// Branch or tag.
    #[serde(default, rename = "ref")]
    pub git_ref: String,
    /// Commit to check out.
    #[serde(default)]
    pub sha: String,
    /// Previous commit.
    #[serde(default)]
    pub before_sha: String,
    /// `branch` or `tag`.
    #[serde(default)]
    pub ref_type: String,
    /// Refspecs to fetch.
    #[serde(default, deserialize_with = "null_as_default")]
    pub refspecs: Vec<String>,
    /// Shallow clone depth; 0 for full.
    #[serde(default)]
    pub depth: u32,
}

/// `runner_info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerInfo {
    /// Job timeout in seconds; ≤ 0 means the runner's default of 7200 (§4.2).
    #[serde(default)]
    pub timeout: i64,
}

impl RunnerInfo {
    /// The job timeout the runner applies, in seconds (§4.2).
    pub fn effective_timeout_secs(&self) -> u64 {
        u64::try_from(self.timeout)
            .ok()
            .filter(|t| *t > 0)
            .unwrap_or(7200)
    }
}

/// One element of `variables`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobVariable {
    /// Name.
    pub key: String,
    /// Value (the file's content for file variables).
    #[serde(default)]
    pub value: String,
    /// Whether the value may be shown.
    #[serde(default)]
    pub public: bool,
    /// A file-type variable.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub file: bool,
    /// Masked in the job log.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub masked: bool,
    /// Not variable-expanded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw: bool,
}

/// One element of `steps`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStep {
    /// `script`, `after_script`, or another step name.
    pub name: String,
    /// The commands.
    #[serde(default, deserialize_with = "null_as_default")]
    pub script: Vec<String>,
    /// Seconds.
    #[serde(default)]
    pub timeout: i64,
    /// `on_success`, `on_failure` or `always`.
    #[serde(default)]
    pub when: String,
    /// Whether a failure of this step fails the job.
    #[serde(default)]
    pub allow_failure: bool,
}

/// `image` and each element of `services`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Image reference.
    pub name: String,
    /// Service alias.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alias: String,
    /// Entrypoint override.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub entrypoint: Vec<String>,
    /// Command override.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub command: Vec<String>,
}

/// Go encodes an empty slice as `null` (the runner's payload is Go's `json.Encode`, §3.1).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Who a job is, from the part of the payload a job cannot change (§3.4, §10 item 12). Name
/// resources after this, never after `CUSTOM_ENV_CI_JOB_ID` and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TrustedIdentity {
    /// `id`.
    pub job_id: u64,
    /// `job_info.project_id`.
    pub project_id: u64,
}

impl JobResponse {
    /// Parses the file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<JobResponse, ProtocolError> {
        serde_json::from_slice(bytes).map_err(ProtocolError::MalformedJobResponse)
    }

    /// The job's identity, from GitLab-set fields only.
    pub fn trusted_identity(&self) -> TrustedIdentity {
        TrustedIdentity {
            job_id: self.id,
            project_id: self.job_info.project_id,
        }
    }

    /// The value of a job variable as GitLab sent it; the last occurrence wins, as in the
    /// runner's own lookup.
    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables
            .iter()
            .rev()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_job_id_is_an_error_that_names_the_field() {
        let err = JobResponse::parse(br#"{"job_info":{"project_id":1}}"#).expect_err("no id");
        assert!(err.to_string().contains("missing field `id`"), "{err}");
    }

    #[test]
    fn a_job_timeout_of_zero_means_the_default() {
        assert_eq!(RunnerInfo { timeout: 0 }.effective_timeout_secs(), 7200);
        assert_eq!(RunnerInfo { timeout: 30 }.effective_timeout_secs(), 30);
    }
}
