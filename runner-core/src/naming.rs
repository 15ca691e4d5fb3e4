//! Deterministic names and labels for backend resources.
//!
//! `prepare`, `run`, `cleanup` and `gc` are separate processes, and the runner may never call
//! cleanup at all (a crash, §6.3). So every resource is named from the job's **trusted**
//! identity (from `JOB_RESPONSE_FILE`, never `CUSTOM_ENV_CI_JOB_ID`, §3.4), and carries labels
//! that let `gc` find it and decide whether it has expired.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_protocol::TrustedIdentity;

/// Label: the operator's `runner_name`.
pub const LABEL_RUNNER: &str = "drover.runner";
/// Label: the project id.
pub const LABEL_PROJECT: &str = "drover.project";
/// Label: the job id.
pub const LABEL_JOB: &str = "drover.job";
/// Label: the concurrency slot (`CI_CONCURRENT_ID`; informational, a job can change it).
pub const LABEL_SLOT: &str = "drover.slot";
/// Label: Unix time after which `gc` may remove the resource.
pub const LABEL_EXPIRES: &str = "drover.expires";

/// Names and labels for one job's resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceNames {
    runner: String,
    identity: TrustedIdentity,
    slot: u32,
}

impl ResourceNames {
    /// Names for `identity` on runner `runner` (already validated: letters, digits, `-`).
    /// `slot` is the concurrency slot; it only goes into labels and slot-scoped names.
    pub fn new(runner: &str, identity: TrustedIdentity, slot: u32) -> ResourceNames {
        ResourceNames {
            runner: runner.to_owned(),
            identity,
            slot,
        }
    }

    /// The job's resource name, e.g. `drover-ci1-p42-j1001`: valid as a container, instance,
    /// domain or directory name, and the same in every stage of the job.
    pub fn job(&self) -> String {
        format!(
            "drover-{}-p{}-j{}",
            self.runner, self.identity.project_id, self.identity.job_id
        )
    }

    /// A name for something the job owns, e.g. `job_scoped("net")` → `drover-ci1-p42-j1001-net`.
    pub fn job_scoped(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.job())
    }

    /// A name for something the job's project keeps across jobs, e.g.
    /// `project_scoped("cache")` → `drover-ci1-p42-cache`. `gc` leaves it alone: it has no
    /// job label.
    pub fn project_scoped(&self, suffix: &str) -> String {
        format!(
            "drover-{}-p{}-{suffix}",
            self.runner, self.identity.project_id
        )
    }

    /// The prefix shared by every resource of this runner, for `gc`.
    pub fn runner_prefix(runner: &str) -> String {
        format!("drover-{runner}-")
    }

    /// The operator's `runner_name`.
    pub fn runner(&self) -> &str {
        &self.runner
    }

    /// The trusted identity.
    pub fn identity(&self) -> TrustedIdentity {
        self.identity
    }

    /// Labels for a resource created now for a job that may run for `job_timeout`; `gc` may
    /// remove it once `job_timeout + grace` has passed.
    pub fn labels(&self, job_timeout: Duration, grace: Duration) -> BTreeMap<String, String> {
        let expires = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(job_timeout)
            .saturating_add(grace)
            .as_secs();
        BTreeMap::from([
            (LABEL_RUNNER.to_owned(), self.runner.clone()),
            (
                LABEL_PROJECT.to_owned(),
                self.identity.project_id.to_string(),
            ),
            (LABEL_JOB.to_owned(), self.identity.job_id.to_string()),
            (LABEL_SLOT.to_owned(), self.slot.to_string()),
            (LABEL_EXPIRES.to_owned(), expires.to_string()),
        ])
    }
}

/// Whether a resource with these labels belongs to `runner` and has expired at `now`.
/// Resources without a readable expiry are left alone: gc never guesses.
pub fn is_expired(labels: &BTreeMap<String, String>, runner: &str, now: SystemTime) -> bool {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    labels.get(LABEL_RUNNER).map(String::as_str) == Some(runner)
        && labels
            .get(LABEL_EXPIRES)
            .and_then(|e| e.parse::<u64>().ok())
            .is_some_and(|expires| expires <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: TrustedIdentity = TrustedIdentity {
        job_id: 1001,
        project_id: 42,
    };

    #[test]
    fn names_come_from_the_trusted_identity() {
        let names = ResourceNames::new("ci1", JOB, 3);
        assert_eq!(names.job(), "drover-ci1-p42-j1001");
        assert_eq!(names.job_scoped("net"), "drover-ci1-p42-j1001-net");
        assert!(
            names
                .job()
                .starts_with(&ResourceNames::runner_prefix("ci1"))
        );
        assert_eq!(names.project_scoped("cache"), "drover-ci1-p42-cache");
    }

    #[test]
    fn labels_expire_after_timeout_and_grace() {
        let names = ResourceNames::new("ci1", JOB, 0);
        let labels = names.labels(Duration::from_secs(60), Duration::from_secs(10));
        assert_eq!(labels[LABEL_JOB], "1001");
        let now = SystemTime::now();
        assert!(!is_expired(&labels, "ci1", now));
        assert!(is_expired(&labels, "ci1", now + Duration::from_secs(71)));
        assert!(!is_expired(&labels, "other", now + Duration::from_secs(71)));
        let mut unlabelled = labels.clone();
        unlabelled.remove(LABEL_EXPIRES);
        assert!(!is_expired(
            &unlabelled,
            "ci1",
            now + Duration::from_secs(1_000_000)
        ));
    }
}
