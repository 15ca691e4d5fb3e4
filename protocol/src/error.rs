use thiserror::Error;

/// Why a piece of the contract could not be read. Every variant names the variable, file or
/// argument at fault, because the message ends up as the one line an operator reads in the
/// job log.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A variable GitLab Runner always sets is absent: the driver was not started by a runner
    /// (or by one older than the feature).
    #[error("{name} is not set; is this executable being run by GitLab Runner's custom executor?")]
    MissingVariable {
        /// The variable's name.
        name: String,
    },
    /// A variable is present but its value cannot be used.
    #[error("{name}={value:?} is not valid: {reason}")]
    InvalidVariable {
        /// The variable's name.
        name: String,
        /// The offending value.
        value: String,
        /// What was expected instead.
        reason: String,
    },
    /// `JOB_RESPONSE_FILE` did not hold the job payload GitLab Runner writes (§3.1).
    #[error("JOB_RESPONSE_FILE is not a valid job payload: {0}")]
    MalformedJobResponse(#[source] serde_json::Error),
    /// `CUSTOM_ENV_CI_JOB_SERVICES` is neither empty nor a JSON array of services (§3.4).
    #[error("CUSTOM_ENV_CI_JOB_SERVICES is not a valid list of services: {0}")]
    MalformedServices(#[source] serde_json::Error),
    /// config_exec output that GitLab Runner would reject (§2).
    #[error("error while parsing JSON output: {0}")]
    MalformedConfigOutput(#[source] serde_json::Error),
    /// The command line does not name a stage the way GitLab Runner calls drivers (§1.4).
    #[error("{0}")]
    BadArguments(String),
}
