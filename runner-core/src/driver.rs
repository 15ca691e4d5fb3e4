use std::path::PathBuf;
use std::time::SystemTime;

use drover_protocol::{ConfigOutput, DriverInfo, SubStage};
use serde::de::DeserializeOwned;

use crate::settings::Settings;
use crate::{Job, Result, ResultExt};

/// A backend: everything a driver author writes. The core calls one method per invocation and
/// turns its result into the exit code GitLab Runner expects (§4.4), so a method never exits,
/// never prints JSON itself and never decides an exit code.
///
/// Methods are `async` and run on a single-threaded runtime owned by the core, so their futures
/// need not be `Send`. Every method that waits must also watch [`Job::cancel_token`].
#[allow(async_fn_in_trait)] // the core, not callers, drives these futures (see above)
pub trait Driver: Sized {
    /// Shown in the job log: `Using Custom executor with driver NAME VERSION...`.
    const NAME: &'static str;
    /// The driver's version.
    const VERSION: &'static str;
    /// The driver's own `[driver]` table in the operator's settings file.
    type Settings: DeserializeOwned;

    /// Builds the driver from the operator's settings. Cheap: no backend calls (those belong in
    /// the stages, where they can be cancelled and reported).
    fn new(settings: &Settings<Self::Settings>) -> Result<Self>;

    /// config_exec (§1.2): what the runner should use for this job. The default names the
    /// driver and passes on the operator's `builds_dir`/`cache_dir`. Runs before the build
    /// directories exist: derive nothing from `CI_PROJECT_DIR` here.
    async fn config(&self, job: &Job) -> Result<ConfigOutput> {
        let _ = job;
        Ok(base_config::<Self>())
    }

    /// prepare_exec (§1.3): create the job's environment. Remove a stale one of the same name
    /// first: a previous attempt may have failed half-way (§5.1).
    async fn prepare(&self, job: &Job) -> Result<()>;

    /// run_exec (§1.4): run `script` in the environment and return **its** exit status. Return
    /// an error only when the infrastructure failed. On cancellation stop the script (remote
    /// processes included) and return, but leave the environment: after_script and uploads
    /// follow (§6.3).
    async fn run(&self, job: &Job, script: &Script) -> Result<i32>;

    /// cleanup_exec (§1.5): remove everything prepare made. Must succeed when there is nothing
    /// to remove: it runs after failed configs, up to three times per job (§6.3).
    async fn cleanup(&self, job: &Job) -> Result<()>;

    /// Removes resources of this runner whose jobs are over but whose cleanup never ran.
    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let _ = request;
        Ok(GcReport::default())
    }

    /// Checks that the backend is reachable and usable, saying what to fix when not.
    async fn doctor(&self) -> Result<Vec<Check>> {
        Ok(Vec::new())
    }
}

/// The config output every driver starts from: its name and version, shown by the runner in
/// `Using Custom executor with driver NAME VERSION...` (§2). Extend it with struct update
/// syntax: `ConfigOutput { builds_dir: ..., ..base_config::<Self>() }`.
pub fn base_config<D: Driver>() -> ConfigOutput {
    ConfigOutput {
        driver: Some(DriverInfo {
            name: Some(D::NAME.to_owned()),
            version: Some(D::VERSION.to_owned()),
        }),
        ..ConfigOutput::default()
    }
}

/// The config of a driver that gives every job a fresh environment of its own (a container, an
/// instance, a VM): fixed builds and cache dirs inside it, a builds dir never shared between
/// jobs (§2, §10 item 6), and the environment's name as the hostname in the job log.
pub fn fresh_environment_config<D: Driver>(
    job: &Job,
    builds_dir: &str,
    cache_dir: &str,
    shell: &str,
) -> ConfigOutput {
    ConfigOutput {
        builds_dir: Some(builds_dir.to_owned()),
        cache_dir: Some(cache_dir.to_owned()),
        builds_dir_is_shared: Some(false),
        hostname: Some(job.names().job()),
        shell: Some(shell.to_owned()),
        ..base_config::<D>()
    }
}

/// The script of one run sub-stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// Path on the runner host (mode 0700, holds secrets).
    pub path: PathBuf,
    /// Which sub-stage it is.
    pub sub_stage: SubStage,
}

impl Script {
    /// The script's bytes, e.g. to copy into a remote environment.
    pub async fn read(&self) -> Result<Vec<u8>> {
        tokio::fs::read(&self.path)
            .await
            .or_system(format_args!("cannot read script {}", self.path.display()))
    }
}

/// What `gc` should do.
#[derive(Debug, Clone)]
pub struct GcRequest {
    /// The operator's `runner_name`: only this runner's resources are considered.
    pub runner: String,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// The time to compare expiry labels with.
    pub now: SystemTime,
}

/// What `gc` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Resources removed (or, in a dry run, that would be).
    pub removed: Vec<String>,
    /// Resources of this runner left in place because they have not expired.
    pub kept: usize,
}

/// One line of `doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it is usable.
    pub ok: bool,
    /// What was found, or what to fix.
    pub detail: String,
}

impl Check {
    /// A passing check.
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
        }
    }

    /// The check of a driver's `gitlab_runner_binary` setting: the binary given to job
    /// environments whose image has none (§8, §10 item 14).
    pub fn gitlab_runner_binary(binary: &std::path::Path) -> Check {
        if binary.is_file() {
            Check::ok("gitlab_runner_binary", binary.display().to_string())
        } else {
            Check::failed(
                "gitlab_runner_binary",
                format!(
                    "{} is not a file; cache and artifacts would be skipped",
                    binary.display()
                ),
            )
        }
    }

    /// A failing check; `fix` says what to do about it.
    pub fn failed(name: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: false,
            detail: fix.into(),
        }
    }
}
