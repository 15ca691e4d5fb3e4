//! `drover-lxd`: each GitLab job in its own LXD (or Incus) instance, through the REST API on
//! the daemon's unix socket. No `lxc` or `incus` CLI is involved.
//!
//! Per job one instance, `drover-<runner>-p<project>-j<job>`, named from the job's trusted
//! identity and labelled with `user.drover.*` config keys (runner, project, job, expiry) for
//! `gc`. The cache is a host directory attached as a disk device at `/cache`, so it survives
//! the instance (contract §8). Section numbers (§) refer to `contract.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use drover_core::naming::{LABEL_JOB, LABEL_RUNNER, is_expired};
use drover_core::protocol::ConfigOutput;
use drover_core::{
    Backoff, Check, Driver, Error, GcReport, GcRequest, Job, Result, ResultExt, Script, Settings,
    fresh_environment_config, progress, retry,
};
use serde::Deserialize;
use serde_json::{Value, json};

mod api;

use api::Lxd;

/// The `builds_dir` inside every instance (§2).
const BUILDS_DIR: &str = "/builds";
/// The `cache_dir` inside every instance: a host directory (§8).
const CACHE_DIR: &str = "/cache";
/// Where the operator's `gitlab-runner` goes when the image lacks one (§8).
const RUNNER_IN_INSTANCE: &str = "/usr/local/bin/gitlab-runner";
/// LXD keeps user metadata in config keys with this prefix.
const CONFIG_PREFIX: &str = "user.";

/// The `[driver]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LxdSettings {
    /// The API socket; default: LXD's (Debian's, then the snap's), then Incus's.
    #[serde(default)]
    socket: Option<PathBuf>,
    /// Job `image:` names mapped to an LXD image alias or fingerprint; names not listed are
    /// used as aliases as they are.
    #[serde(default)]
    images: BTreeMap<String, String>,
    /// `container` or `virtual-machine`.
    #[serde(default = "default_instance_type")]
    instance_type: String,
    /// Profiles applied to every instance.
    #[serde(default = "default_profiles")]
    profiles: Vec<String>,
    /// A `gitlab-runner` binary on the host, copied into instances whose image lacks one, so
    /// cache and artifacts are never silently skipped (§8, §10 item 14).
    #[serde(default)]
    gitlab_runner_binary: Option<PathBuf>,
    /// Host directory for the cache (`<state_dir>/cache`).
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    /// The interpreter of the runner's scripts (§7).
    #[serde(default = "drover_core::settings::default_shell")]
    shell: String,
    /// Extra LXD devices for every instance, as LXD takes them, e.g. a proxy that lets jobs
    /// reach a service on the host: `[driver.devices.gitlab] type = "proxy"
    /// listen = "tcp:127.0.0.1:8080" connect = "tcp:127.0.0.1:8080" bind = "container"`.
    #[serde(default)]
    devices: BTreeMap<String, BTreeMap<String, String>>,
    /// How long prepare waits for a new instance to accept exec.
    #[serde(default = "default_ready_secs")]
    ready_secs: u64,
}

fn default_instance_type() -> String {
    "container".into()
}

fn default_profiles() -> Vec<String> {
    vec!["default".into()]
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/drover-lxd")
}

fn default_ready_secs() -> u64 {
    60
}

struct LxdDriver {
    settings: LxdSettings,
}

impl Driver for LxdDriver {
    const NAME: &'static str = "drover-lxd";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Settings = LxdSettings;

    fn new(settings: &Settings<LxdSettings>) -> Result<Self> {
        Ok(LxdDriver {
            settings: settings.driver.clone(),
        })
    }

    /// A fresh instance per job: the builds dir is never shared (§2, §10 item 6).
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
        let resources = job.resources()?;
        let requested = resources.required_image()?;
        let image = self
            .settings
            .images
            .get(&requested)
            .cloned()
            .unwrap_or_else(|| requested.clone());
        let lxd = Lxd::connect(self.settings.socket.as_deref())?;
        progress!("Using {} at {}", lxd.describe().await?, lxd.endpoint);
        if !lxd.image_exists(&image).await? {
            return Err(Error::system(format!(
                "no LXD image {image:?} (for the job's image {requested:?}); import it or map the name in [driver] images"
            )));
        }
        let name = job.names().job();
        // An instance of the same name can only be left from an earlier attempt (§5.1).
        lxd.delete(&name).await?;

