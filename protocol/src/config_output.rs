use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// What config_exec prints on stdout (§2). Every field is optional: an absent field leaves the
/// runner's setting as it is.
///
/// The runner hands **all** of stdout to one `json.Unmarshal`, so anything but exactly one JSON
/// value fails the attempt; [`ConfigOutput::to_json`] produces exactly that.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigOutput {
    /// Path inside the job environment under which project directories are made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builds_dir: Option<String>,
    /// Path inside the job environment where the local cache lives (§8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<String>,
    /// Whether the builds dir is shared between concurrent jobs (§2, §10 item 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builds_dir_is_shared: Option<bool>,
    /// Shown in the `Running on ... via <hostname>` banner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Shown in `Using Custom executor with driver NAME VERSION...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<DriverInfo>,
    /// Unprefixed variables for the later driver calls of this attempt (§3.2). Not given to the
    /// job's scripts and not masked: never put a secret here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_env: Option<BTreeMap<String, String>>,
    /// Shell the runner generates scripts for: `bash`, `sh`, `pwsh` or `powershell`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
}

/// The `driver` object of [`ConfigOutput`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverInfo {
    /// Driver name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Driver version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl ConfigOutput {
    /// Serializes to exactly one JSON value on one line, newline-terminated. A trailing newline
    /// is whitespace around the value and therefore accepted (§2).
    pub fn to_json(&self) -> String {
        let mut json = serde_json::to_string(self).expect("string maps always serialize");
        json.push('\n');
        json
    }

    /// Parses config_exec stdout the way GitLab Runner does (§2): zero bytes mean "no
    /// configuration"; otherwise the whole buffer must be exactly one JSON object, so a lone
    /// newline, log lines or a second value are errors.
    pub fn parse_stdout(stdout: &[u8]) -> Result<Option<ConfigOutput>, ProtocolError> {
        if stdout.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(stdout)
            .map(Some)
            .map_err(ProtocolError::MalformedConfigOutput)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_stdout_means_no_configuration() {
        assert_eq!(
            ConfigOutput::parse_stdout(b"").expect("empty is fine"),
            None
        );
    }

    #[test]
    fn a_lone_newline_is_not_empty() {
        let err = ConfigOutput::parse_stdout(b"\n").expect_err("runner rejects it");
        assert!(err.to_string().contains("EOF"), "{err}");
    }

    #[test]
    fn a_log_line_before_the_json_fails() {
        assert!(ConfigOutput::parse_stdout(b"starting\n{}").is_err());
        assert!(ConfigOutput::parse_stdout(b"{} {}").is_err());
    }

    #[test]
    fn wrong_types_fail_and_unknown_keys_are_ignored() {
        assert!(ConfigOutput::parse_stdout(br#"{"builds_dir_is_shared":"true"}"#).is_err());
        let parsed = ConfigOutput::parse_stdout(br#" {"future_key": 1, "hostname": "h"} "#)
            .expect("valid")
            .expect("present");
        assert_eq!(parsed.hostname.as_deref(), Some("h"));
    }

    #[test]
    fn to_json_is_one_value_that_parses_back() {
        let output = ConfigOutput {
            builds_dir: Some("/builds".into()),
            job_env: Some(BTreeMap::from([("A".into(), "b\nc".into())])),
            ..ConfigOutput::default()
        };
        let json = output.to_json();
        assert_eq!(json.lines().count(), 1);
        assert_eq!(
            ConfigOutput::parse_stdout(json.as_bytes()).expect("valid"),
            Some(output)
        );
    }
}
