//! `drover-podman`: each GitLab job in its own container, through podman's (or Docker's)
//! Docker-compatible API, the way GitLab Runner's docker executor does it.
//!
//! Per job, all named from the job's trusted identity and labelled for `gc`:
//!
//! ```text
//! drover-<runner>-p<project>-j<job>            the job container (the job's image)
//! drover-<runner>-p<project>-j<job>-helper     git, cache and artifact stages (helper_image)
//! drover-<runner>-p<project>-j<job>-svc-N      one per service, sharing the job's network
//! drover-<runner>-p<project>-j<job>-net        holds the network namespace when there are services
//! drover-<runner>-p<project>-j<job>-builds     the builds volume, shared by job and helper
//! ```
//!
//! Each run stage is the runner's script handed to a dispatcher that is the container's PID 1
//! (see `stages`), with its output streamed as it arrives. The cache is a host directory mounted at `/cache`, so it
//! survives the job's containers (contract §8). Section numbers (§) refer to `contract.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use bollard::models::{ContainerCreateBody, HostConfig};
use drover_core::naming::{LABEL_JOB, LABEL_RUNNER, is_expired};
use drover_core::protocol::ConfigOutput;
use drover_core::{
    Backoff, Check, Driver, Error, GcReport, GcRequest, Job, Result, ResultExt, Script, Settings,
    fresh_environment_config, progress, retry,
};
use serde::Deserialize;

mod auth;
mod engine;
mod services;
mod stages;

use engine::{Engine, PullPolicy};

/// The `builds_dir` inside every job container (§2).
const BUILDS_DIR: &str = "/builds";
/// The `cache_dir` inside every job container, a host directory (§8).
const CACHE_DIR: &str = "/cache";
/// Where an operator's `gitlab-runner` binary appears in the containers that need it (§8).
const RUNNER_IN_CONTAINER: &str = "/usr/local/bin/gitlab-runner";
/// Label: which part of the job a container is.
const LABEL_ROLE: &str = "drover.role";

/// Keeps the container that holds a job's network namespace alive, and exits at once on the
/// engine's SIGTERM. Only `sh` and `sleep` are needed in the image.
const KEEPALIVE: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// The `[driver]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodmanSettings {
    /// The API socket; default: podman's rootful, then rootless socket, then Docker's.
    #[serde(default)]
    socket: Option<PathBuf>,
    /// When to pull the job's image.
    #[serde(default = "default_pull_policy")]
    pull_policy: PullPolicy,
    /// An image with git (and a shell) for get_sources, cache and artifact stages, so job
    /// images need neither. Unset: every stage runs in the job container.
    #[serde(default)]
    helper_image: Option<String>,
    /// A `gitlab-runner` binary on the host, mounted read-only at
    /// `/usr/local/bin/gitlab-runner` where cache and artifact stages run: without it those
    /// stages are silently skipped by the runner's scripts (§8, §10 item 14).
    #[serde(default)]
    gitlab_runner_binary: Option<PathBuf>,
    /// Host directory for the cache (`<state_dir>/cache`) and per-job files.
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    /// `NetworkMode` of job containers (`none`, `host`, a network name); default: the
    /// engine's default network.
    #[serde(default)]
    network_mode: Option<String>,
    /// The interpreter of the runner's scripts (must match the runner's `shell`, §7).
    #[serde(default = "drover_core::settings::default_shell")]
    shell: String,
    /// Extra bind mounts for every job, `host:container[:ro]`.
    #[serde(default)]
    volumes: Vec<String>,
    /// Registry credentials by registry host, used before any the job brings.
    #[serde(default)]
    registries: BTreeMap<String, auth::Credentials>,
    /// How long prepare waits for services' exposed ports.
    #[serde(default = "default_service_wait")]
    service_wait_secs: u64,
}

fn default_pull_policy() -> PullPolicy {
    PullPolicy::IfNotPresent
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/drover-podman")
}

fn default_service_wait() -> u64 {
    30
}

struct PodmanDriver {
    settings: PodmanSettings,
    runner: String,
}

impl Driver for PodmanDriver {
    const NAME: &'static str = "drover-podman";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Settings = PodmanSettings;

    fn new(settings: &Settings<PodmanSettings>) -> Result<Self> {
        Ok(PodmanDriver {
            settings: settings.driver.clone(),
            runner: settings.runner_name.clone(),
        })
    }

    /// Every job gets fresh containers and a volume of its own, so the builds dir is never
    /// shared (§2, §10 item 6).
    async fn config(&self, job: &Job) -> Result<ConfigOutput> {
        Ok(fresh_environment_config::<Self>(
            job,
            BUILDS_DIR,
            CACHE_DIR,
            &self.settings.shell,
        ))
    }

