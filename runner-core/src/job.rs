use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use drover_protocol::{JobEnv, JobResponse, TrustedIdentity};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::naming::ResourceNames;
use crate::policy::{Policy, Resources};
use crate::{Error, Result};

/// The longest job timeout taken from the payload: a year. GitLab's longest is a month; a
/// larger number (the payload is only as trusted as the runner that wrote it) must not
/// overflow a clock.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Everything a driver knows about the job in one stage: the runner's environment, the trusted
/// payload, resource names, the operator's policy and the stage's cancellation.
#[derive(Debug)]
pub struct Job {
    env: JobEnv,
    response: JobResponse,
    names: ResourceNames,
    policy: Policy,
    cancel: CancellationToken,
    gc_grace: Duration,
    started: Instant,
}

impl Job {
    /// Reads the job from the runner's environment (`env`, a snapshot of the process
    /// environment) and the `JOB_RESPONSE_FILE` it names.
    pub(crate) async fn load(
        env: &BTreeMap<String, String>,
        runner_name: &str,
        policy: Policy,
        gc_grace: Duration,
        cancel: CancellationToken,
    ) -> Result<Job> {
        let env = JobEnv::from_map(env)?;
        let path = &env.control.job_response_file;
        let bytes = tokio::fs::read(path).await.map_err(|err| {
            Error::system(format!(
                "cannot read JOB_RESPONSE_FILE {}: {err}",
                path.display()
            ))
        })?;
        let response = JobResponse::parse(&bytes)?;
        // The concurrency slot is user-influenced (§3.4); it only labels resources.
        let slot = env
            .variable("CI_CONCURRENT_ID")
            .and_then(|slot| slot.parse().ok())
            .unwrap_or(0);
        let names = ResourceNames::new(runner_name, response.trusted_identity(), slot);
        Ok(Job {
            env,
            response,
            names,
            policy,
            cancel,
            gc_grace,
            started: Instant::now(),
        })
    }

    /// The runner's environment: control variables, job variables, services.
    pub fn env(&self) -> &JobEnv {
        &self.env
    }

    /// The job payload from `JOB_RESPONSE_FILE`.
    pub fn response(&self) -> &JobResponse {
        &self.response
    }

    /// The job's identity, from the part of the payload a job cannot change.
    pub fn identity(&self) -> TrustedIdentity {
        self.response.trusted_identity()
    }

    /// Deterministic names for this job's resources.
    pub fn names(&self) -> &ResourceNames {
        &self.names
    }

    /// Labels for a resource created now; `gc` may remove it after the job's timeout plus the
    /// operator's grace.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.names.labels(self.timeout(), self.gc_grace)
    }

    /// The image, CPUs, memory and mounts the job gets under the operator's policy; an error
    /// names the setting that refused the request.
    pub fn resources(&self) -> Result<Resources> {
        self.policy.resolve(&self.env)
    }

    /// The operator's policy, e.g. for the limits of containers beside the job's own.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The job timeout GitLab set (§4.2), at most a year (see `MAX_TIMEOUT`).
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.response.runner_info.effective_timeout_secs()).min(MAX_TIMEOUT)
    }

    /// A bound for retries in this stage: no stage outlives the job's timeout.
    pub fn deadline(&self) -> Instant {
        self.started + self.timeout()
    }

    /// The runner's per-attempt scratch directory (`TMPDIR`, the working directory, §1.1).
    pub fn tmpdir(&self) -> Option<&Path> {
        self.env.control.tmpdir.as_deref()
    }

    /// Cancelled when the runner sends SIGTERM (§6). Pass it to every wait.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the stage has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}
