//! The job payload GitLab would send for a [`Job`] (contract §9.4), as a
//! [`drover_protocol::JobResponse`].
//!
//! [`job_payload`] is a pure function of the job and [`PayloadOptions`]; ids and the token are
//! chosen by [`PayloadOptions::fresh`], so a fake coordinator can reuse the builder.

use std::sync::atomic::{AtomicU64, Ordering};

use drover_protocol::{GitInfo, Image, JobInfo, JobResponse, JobStep, JobVariable, RunnerInfo};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::job::Job;

/// The job timeout GitLab sends when the job sets none (a project's default, 1 h).
pub const DEFAULT_JOB_TIMEOUT_SECS: i64 = 3600;

/// Failure reasons GitLab lists in `features.failure_reasons` (§9.4).
const FAILURE_REASONS: [&str; 5] = [
    "script_failure",
    "runner_system_failure",
    "job_execution_timeout",
    "unknown_failure",
    "job_canceled",
];

/// Identity and addresses of the job GitLab would assign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadOptions {
    /// `id` and `CI_JOB_ID`.
    pub job_id: u64,
    /// `token` and `CI_JOB_TOKEN`.
    pub job_token: String,
    /// `CI_PIPELINE_ID`.
    pub pipeline_id: u64,
    /// `job_info.project_id` and `CI_PROJECT_ID`.
    pub project_id: u64,
    /// The project's namespace (`drover`).
    pub namespace: String,
    /// The project's name (`demo`).
    pub project: String,
    /// `CI_SERVER_URL`; the repo URL and artifact uploads use it.
    pub server_url: String,
    /// `CI_RUNNER_ID`.
    pub runner_id: u64,
    /// Finished jobs of the pipeline this job depends on.
    pub dependencies: Vec<PayloadDependency>,
    /// The commit to check out, when the coordinator serves the project's repository; without
    /// one the job gets `GIT_STRATEGY=none`.
    pub source: Option<Source>,
}

/// A commit of the repository the coordinator serves at the job's `repo_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The full commit id.
    pub sha: String,
    /// The branch it is on.
    pub git_ref: String,
}

/// One element of the payload's `dependencies`: an earlier job whose artifacts this job may
/// download, with the token to download them (§8 `artifacts-downloader --token`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadDependency {
    /// The job id.
    pub id: u64,
    /// The job name.
    pub name: String,
    /// The dependency's job token.
    pub token: String,
    /// Present when the job uploaded artifacts; the runner only downloads those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts_file: Option<ArtifactsFile>,
}

/// `artifacts_file` of a [`PayloadDependency`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactsFile {
    /// `artifacts.zip`.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
}

static NEXT_JOB_ID: AtomicU64 = AtomicU64::new(0);

/// A job id unique within this process and, being seeded at random, unlikely to repeat across
/// runs or collide with another `drover` process running at the same moment: on a real
/// GitLab job ids are unique, and drivers name resources after them.
pub fn next_job_id() -> u64 {
    // A million ids per process, a million possible seeds.
    let seed = 1_000_000_000 + fastrand::u64(0..1_000_000) * 1_000_000;
    // The first caller seeds the counter; later callers just increment it.
    let _ = NEXT_JOB_ID.compare_exchange(0, seed, Ordering::SeqCst, Ordering::SeqCst);
    NEXT_JOB_ID.fetch_add(1, Ordering::SeqCst)
}

impl PayloadOptions {
    /// A new job id and a random job token, for project `drover/demo`.
    pub fn fresh() -> PayloadOptions {
        let job_id = next_job_id();
        PayloadOptions {
            job_id,
            job_token: format!("glcbt-{}", random_hex(20)),
            pipeline_id: job_id / 10,
            project_id: 42,
            namespace: "drover".into(),
            project: "demo".into(),
            server_url: "http://127.0.0.1".into(),
            runner_id: 1,
            dependencies: Vec::new(),
            source: None,
        }
    }

    /// `<namespace>/<project>`.
    pub fn project_path(&self) -> String {
        format!("{}/{}", self.namespace, self.project)
    }
}

/// `n` random lowercase hex digits.
pub fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
        .collect()
}

/// GitLab's `CI_PROJECT_PATH_SLUG`: lowercased, every run of characters other than `a-z0-9`
/// replaced by `-`, at most 63 characters, no leading or trailing `-`.
pub fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(63);
    out.trim_matches('-').to_owned()
}

fn variable(key: &str, value: impl Into<String>) -> JobVariable {
    JobVariable {
        key: key.into(),
        value: value.into(),
        public: true,
        ..JobVariable::default()
    }
}

