//! What the runner gives each driver call (§1.1, §3): the executor temp dir and its files
//! (`response.json`, the run scripts), and the environment: the runner's own, the control
//! variables, config_exec's `job_env` and every job variable as `CUSTOM_ENV_*`.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use drover_protocol::{
    BUILD_EXIT_CODE_FILE, BUILD_FAILURE_EXIT_CODE, CUSTOM_ENV_PREFIX, JOB_RESPONSE_FILE,
    JobResponse, JobVariable, SYSTEM_FAILURE_EXIT_CODE, Service, TMPDIR,
};

use crate::payload::PayloadDependency;
use crate::script::{ArtifactEntry, CacheEntry, Dependency, ScriptInfo};

use super::call::Call;
use super::exit::Failure;
use super::{Attempt, EMULATED_RUNNER_VERSION, Emulator};

impl Emulator<'_> {
    /// A fresh `custom-executorNNNN` dir with `response.json` (§1.1, §3.1).
    pub(super) fn create_temp_dir(&mut self) -> Result<(), Failure> {
        self.attempt = Attempt::default();
        let temp_root = self
            .options
            .temp_root
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let temp_dir = tempfile::Builder::new()
            .prefix("custom-executor")
            .rand_bytes(10)
            .tempdir_in(&temp_root)
            .map(tempfile::TempDir::keep)
            .map_err(|e| Failure::System(format!("creating the executor temp dir: {e}")))?;
        self.attempt.temp_dir = Some(temp_dir.clone());
        write_private(&temp_dir.join("response.json"), self.job)
            .map_err(|e| Failure::System(format!("writing the job response file: {e}")))
    }

    /// `<namespace>/<project>` from the repo URL's path, as `ProjectSlug` does (§9.4); a
    /// malformed URL falls back to `project-<id>`.
    pub(super) fn project_path(&self) -> String {
        let url = &self.job.git_info.repo_url;
        url.split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(_, path)| path.trim_end_matches(".git").trim_matches('/').to_owned())
            .filter(|p| !p.is_empty() && !p.contains(".."))
            .unwrap_or_else(|| format!("project-{}", self.job.job_info.project_id))
    }

    /// `GetAllVariables` (§3.4), in the runner's order.
    fn all_variables(&self) -> Vec<JobVariable> {
        let var = |key: &str, value: String| JobVariable {
            key: key.into(),
            value,
            public: true,
            ..JobVariable::default()
        };
        let mut vars = Vec::new();
        if let Some(image) = &self.job.image {
            vars.push(var("CI_JOB_IMAGE", image.name.clone()));
        }
        let slot = self.options.concurrent_id.to_string();
        vars.extend([
            var(
                "CI_RUNNER_SHORT_TOKEN",
                self.options.runner_short_token.clone(),
            ),
            var("CI_BUILDS_DIR", self.builds_dir.clone()),
            var("CI_PROJECT_DIR", self.project_dir.clone()),
            var("CI_CONCURRENT_ID", slot.clone()),
            var("CI_CONCURRENT_PROJECT_ID", slot),
            var("CI_SERVER", "yes".into()),
            var("CI_JOB_STATUS", self.job_status.into()),
            var(
                "CI_JOB_TIMEOUT",
                self.job.runner_info.effective_timeout_secs().to_string(),
            ),
        ]);
        vars.extend(self.job.variables.iter().cloned());
        vars.extend([
            var("CI_SHARED_ENVIRONMENT", "true".into()),
            var("CI_RUNNER_VERSION", EMULATED_RUNNER_VERSION.into()),
            var("CI_RUNNER_REVISION", "drover".into()),
            var(
                "CI_RUNNER_EXECUTABLE_ARCH",
                format!("linux/{}", std::env::consts::ARCH),
            ),
            var(
                "RUNNER_TEMP_PROJECT_DIR",
                format!("{}.tmp", self.project_dir),
            ),
        ]);
        vars
    }

    /// `CI_JOB_SERVICES` (§3.4): a JSON array, or the empty string without services.
    fn services_json(&self) -> String {
        if self.job.services.is_empty() {
            return String::new();
        }
        let services: Vec<Service> = self
            .job
            .services
            .iter()
            .map(|s| Service {
                name: s.name.clone(),
                alias: s.alias.clone(),
                entrypoint: (!s.entrypoint.is_empty()).then(|| s.entrypoint.clone()),
                command: (!s.command.is_empty()).then(|| s.command.clone()),
                variables: Vec::new(),
            })
            .collect();
        serde_json::to_string(&services).unwrap_or_default()
    }

    /// The environment of a call on top of the harness's own (§1.1, §3).
    pub(super) fn call_env(&self, call: &Call, temp_dir: &Path) -> Vec<(String, String)> {
        let path = |name: &str| temp_dir.join(name).to_string_lossy().into_owned();
        // The runner's own environment comes first (§1.1); only its PATH is changed here.
        let mut env: Vec<(String, String)> = self
            .options
            .path_prefix
            .iter()
            .map(|dir| ("PATH".to_owned(), prefixed_path(dir)))
            .collect();
        env.extend([
            (TMPDIR.to_owned(), temp_dir.to_string_lossy().into_owned()),
            (BUILD_FAILURE_EXIT_CODE.to_owned(), "1".to_owned()),
            (SYSTEM_FAILURE_EXIT_CODE.to_owned(), "2".to_owned()),
            (BUILD_EXIT_CODE_FILE.to_owned(), path("build_exit_code")),
            (JOB_RESPONSE_FILE.to_owned(), path("response.json")),
        ]);
        if *call != Call::Config {
            env.extend(self.attempt.job_env.iter().cloned());
        }
        env.extend(
            self.all_variables()
                .into_iter()
                .map(|v| (format!("{CUSTOM_ENV_PREFIX}{}", v.key), v.value)),
        );
        env.push((
            format!("{CUSTOM_ENV_PREFIX}CI_JOB_SERVICES"),
            self.services_json(),
        ));
        env
    }

    /// What the script generator needs to write the job's scripts for run_exec (§4.3).
    pub(super) fn script_info(&self) -> ScriptInfo {
        let other = &self.job.other;
        let list = |key: &str| other.get(key).cloned().unwrap_or_default();
        let git_strategy = self
            .job
            .variable("GIT_STRATEGY")
            .unwrap_or("fetch")
            .to_owned();
        let suffix = if git_strategy == "empty" {
            "-empty"
        } else {
            ""
        };
        ScriptInfo {
            shell: self.attempt.shell.clone(),
            variables: self.all_variables(),
            project_dir: self.project_dir.clone(),
            cache_project_dir: format!(
                "{}/{}{suffix}",
                self.cache_dir.trim_end_matches('/'),
                self.project_path()
            ),
            hostname: self.attempt.hostname.clone(),
            git_strategy,
            git: self.job.git_info.clone(),
            steps: self.job.steps.clone(),
            cache: serde_json::from_value::<Vec<CacheEntry>>(list("cache")).unwrap_or_default(),
            artifacts: serde_json::from_value::<Vec<ArtifactEntry>>(list("artifacts"))
                .unwrap_or_default(),
            // Only dependencies that uploaded artifacts are downloaded (§4.1 row 4).
            dependencies: serde_json::from_value::<Vec<PayloadDependency>>(list("dependencies"))
                .unwrap_or_default()
                .into_iter()
                .filter(|dep| dep.artifacts_file.is_some())
                .map(|dep| Dependency {
                    id: dep.id,
                    name: dep.name,
                    token: dep.token,
                })
                .collect(),
            server_url: self.job.variable("CI_SERVER_URL").unwrap_or("").to_owned(),
            job_token: self.job.token.clone(),
            job_id: self.job.id,
        }
    }
}

/// `response.json`, mode 0600 (§3.1).
fn write_private(path: &Path, job: &JobResponse) -> std::io::Result<()> {
    let json = serde_json::to_vec(job).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&json)
}

/// A new `scriptNNNN/script` (mode 0700) under the temp dir (§1.4).
pub(super) fn write_script(temp_dir: &Path, text: &str) -> std::io::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("script")
        .rand_bytes(10)
        .tempdir_in(temp_dir)?
        .keep();
    let path = dir.join("script");
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
    Ok(path)
}

/// `dir` followed by the harness's own `PATH`.
pub fn prefixed_path(dir: &Path) -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", dir.display())
}