    async fn prepare(&self, job: &Job) -> Result<()> {
        let started = Instant::now();
        // Policy first: a refused image must fail before anything is created.
        let resources = job.resources()?;
        let image = resources.required_image()?;
        let engine = Engine::connect(self.settings.socket.as_deref())?;
        engine.ping().await?;
        progress!("Using the container engine at {}", engine.endpoint);
        // A container of the same name can only be left from an earlier attempt (§5.1).
        self.remove_job(&engine, job).await?;

        let credentials = auth::credentials_for(&image, &self.settings.registries, job.env());
        let pull = |image: String,
                    policy: PullPolicy,
                    credentials: Option<bollard::auth::DockerCredentials>| {
            let engine = &engine;
            retry(
                "pulling the image",
                Backoff::default(),
                Some(job.deadline()),
                job.cancel_token(),
                move || {
                    let (image, credentials) = (image.clone(), credentials.clone());
                    async move { engine.ensure_image(&image, policy, credentials).await }
                },
            )
        };
        pull(image.clone(), self.settings.pull_policy, credentials).await?;
        if let Some(helper) = &self.settings.helper_image {
            pull(helper.clone(), PullPolicy::IfNotPresent, None).await?;
        }

        let names = job.names();
        let labels = job.labels();
        let job_dir = self.job_dir(job);
        let volume = names.job_scoped("builds");
        engine.create_volume(&volume, &labels).await?;
        let network =
            services::prepare_network(&engine, job, &image, &self.settings, &job_dir).await?;

        let mut binds = vec![
            format!("{volume}:{BUILDS_DIR}"),
            self.cache_bind()?,
            self.fifo_bind(job)?,
        ];
        binds.extend(self.settings.volumes.iter().cloned());
        binds.extend(resources.mounts.iter().map(|m| {
            format!(
                "{}:{}{}",
                m.source,
                m.target,
                if m.read_only { ":ro" } else { "" }
            )
        }));
        binds.extend(network.binds.iter().cloned());
        let runner_bind = self
            .settings
            .gitlab_runner_binary
            .as_ref()
            .map(|binary| format!("{}:{RUNNER_IN_CONTAINER}:ro", binary.display()));

        let mut job_binds = binds.clone();
        if self.settings.helper_image.is_none() {
            job_binds.extend(runner_bind.clone());
        }
        progress!("Creating container {} from {image}", names.job());
        let job_host = HostConfig {
            binds: Some(job_binds),
            network_mode: network.mode.clone(),
            nano_cpus: resources.cpus.map(|cpus| (cpus * 1e9) as i64),
            memory: resources.memory_bytes.and_then(|m| i64::try_from(m).ok()),
            ..HostConfig::default()
        };
        engine
            .create(
                &names.job(),
                stage_runner(&image, &labels, "job", &self.settings.shell, job_host),
            )
            .await?;
        engine.start(&names.job()).await?;

        if let Some(helper) = &self.settings.helper_image {
            let mut helper_binds = binds;
            helper_binds.extend(runner_bind);
            let helper_host = HostConfig {
                binds: Some(helper_binds),
                network_mode: network.mode.clone(),
                ..HostConfig::default()
            };
            engine
                .create(
                    &names.job_scoped("helper"),
                    stage_runner(helper, &labels, "helper", &self.settings.shell, helper_host),
                )
                .await?;
            engine.start(&names.job_scoped("helper")).await?;
        }
        services::wait_for_ports(&engine, job, &network, &self.settings).await;
        progress!("Ready in {:.2} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The script goes to the container's dispatcher (see `stages`); its output is streamed
    /// as it arrives and its exit status comes back with it.
    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        let names = job.names();
        let container = if self.settings.helper_image.is_some() && script.sub_stage.is_predefined()
        {
            names.job_scoped("helper")
        } else {
            names.job()
        };
        let body = script.read().await?;
        let engine = Engine::connect(self.settings.socket.as_deref())?;
        let fifo_dir = self.job_dir(job).join("io");
        let fifo_dir = fifo_dir.is_dir().then_some(fifo_dir.as_path());
        stages::run(&engine, &container, &body, fifo_dir, job.cancel_token()).await
    }

    async fn cleanup(&self, job: &Job) -> Result<()> {
        let engine = Engine::connect(self.settings.socket.as_deref())?;
        self.remove_job(&engine, job).await
    }

    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let engine = Engine::connect(self.settings.socket.as_deref())?;
        let mut jobs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (_, labels) in engine
            .containers_with(&[(LABEL_RUNNER, &request.runner)])
            .await?
        {
            if let Some(job) = labels.get(LABEL_JOB) {
                jobs.insert(job.clone(), labels.into_iter().collect());
            }
        }
        let mut report = GcReport::default();
        for (job_id, labels) in jobs {
            if !is_expired(&labels, &request.runner, request.now) {
                report.kept += 1;
                continue;
            }
            if !request.dry_run {
                self.remove_by_job_label(&engine, &job_id).await?;
            }
            report.removed.push(format!("job {job_id}"));
        }
        Ok(report)
    }

