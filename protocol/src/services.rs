use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// One element of `CUSTOM_ENV_CI_JOB_SERVICES` (§3.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Image name, variable-expanded.
    pub name: String,
    /// The first alias, or empty.
    #[serde(default)]
    pub alias: String,
    /// `null` when unset.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `null` when unset.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Service variables (since v19.0; absent before and when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variables: Vec<ServiceVariable>,
}

/// A `{key, value}` pair of [`Service::variables`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceVariable {
    /// Name.
    pub key: String,
    /// Value, already expanded by the runner.
    #[serde(default)]
    pub value: String,
}

impl Service {
    /// Parses the variable's value: the empty string means "no services" (§3.4).
    pub fn parse_list(value: &str) -> Result<Vec<Service>, ProtocolError> {
        if value.trim().is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str::<Option<Vec<Service>>>(value)
            .map(Option::unwrap_or_default)
            .map_err(ProtocolError::MalformedServices)
    }
}
