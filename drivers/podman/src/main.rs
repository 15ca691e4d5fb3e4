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
//! Each run stage goes through the core's stage channel to the agent that is the container's
//! PID 1 (see `stages`), with its output streamed as it arrives. The cache is a host directory
//! per runner and project mounted at `/cache`, so it survives the job's containers (contract
//! §8). Section numbers (§) refer to `contract.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig};
use drover_core::channel;
use drover_core::naming::{LABEL_JOB, LABEL_PROJECT, LABEL_RUNNER, ResourceNames, is_expired};
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
/// How long cleanup waits for an engine that does not answer (a daemon restart takes seconds).
const ENGINE_RETURN: Duration = Duration::from_secs(30);

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
        for service in &job.env().services {
            job.policy().service(&service.name)?;
        }
        let engine = Engine::connect(self.settings.socket.as_deref())?;
        engine.ping().await?;
        progress!("Using the container engine at {}", engine.endpoint);
        // A container of the same name can only be left from an earlier attempt (§5.1).
        self.remove_job(&engine, job).await?;
        self.create_job_dir(job)?;

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
        let volume = names.job_scoped("builds");
        engine.create_volume(&volume, &labels).await?;
        let network =
            services::prepare_network(&engine, job, &image, &self.settings, &self.job_dir(job))
                .await?;

        let job_dir = self.job_dir(job);
        let mut binds = vec![
            format!("{volume}:{BUILDS_DIR}"),
            self.cache_bind(&engine, job, &image).await?,
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
        job_binds.push(stages::create_channel(&stages::channel_path(
            &job_dir, "job",
        ))?);
        if self.settings.helper_image.is_none() {
            job_binds.extend(runner_bind.clone());
        }
        progress!("Creating container {} from {image}", names.job());
        let job_host = HostConfig {
            binds: Some(job_binds),
            network_mode: network.mode.clone(),
            ..limits(resources.cpus, resources.memory_bytes)
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
            helper_binds.push(stages::create_channel(&stages::channel_path(
                &job_dir, "helper",
            ))?);
            helper_binds.extend(runner_bind);
            let helper_limits = job.policy().helper()?;
            let helper_host = HostConfig {
                binds: Some(helper_binds),
                network_mode: network.mode.clone(),
                ..limits(helper_limits.cpus, helper_limits.memory_bytes)
            };
            engine
                .create(
                    &names.job_scoped("helper"),
                    stage_runner(helper, &labels, "helper", &self.settings.shell, helper_host),
                )
                .await?;
            engine.start(&names.job_scoped("helper")).await?;
        }
        for role in self.roles() {
            let exec = stages::ContainerExec {
                engine: &engine,
                container: self.container(job, role),
            };
            channel::settle_agent(
                &exec,
                &stages::channel_path(&job_dir, role),
                &self.settings.shell,
                false,
            )
            .await?;
        }
        services::wait_for_ports(&engine, job, &network, &self.settings).await;
        progress!("Ready in {:.2} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The script goes to the container's stage agent (see `stages`); its output is streamed
    /// as it arrives and its exit status comes back with it.
    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        let role = if self.settings.helper_image.is_some() && script.sub_stage.is_predefined() {
            "helper"
        } else {
            "job"
        };
        let body = script.read().await?;
        let engine = Engine::connect(self.settings.socket.as_deref())?;
        let exec = stages::ContainerExec {
            engine: &engine,
            container: self.container(job, role),
        };
        let path = stages::channel_path(&self.job_dir(job), role);
        let ran = channel::run_in(
            &exec,
            &path,
            &self.settings.shell,
            &body,
            job.cancel_token(),
        )
        .await;
        // A channel that broke because the container itself stopped (the engine restarted —
        // Docker stops containers then, unless live-restore — or someone removed it) says so,
        // instead of suspecting the job.
        if ran.is_err() {
            match engine.not_running(&exec.container).await {
                Ok(Some(why)) => {
                    return Err(Error::system(format!(
                        "container {} {why} while the stage ran; was the engine restarted or the container removed?",
                        exec.container
                    )));
                }
                Err(away) => return Err(away.context("the stage channel broke")),
                Ok(None) => {}
            }
        }
        ran
    }

    /// Removes the job's containers, volume and files. An engine that is away for a moment
    /// (restarting, say) is waited for, up to [`ENGINE_RETURN`]: the runner calls cleanup once,
    /// and giving up at once would leave the job's containers for gc. Without the job's
    /// directory, prepare never reached the engine (it makes the directory first), so there is
    /// nothing to wait for.
    async fn cleanup(&self, job: &Job) -> Result<()> {
        if !self.job_dir(job).exists() {
            let engine = Engine::connect(self.settings.socket.as_deref())?;
            return self.remove_job(&engine, job).await;
        }
        let engine = retry(
            "reaching the engine",
            Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(4),
                max_attempts: u32::MAX,
            },
            Some(tokio::time::Instant::now() + ENGINE_RETURN),
            job.cancel_token(),
            || async {
                let engine =
                    Engine::connect(self.settings.socket.as_deref()).map_err(Error::transient)?;
                engine.ping().await.map_err(Error::transient)?;
                Ok(engine)
            },
        )
        .await?;
        self.remove_job(&engine, job).await
    }

    /// Jobs of this runner whose expiry has passed, found by any of their parts: containers,
    /// volumes (also of a job whose containers were never created) and job directories (also
    /// of a prepare that stopped before it made anything on the engine).
    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let engine = Engine::connect(self.settings.socket.as_deref())?;
        let runner = [(LABEL_RUNNER, request.runner.as_str())];
        let mut jobs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let found = engine
            .containers_with(&runner)
            .await?
            .into_iter()
            .chain(engine.volumes_with(&runner).await?)
            .map(|(_, labels)| labels.into_iter().collect::<BTreeMap<_, _>>())
            .chain(self.job_dirs_labels(&request.runner));
        for labels in found {
            if let Some(job) = labels.get(LABEL_JOB) {
                jobs.entry(job.clone()).or_insert(labels);
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
                if let Some(name) = job_name(&request.runner, &labels) {
                    remove_dir(&self.settings.state_dir.join("jobs").join(name))?;
                }
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
            checks.push(Check::gitlab_runner_binary(binary));
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

    /// The roles of the job's stage containers.
    fn roles(&self) -> &'static [&'static str] {
        if self.settings.helper_image.is_some() {
            &["job", "helper"]
        } else {
            &["job"]
        }
    }

    /// The container of `role`.
    fn container(&self, job: &Job, role: &str) -> String {
        match role {
            "job" => job.names().job(),
            _ => job.names().job_scoped(role),
        }
    }

    /// Makes the job's directory with its labels, first of all: a prepare that stops half-way
    /// leaves something `gc` can find and date.
    fn create_job_dir(&self, job: &Job) -> Result<()> {
        let dir = self.job_dir(job);
        remove_dir(&dir)?;
        std::fs::create_dir_all(&dir).or_system(format_args!("cannot create {}", dir.display()))?;
        let labels = serde_json::to_vec(&job.labels()).or_system("labels")?;
        std::fs::write(dir.join(LABELS_FILE), labels).or_system(format_args!(
            "cannot write {}",
            dir.join(LABELS_FILE).display()
        ))
    }

    /// The labels of this runner's job directories.
    fn job_dirs_labels(&self, runner: &str) -> Vec<BTreeMap<String, String>> {
        let prefix = ResourceNames::runner_prefix(runner);
        let Ok(entries) = std::fs::read_dir(self.settings.state_dir.join("jobs")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|entry| std::fs::read(entry.path().join(LABELS_FILE)).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect()
    }

    /// The project's cache directory on the host, of this runner alone
    /// (`<state_dir>/cache/<runner>/p<project>`, named from the trusted identity, §3.4), mode
    /// 0700 and owned by the user the image runs as: no other project's job, and no other
    /// user of the host, can read or write it.
    async fn cache_bind(&self, engine: &Engine, job: &Job, image: &str) -> Result<String> {
        let dir = drover_core::cache::project_dir(&self.settings.state_dir.join("cache"), job)?;
        let user = engine.image_user(image).await?;
        let owner = numeric_user(&user).unwrap_or_else(|| {
            progress!(
                "*** WARNING: image {image} runs as user {user:?}, not a number: the cache at {CACHE_DIR} is writable by root only"
            );
            (0, 0)
        });
        drover_core::cache::hand_over(&dir, owner)?;
        Ok(format!("{}:{CACHE_DIR}", dir.display()))
    }

    /// Removes everything of this job: found by its labels, so a container from an attempt
    /// that crashed half-way goes too.
    async fn remove_job(&self, engine: &Engine, job: &Job) -> Result<()> {
        self.remove_by_job_label(engine, &job.identity().job_id.to_string())
            .await?;
        engine
            .remove_volume(&job.names().job_scoped("builds"))
            .await?;
        remove_dir(&self.job_dir(job))
    }

    /// Removes this runner's containers and volumes of job `job_id`; another runner's jobs of
    /// the same id are left alone.
    async fn remove_by_job_label(&self, engine: &Engine, job_id: &str) -> Result<()> {
        let labels = [(LABEL_RUNNER, self.runner.as_str()), (LABEL_JOB, job_id)];
        let containers = engine.containers_with(&labels).await?;
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
        for (volume, _) in engine.volumes_with(&labels).await? {
            engine.remove_volume(&volume).await?;
        }
        Ok(())
    }
}

/// The file holding a job directory's labels.
const LABELS_FILE: &str = "drover-job.json";

/// The name of the job whose resource carries `labels`, as prepare named it.
fn job_name(runner: &str, labels: &BTreeMap<String, String>) -> Option<String> {
    let id = |label| labels.get(label)?.parse().ok();
    let identity = drover_core::protocol::TrustedIdentity {
        job_id: id(LABEL_JOB)?,
        project_id: id(LABEL_PROJECT)?,
    };
    Some(ResourceNames::new(runner, identity, 0).job())
}

/// Removes a directory of the driver's; one that is gone is fine.
fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(Error::system(format!(
            "cannot remove {}: {err}",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// `uid[:gid]` of an image's `USER` when it is numbers (or empty: root).
fn numeric_user(user: &str) -> Option<(u32, u32)> {
    if user.is_empty() {
        return Some((0, 0));
    }
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// The engine's CPU and memory limits for a container.
fn limits(cpus: Option<f64>, memory: Option<u64>) -> HostConfig {
    HostConfig {
        // The policy keeps CPUs at 0.01 or more, so this is never 0 ("no limit").
        nano_cpus: cpus.map(|cpus| (cpus * 1e9).round() as i64),
        memory: memory.and_then(|m| i64::try_from(m).ok()),
        ..HostConfig::default()
    }
}

/// A container that runs the job's stages, with the stage agent as PID 1 (see `stages`).
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
        entrypoint: Some(stages::entrypoint(shell)),
        cmd: None,
        labels: Some(labels),
        host_config: Some(HostConfig {
            // The stages' output reaches the job log through the channel; nothing the
            // container writes elsewhere needs keeping.
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