    async fn doctor(&self) -> Result<Vec<Check>> {
        let mut checks = Vec::new();
        let engine = match Engine::connect(self.settings.socket.as_deref()) {
            Ok(engine) => engine,
            Err(err) => return Ok(vec![Check::failed("engine", err.to_string())]),
        };
        checks.push(match engine.describe().await {
            Ok(version) => Check::ok("engine", format!("{version} at {}", engine.endpoint)),
            Err(err) => Check::failed("engine", err.to_string()),
        });
        if let Some(helper) = &self.settings.helper_image {
            checks.push(
                match engine.ensure_image(helper, PullPolicy::Never, None).await {
                    Ok(()) => Check::ok("helper_image", helper.clone()),
                    Err(err) => Check::failed("helper_image", err.to_string()),
                },
            );
        }
        if let Some(binary) = &self.settings.gitlab_runner_binary {
            checks.push(if binary.is_file() {
                Check::ok("gitlab_runner_binary", binary.display().to_string())
            } else {
                Check::failed(
                    "gitlab_runner_binary",
                    format!(
                        "{} is not a file; cache and artifacts would be skipped",
                        binary.display()
                    ),
                )
            });
        }
        let cache = self.settings.state_dir.join("cache");
        checks.push(match std::fs::create_dir_all(&cache) {
            Ok(()) => Check::ok("cache", cache.display().to_string()),
            Err(err) => Check::failed(
                "cache",
                format!(
                    "cannot create {}: {err}; set [driver] state_dir",
                    cache.display()
                ),
            ),
        });
        Ok(checks)
    }
}

impl PodmanDriver {
    fn job_dir(&self, job: &Job) -> PathBuf {
        self.settings.state_dir.join("jobs").join(job.names().job())
    }

    /// The host directory for the stages' output FIFOs (see `stages`): private to root on the
    /// host, traversable so any user in the container reaches the FIFOs it is given.
    fn fifo_bind(&self, job: &Job) -> Result<String> {
        let dir = self.job_dir(job).join("io");
        std::fs::create_dir_all(&dir).or_system(format_args!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .or_system(format_args!("cannot set the mode of {}", dir.display()))?;
        Ok(format!("{}:{}", dir.display(), stages::IO_DIR))
    }

    fn cache_bind(&self) -> Result<String> {
        let cache = self.settings.state_dir.join("cache");
        std::fs::create_dir_all(&cache).or_system(format_args!(
            "cannot create the cache dir {}",
            cache.display()
        ))?;
        Ok(format!("{}:{CACHE_DIR}", cache.display()))
    }

    /// Removes everything of this job: found by its labels, so a container from an attempt
    /// that crashed half-way goes too.
    async fn remove_job(&self, engine: &Engine, job: &Job) -> Result<()> {
        self.remove_by_job_label(engine, &job.identity().job_id.to_string())
            .await?;
        engine
            .remove_volume(&job.names().job_scoped("builds"))
            .await?;
        match std::fs::remove_dir_all(self.job_dir(job)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(Error::system(format!(
                "cannot remove {}: {err}",
                self.job_dir(job).display()
            ))),
            _ => Ok(()),
        }
    }

    async fn remove_by_job_label(&self, engine: &Engine, job_id: &str) -> Result<()> {
        let containers = engine
            .containers_with(&[(LABEL_RUNNER, &self.runner), (LABEL_JOB, job_id)])
            .await?;
        // The network holder goes last: the others live in its namespace.
        let (holders, others): (Vec<_>, Vec<_>) = containers
            .into_iter()
            .partition(|(_, labels)| labels.get(LABEL_ROLE).map(String::as_str) == Some("net"));
        let removals = others.iter().map(|(name, _)| engine.remove(name));
        for result in futures_util::future::join_all(removals).await {
            result?;
        }
        for (name, _) in &holders {
            engine.remove(name).await?;
        }
        for volume in engine.volumes_with(LABEL_JOB, job_id).await? {
            engine.remove_volume(&volume).await?;
        }
        Ok(())
    }
}

/// A container that runs the job's stages, with the dispatcher as PID 1 (see `stages`).
fn stage_runner(
    image: &str,
    labels: &BTreeMap<String, String>,
    role: &str,
    shell: &str,
    host: HostConfig,
) -> ContainerCreateBody {
    let mut labels: std::collections::HashMap<String, String> =
        labels.clone().into_iter().collect();
    labels.insert(LABEL_ROLE.into(), role.into());
    ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec![
            "sh".into(),
            "-c".into(),
            stages::LAUNCHER.into(),
            "drover-launcher".into(),
        ]),
        cmd: Some(vec![stages::DISPATCHER.into(), shell.into()]),
        labels: Some(labels),
        host_config: Some(HostConfig {
            // The stages' output reaches the job log through the attach; the engine's own
            // copy in its container log would only halve the throughput.
            log_config: Some(bollard::models::HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..host
        }),
        ..ContainerCreateBody::default()
    }
}

fn main() -> std::process::ExitCode {
    drover_core::run::<PodmanDriver>()
}