        let mut config: serde_json::Map<String, Value> = job
            .labels()
            .into_iter()
            .map(|(key, value)| (format!("{CONFIG_PREFIX}{key}"), Value::String(value)))
            .collect();
        if let Some(cpus) = resources.cpus {
            config.insert("limits.cpu".into(), json!(cpus.ceil().max(1.0).to_string()));
        }
        if let Some(memory) = resources.memory_bytes {
            config.insert("limits.memory".into(), json!(memory.to_string()));
        }
        let mut devices = serde_json::Map::new();
        devices.insert(
            "drover-cache".into(),
            json!({"type": "disk", "source": self.cache_dir()?.display().to_string(), "path": CACHE_DIR}),
        );
        for (device, options) in &self.settings.devices {
            devices.insert(device.clone(), json!(options));
        }
        for (index, mount) in resources.mounts.iter().enumerate() {
            devices.insert(
                format!("drover-mount-{index}"),
                json!({"type": "disk", "source": mount.source, "path": mount.target, "readonly": mount.read_only.to_string()}),
            );
        }
        let body = json!({
            "name": name,
            "type": self.settings.instance_type,
            "source": {"type": "image", "alias": image},
            "profiles": self.settings.profiles,
            "config": config,
            "devices": devices,
        });
        progress!("Creating instance {name} from {image}");
        // A cancelled earlier attempt may have left its create running inside LXD (the core
        // does not wait for it, §6.3): if the name is taken again, remove it and retry.
        let create = || async {
            match lxd.create(&body).await {
                Err(err) if err.to_string().contains("already exists") => {
                    lxd.delete(&name).await?;
                    Err(Error::transient(format!(
                        "instance {name} was still being created by an earlier attempt"
                    )))
                }
                other => other,
            }
        };
        retry(
            "creating the instance",
            Backoff::default(),
            Some(job.deadline()),
            job.cancel_token(),
            create,
        )
        .await?;
        lxd.set_state(&name, "start").await?;
        self.wait_until_ready(&lxd, &name, job).await?;
        if let Some(binary) = &self.settings.gitlab_runner_binary {
            if !lxd.file_exists(&name, RUNNER_IN_INSTANCE).await? {
                progress!("Copying gitlab-runner into the instance (the image has none)");
                let bytes = tokio::fs::read(binary).await.or_system(format_args!(
                    "cannot read gitlab_runner_binary {}",
                    binary.display()
                ))?;
                lxd.push_file(&name, RUNNER_IN_INSTANCE, bytes, "0755")
                    .await?;
            }
        }
        progress!("Ready in {:.2} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The script is copied in with the files API and run by the job's shell in a session of
    /// its own (setsid), so a cancel can stop its whole process group inside the instance.
    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        let lxd = Lxd::connect(self.settings.socket.as_deref())?;
        let name = job.names().job();
        let stage = format!("/tmp/drover-{:016x}", fastrand::u64(..));
        lxd.push_file(&name, &format!("{stage}.sh"), script.read().await?, "0700")
            .await?;
        let wrapper = format!(
            "echo $$ > {stage}.pid; \"$0\" {stage}.sh </dev/null; status=$?; rm -f {stage}.sh {stage}.pid; exit $status"
        );
        let stop = format!(
            "kill -TERM -- -$(cat {stage}.pid) 2>/dev/null; sleep 1; kill -KILL -- -$(cat {stage}.pid) 2>/dev/null; true"
        );
        lxd.exec_streaming(
            &name,
            &[
                "setsid",
                "-w",
                &self.settings.shell,
                "-c",
                &wrapper,
                &self.settings.shell,
            ],
            job.cancel_token(),
            &["sh", "-c", &stop],
        )
        .await
    }

    async fn cleanup(&self, job: &Job) -> Result<()> {
        Lxd::connect(self.settings.socket.as_deref())?
            .delete(&job.names().job())
            .await
    }

    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let lxd = Lxd::connect(self.settings.socket.as_deref())?;
        let mut report = GcReport::default();
        for instance in lxd.instances().await? {
            let labels: BTreeMap<String, String> = instance["config"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(key, value)| {
                    Some((
                        key.strip_prefix(CONFIG_PREFIX)?.to_owned(),
                        value.as_str()?.to_owned(),
                    ))
                })
                .collect();
            if labels.get(LABEL_RUNNER) != Some(&request.runner) || !labels.contains_key(LABEL_JOB)
            {
                continue;
            }
            let name = instance["name"].as_str().unwrap_or_default().to_owned();
            if !is_expired(&labels, &request.runner, request.now) {
                report.kept += 1;
                continue;
            }
            if !request.dry_run {
                lxd.delete(&name).await?;
            }
            report.removed.push(name);
        }
        Ok(report)
    }

    async fn doctor(&self) -> Result<Vec<Check>> {
        let lxd = match Lxd::connect(self.settings.socket.as_deref()) {
            Ok(lxd) => lxd,
            Err(err) => return Ok(vec![Check::failed("api", err.to_string())]),
        };
        let mut checks = vec![match lxd.describe().await {
            Ok(version) => Check::ok("api", format!("{version} at {}", lxd.endpoint)),
            Err(err) => return Ok(vec![Check::failed("api", err.to_string())]),
        }];
        for (job_image, image) in &self.settings.images {
            checks.push(match lxd.image_exists(image).await {
                Ok(true) => Check::ok("image", format!("{job_image} -> {image}")),
                Ok(false) => Check::failed(
                    "image",
                    format!("{image} (for {job_image}) is not imported; `lxc image import` it"),
                ),
                Err(err) => Check::failed("image", err.to_string()),
            });
        }
        if let Some(binary) = &self.settings.gitlab_runner_binary {
            checks.push(if binary.is_file() {
                Check::ok("gitlab_runner_binary", binary.display().to_string())
            } else {
                Check::failed(
                    "gitlab_runner_binary",
                    format!("{} is not a file", binary.display()),
                )
            });
        }
        checks.push(match self.cache_dir() {
            Ok(dir) => Check::ok("cache", dir.display().to_string()),
            Err(err) => Check::failed("cache", err.to_string()),
        });
        Ok(checks)
    }
}

impl LxdDriver {
    /// The host cache directory, writable by the shifted root of unprivileged containers.
    fn cache_dir(&self) -> Result<PathBuf> {
        let dir = self.settings.state_dir.join("cache");
        std::fs::create_dir_all(&dir).or_system(format_args!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .or_system(format_args!("cannot set the mode of {}", dir.display()))?;
        Ok(dir)
    }

    /// Waits, bounded, until the new instance runs commands.
    async fn wait_until_ready(&self, lxd: &Lxd, name: &str, job: &Job) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(self.settings.ready_secs);
        loop {
            if matches!(lxd.exec_quiet(name, &["true"]).await, Ok(0)) {
                return Ok(());
            }
            if Instant::now() > deadline || job.is_cancelled() {
                return Err(Error::system(format!(
                    "instance {name} did not accept commands within {} s (ready_secs)",
                    self.settings.ready_secs
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn main() -> std::process::ExitCode {
    drover_core::run::<LxdDriver>()
}