/// Builds the payload GitLab would send for `job`, given the file's global variables.
///
/// Variables: GitLab's predefined ones first, then the global ones, then the job's own; the
/// runner's lookups take the last occurrence, so later wins (§3.4).
pub fn job_payload(
    job: &Job,
    globals: &[(String, String)],
    options: &PayloadOptions,
) -> JobResponse {
    let timeout = job
        .timeout
        .map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(DEFAULT_JOB_TIMEOUT_SECS);
    let (sha, git_ref) = match &options.source {
        Some(source) => (source.sha.as_str(), source.git_ref.as_str()),
        None => ("0123456789abcdef0123456789abcdef01234567", "main"),
    };
    let project_path = options.project_path();
    let mut variables = vec![
        variable("CI_JOB_ID", options.job_id.to_string()),
        variable("CI_JOB_NAME", &job.name),
        variable("CI_JOB_STAGE", &job.stage),
        JobVariable {
            masked: true,
            public: false,
            ..variable("CI_JOB_TOKEN", &options.job_token)
        },
        variable("CI_PROJECT_ID", options.project_id.to_string()),
        variable("CI_PROJECT_NAME", &options.project),
        variable("CI_PROJECT_NAMESPACE", &options.namespace),
        variable("CI_PROJECT_PATH", &project_path),
        variable("CI_PROJECT_PATH_SLUG", slug(&project_path)),
        variable("CI_PIPELINE_ID", options.pipeline_id.to_string()),
        variable("CI_COMMIT_SHA", sha),
        variable("CI_COMMIT_REF_NAME", git_ref),
        variable("CI_SERVER_URL", &options.server_url),
        variable("CI_RUNNER_ID", options.runner_id.to_string()),
    ];
    // §9.4: without a repository to clone, GIT_STRATEGY=none unless the job asks otherwise
    // (the job's own value comes later and wins); with one, GitLab's default, fetch.
    let strategy = if options.source.is_some() {
        "fetch"
    } else {
        "none"
    };
    variables.push(variable("GIT_STRATEGY", strategy));
    variables.extend(
        globals
            .iter()
            .chain(&job.variables)
            .map(|(k, v)| variable(k, v.as_str())),
    );

    let mut steps = vec![JobStep {
        name: "script".into(),
        script: job
            .before_script
            .iter()
            .chain(&job.script)
            .cloned()
            .collect(),
        timeout,
        when: "on_success".into(),
        allow_failure: false,
    }];
    if !job.after_script.is_empty() {
        steps.push(JobStep {
            name: "after_script".into(),
            script: job.after_script.clone(),
            timeout,
            when: "always".into(),
            allow_failure: true,
        });
    }

    let mut other = serde_json::Map::new();
    other.insert(
        "features".into(),
        json!({"trace_sections": true, "failure_reasons": FAILURE_REASONS}),
    );
    other.insert(
        "cache".into(),
        Value::Array(
            job.cache
                .iter()
                .map(|c| json!({"key": c.key, "paths": c.paths, "when": c.when, "policy": "pull-push", "untracked": false}))
                .collect(),
        ),
    );
    other.insert(
        "artifacts".into(),
        Value::Array(
            job.artifacts
                .iter()
                .map(|a| json!({"name": "", "paths": a.paths, "when": a.when, "artifact_type": "archive", "artifact_format": "zip", "untracked": false}))
                .collect(),
        ),
    );
    other.insert(
        "dependencies".into(),
        serde_json::to_value(&options.dependencies).unwrap_or(Value::Array(Vec::new())),
    );

    JobResponse {
        id: options.job_id,
        token: options.job_token.clone(),
        allow_git_fetch: false,
        job_info: JobInfo {
            name: job.name.clone(),
            stage: job.stage.clone(),
            project_id: options.project_id,
            project_name: options.project.clone(),
        },
        git_info: GitInfo {
            repo_url: format!(
                "{}/{}.git",
                options.server_url.trim_end_matches('/'),
                project_path
            ),
            git_ref: git_ref.into(),
            sha: sha.into(),
            before_sha: "0".repeat(40),
            ref_type: "branch".into(),
            // What GitLab sends for a branch pipeline: every branch, so the commit is fetched.
            refspecs: if options.source.is_some() {
                vec!["+refs/heads/*:refs/remotes/origin/*".into()]
            } else {
                Vec::new()
            },
            depth: 0,
        },
        runner_info: RunnerInfo { timeout },
        variables,
        steps,
        image: job.image.as_ref().map(|name| Image {
            name: name.clone(),
            ..Image::default()
        }),
        services: job
            .services
            .iter()
            .map(|s| Image {
                name: s.name.clone(),
                alias: s.alias.clone().unwrap_or_default(),
                entrypoint: s.entrypoint.clone().unwrap_or_default(),
                command: s.command.clone().unwrap_or_default(),
            })
            .collect(),
        other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            name: "hello".into(),
            stage: "test".into(),
            before_script: vec!["echo before".into()],
            script: vec!["echo hi".into()],
            variables: vec![
                ("GIT_STRATEGY".into(), "fetch".into()),
                ("A".into(), "job".into()),
            ],
            ..Job::default()
        }
    }

    #[test]
    fn payload_has_the_shape_gitlab_sends() {
        let options = PayloadOptions::fresh();
        let payload = job_payload(&job(), &[("A".into(), "global".into())], &options);
        let json = serde_json::to_value(&payload).expect("serializes");
        assert_eq!(json["id"], options.job_id);
        assert_eq!(json["job_info"]["name"], "hello");
        assert_eq!(
            json["git_info"]["repo_url"],
            "http://127.0.0.1/drover/demo.git"
        );
        assert_eq!(json["runner_info"]["timeout"], 3600);
        assert_eq!(json["steps"][0]["script"][0], "echo before");
        assert_eq!(json["steps"].as_array().map(Vec::len), Some(1));
        assert_eq!(json["features"]["failure_reasons"][0], "script_failure");
        assert_eq!(payload.variable("A"), Some("job"));
        assert_eq!(payload.variable("GIT_STRATEGY"), Some("fetch"));
        assert_eq!(
            payload.variable("CI_PROJECT_PATH_SLUG"),
            Some("drover-demo")
        );
        let token = payload.variables.iter().find(|v| v.key == "CI_JOB_TOKEN");
        assert!(token.is_some_and(|t| t.masked && t.value == options.job_token));
    }

    #[test]
    fn job_ids_are_unique() {
        let a = next_job_id();
        let b = next_job_id();
        assert_ne!(a, b);
    }

    #[test]
    fn slugs_like_gitlab() {
        assert_eq!(slug("Group/Sub_Project.x"), "group-sub-project-x");
        assert_eq!(slug("-a-"), "a");
    }
}
