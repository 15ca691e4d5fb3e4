//! `drover-lxd`: each GitLab job in its own LXD (or Incus) instance, through the REST API on
//! the daemon's unix socket or over HTTPS to a remote daemon (see `tls`). No `lxc` or `incus`
//! CLI is involved.
//!
//! Per job one instance, `drover-<runner>-p<project>-j<job>`, named from the job's trusted
//! identity and labelled with `user.drover.*` config keys (runner, project, job, expiry) for
//! `gc`. Stages go through the core's stage channel: to an agent in the instance where it can
//! share a host directory, else to an exec each (see `stages`). The cache is a disk device at
//! `/cache`, one per runner and project, so it survives the instance (contract §8). Section numbers (§) refer to `contract.md`.

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
mod spares;
mod stages;
mod tls;

use api::{Lxd, Remote};
use drover_core::channel::{ChannelDir, MOUNT};
use spares::Pool;

/// The `builds_dir` inside every instance (§2).
const BUILDS_DIR: &str = "/builds";
/// The `cache_dir` inside every instance: the project's cache device (§8).
const CACHE_DIR: &str = "/cache";
/// Where the operator's `gitlab-runner` goes when the image lacks one (§8).
const RUNNER_IN_INSTANCE: &str = "/usr/local/bin/gitlab-runner";
/// LXD keeps user metadata in config keys with this prefix.
const CONFIG_PREFIX: &str = "user.";

/// The LXD config key of a drover label (`drover.runner` → `user.drover.runner`).
fn config_key(label: &str) -> String {
    format!("{CONFIG_PREFIX}{label}")
}

/// The `[driver]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LxdSettings {
    /// The API socket; default: LXD's (Debian's, then the snap's), then Incus's.
    #[serde(default)]
    socket: Option<PathBuf>,
    /// A remote daemon instead, `https://host[:port]` (port 8443 by default), reached with
    /// `client_cert` and `client_key` and trusted by `server_fingerprint`.
    #[serde(default)]
    url: Option<String>,
    /// PEM certificate the remote daemon trusts (`lxc config trust add` on the server).
    #[serde(default)]
    client_cert: Option<PathBuf>,
    /// The PEM private key of `client_cert`.
    #[serde(default)]
    client_key: Option<PathBuf>,
    /// SHA-256 fingerprint of the remote daemon's certificate (`certificate_fingerprint` in
    /// `lxc info` on the server); no other certificate is accepted.
    #[serde(default)]
    server_fingerprint: Option<String>,
    /// The storage pool of a remote daemon's cache volumes (`drover-<runner>-p<project>-cache`).
    #[serde(default = "default_storage_pool")]
    storage_pool: String,
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
    /// Stopped instances kept ready per image, so a job starts one instead of waiting for a
    /// create (see `spares`); 0 creates an instance per job.
    #[serde(default)]
    idle_count: usize,
}

fn default_instance_type() -> String {
    "container".into()
}

fn default_profiles() -> Vec<String> {
    vec!["default".into()]
}

fn default_storage_pool() -> String {
    "default".into()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/drover-lxd")
}

fn default_ready_secs() -> u64 {
    60
}

struct LxdDriver {
    settings: LxdSettings,
    runner: String,
}

impl Driver for LxdDriver {
    const NAME: &'static str = "drover-lxd";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Settings = LxdSettings;

    fn new(settings: &Settings<LxdSettings>) -> Result<Self> {
        let instance_type = &settings.driver.instance_type;
        if instance_type != "container" && instance_type != "virtual-machine" {
            return Err(Error::system(format!(
                "[driver] instance_type {instance_type:?} is neither \"container\" nor \"virtual-machine\""
            )));
        }
        Ok(LxdDriver {
            settings: settings.driver.clone(),
            runner: settings.runner_name.clone(),
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
        let lxd = self.connect()?;
        progress!("Using {} at {}", lxd.describe().await?, lxd.endpoint);
        let Some(fingerprint) = lxd.image_fingerprint(&image).await? else {
            return Err(Error::system(format!(
                "no LXD image {image:?} (for the job's image {requested:?}); import it or map the name in [driver] images"
            )));
        };
        let name = job.names().job();
        // An instance of the same name can only be left from an earlier attempt (§5.1).
        lxd.delete(&name).await?;

        let channel = self.channel_path(&name);
        // The fast stage path needs FIFOs shared with the instance: a container of a daemon on
        // this host (see `stages`).
        let shared = lxd.is_local() && self.settings.instance_type == "container";
        ChannelDir::remove(&channel);
        if shared {
            ChannelDir::create(&channel)?;
        }
        let body = self.instance_body(&lxd, job, &fingerprint, shared).await?;
        let pool = Pool {
            lxd: &lxd,
            runner: &self.runner,
            fingerprint: &fingerprint,
            size: self.settings.idle_count,
            instance_type: &self.settings.instance_type,
            profiles: &self.settings.profiles,
        };
        let spare = match pool.size {
            0 => None,
            _ => pool.claim(&name, &body).await,
        };
        match spare {
            Some(spare) => progress!("Using ready instance {spare} (made from {image}) as {name}"),
            None => {
                progress!("Creating instance {name} from {image}");
                // A cancelled earlier attempt may have left its create running inside LXD (the
                // core does not wait for it, §6.3): if the name is taken again, remove it and
                // retry.
                let create = || async {
                    let Err(err) = lxd.create(&body).await else {
                        return Ok(());
                    };
                    match lxd.instance(&name).await {
                        // The name was taken after all.
                        Ok(_) => {
                            lxd.delete(&name).await?;
                            Err(Error::transient(format!(
                                "instance {name} was still being created by an earlier attempt"
                            )))
                        }
                        Err(_) => Err(err),
                    }
                };
                let deadline = Some(job.deadline());
                retry(
                    "creating the instance",
                    Backoff::default(),
                    deadline,
                    job.cancel_token(),
                    create,
                )
                .await?;
            }
        }
        self.start(&lxd, job, &pool, shared, started).await
    }

    /// The script goes to the instance's stage agent when prepare started one (see `stages`);
    /// otherwise it runs with an exec.
    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        let name = job.names().job();
        let connect = || self.connect();
        let exec = stages::InstanceExec::new(&name, &connect);
        let body = script.read().await?;
        drover_core::channel::run_in(
            &exec,
            &self.channel_path(&name),
            &self.settings.shell,
            &body,
            job.cancel_token(),
        )
        .await
    }

    async fn cleanup(&self, job: &Job) -> Result<()> {
        let name = job.names().job();
        self.connect()?.delete(&name).await?;
        ChannelDir::remove(&self.channel_path(&name));
        Ok(())
    }

    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let lxd = self.connect()?;
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
            if labels.get(LABEL_RUNNER) != Some(&request.runner) {
                continue;
            }
            let name = instance["name"].as_str().unwrap_or_default().to_owned();
            // Spares have no job and do not expire; they go when the pool is switched off.
            if labels.contains_key(spares::SPARE_LABEL) {
                if self.settings.idle_count > 0 {
                    report.kept += 1;
                } else {
                    if !request.dry_run {
                        lxd.delete(&name).await?;
                    }
                    report.removed.push(name);
                }
                continue;
            }
            if !labels.contains_key(LABEL_JOB) {
                continue;
            }
            if !is_expired(&labels, &request.runner, request.now) {
                report.kept += 1;
                continue;
            }
            if !request.dry_run {
                lxd.delete(&name).await?;
                ChannelDir::remove(&self.channel_path(&name));
            }
            report.removed.push(name);
        }
        Ok(report)
    }

    async fn doctor(&self) -> Result<Vec<Check>> {
        let lxd = match self.connect() {
            Ok(lxd) => lxd,
            Err(err) => return Ok(vec![Check::failed("api", err.to_string())]),
        };
        let mut checks = vec![match lxd.describe().await {
            Ok(version) => Check::ok("api", format!("{version} at {}", lxd.endpoint)),
            Err(err) => return Ok(vec![Check::failed("api", err.to_string())]),
        }];
        for profile in &self.settings.profiles {
            checks.push(match lxd.get(&format!("/1.0/profiles/{profile}")).await {
                Ok(found) => match found["devices"]["root"]["pool"].as_str() {
                    Some(pool) => {
                        Check::ok("profile", format!("{profile}, root disk on pool {pool}"))
                    }
                    None => Check::ok(
                        "profile",
                        format!("{profile} (no root disk: another profile must give one)"),
                    ),
                },
                Err(err) => Check::failed("profile", err.to_string()),
            });
        }
        if !lxd.is_local() {
            let pool = &self.settings.storage_pool;
            checks.push(match lxd.get(&format!("/1.0/storage-pools/{pool}")).await {
                Ok(_) => Check::ok("storage_pool", format!("{pool} (cache volumes)")),
                Err(err) => Check::failed("storage_pool", err.to_string()),
            });
        }
        for (job_image, image) in &self.settings.images {
            checks.push(match lxd.image_fingerprint(image).await {
                Ok(Some(_)) => Check::ok("image", format!("{job_image} -> {image}")),
                Ok(None) => Check::failed(
                    "image",
                    format!("{image} (for {job_image}) is not imported; `lxc image import` it"),
                ),
                Err(err) => Check::failed("image", err.to_string()),
            });
        }
        if let Some(binary) = &self.settings.gitlab_runner_binary {
            checks.push(Check::gitlab_runner_binary(binary));
        }
        if lxd.is_local() {
            let cache = self.settings.state_dir.join("cache");
            checks.push(match std::fs::create_dir_all(&cache) {
                Ok(()) => Check::ok("cache", cache.display().to_string()),
                Err(err) => {
                    Check::failed("cache", format!("cannot create {}: {err}", cache.display()))
                }
            });
        }
        Ok(checks)
    }
}

impl LxdDriver {
    /// The create body of the job's instance: its labels and limits, the cache, the stage
    /// directory when shared, the operator's devices and the offered mounts.
    async fn instance_body(
        &self,
        lxd: &Lxd,
        job: &Job,
        fingerprint: &str,
        shared: bool,
    ) -> Result<Value> {
        let resources = job.resources()?;
        let mut config: serde_json::Map<String, Value> = job
            .labels()
            .into_iter()
            .map(|(key, value)| (config_key(&key), Value::String(value)))
            .collect();
        if let Some(cpus) = resources.cpus {
            config.insert("limits.cpu".into(), json!(cpus.ceil().max(1.0).to_string()));
        }
        if let Some(memory) = resources.memory_bytes {
            config.insert("limits.memory".into(), json!(memory.to_string()));
        }
        let mut devices = serde_json::Map::new();
        devices.insert("drover-cache".into(), self.cache_device(lxd, job).await?);
        if shared {
            // Read-only: the job can use the FIFOs in it, never change what is there (see
            // `drover_core::channel::ChannelDir`).
            devices.insert(
                "drover-io".into(),
                json!({"type": "disk", "source": self.channel_path(&job.names().job()).display().to_string(), "path": MOUNT, "readonly": "true"}),
            );
        }
        for (device, options) in &self.settings.devices {
            devices.insert(device.clone(), json!(options));
        }
        for (index, mount) in resources.mounts.iter().enumerate() {
            devices.insert(
                format!("drover-mount-{index}"),
                json!({"type": "disk", "source": mount.source, "path": mount.target, "readonly": mount.read_only.to_string()}),
            );
        }
        Ok(json!({
            "name": job.names().job(),
            "type": self.settings.instance_type,
            "source": {"type": "image", "fingerprint": fingerprint},
            "profiles": self.settings.profiles,
            "config": config,
            "devices": devices,
        }))
    }

    /// Starts the job's instance (created or taken from the spares), waits until it runs
    /// commands, starts the stage agent when the instance shares its channel directory,
    /// copies gitlab-runner in when needed, and tops the spares up again.
    async fn start(
        &self,
        lxd: &Lxd,
        job: &Job,
        pool: &Pool<'_>,
        shared: bool,
        started: Instant,
    ) -> Result<()> {
        let name = job.names().job();
        if lxd.is_local() {
            let owner = root_owner(&lxd.instance(&name).await?);
            drover_core::cache::hand_over(&self.cache_dir(job)?, owner)?;
        }
        lxd.set_state(&name, "start").await?;
        self.wait_until_ready(lxd, &name, job).await?;
        if shared {
            let connect = || self.connect();
            let exec = stages::InstanceExec::with_client(&name, lxd, &connect);
            let channel = self.channel_path(&name);
            drover_core::channel::settle_agent(&exec, &channel, &self.settings.shell, true).await?;
        }
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
        if pool.size > 0 {
            pool.replenish().await;
        }
        progress!("Ready in {:.2} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// A client of the configured daemon: the remote one when `url` is set, else the socket.
    fn connect(&self) -> Result<Lxd> {
        let settings = &self.settings;
        let Some(url) = &settings.url else {
            return Lxd::connect(settings.socket.as_deref());
        };
        let missing = |key: &str| {
            Error::system(format!(
                "[driver] url is set, so {key} is needed too (see examples/config/drover-lxd.toml)"
            ))
        };
        Lxd::connect_https(&Remote {
            url,
            client_cert: settings
                .client_cert
                .as_deref()
                .ok_or_else(|| missing("client_cert"))?,
            client_key: settings
                .client_key
                .as_deref()
                .ok_or_else(|| missing("client_key"))?,
            server_fingerprint: settings
                .server_fingerprint
                .as_deref()
                .ok_or_else(|| missing("server_fingerprint"))?,
        })
    }

    /// The host side of instance `name`'s channel directory.
    fn channel_path(&self, name: &str) -> PathBuf {
        stages::channel_path(&self.settings.state_dir, name)
    }

    /// The cache at `/cache`, one per runner and project, named from the trusted identity
    /// (§3.4) so a job sees no other project's cache (§8): a host directory of a local daemon,
    /// a custom storage volume of a remote one (whose host paths the driver cannot reach).
    async fn cache_device(&self, lxd: &Lxd, job: &Job) -> Result<Value> {
        if lxd.is_local() {
            let dir = self.cache_dir(job)?;
            return Ok(
                json!({"type": "disk", "source": dir.display().to_string(), "path": CACHE_DIR}),
            );
        }
        let volume = job.names().project_scoped("cache");
        lxd.ensure_volume(&self.settings.storage_pool, &volume)
            .await?;
        Ok(
            json!({"type": "disk", "pool": self.settings.storage_pool, "source": volume, "path": CACHE_DIR}),
        )
    }

    /// The project's host cache directory of this runner, private; prepare hands it to the
    /// instance's root before the instance starts.
    fn cache_dir(&self, job: &Job) -> Result<PathBuf> {
        drover_core::cache::project_dir(&self.settings.state_dir.join("cache"), job)
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

/// The host uid and gid of an instance's root, from its id map (`volatile.idmap.next`, which
/// becomes `volatile.idmap.current` when it starts: LXD's JSON list of ranges); a privileged
/// container has none and is root itself.
fn root_owner(instance: &Value) -> (u32, u32) {
    let config = &instance["config"];
    let map = ["volatile.idmap.next", "volatile.idmap.current"]
        .iter()
        .find_map(|key| config[*key].as_str())
        .and_then(|text| serde_json::from_str::<Vec<Value>>(text).ok())
        .unwrap_or_default();
    let host_id_of_root = |uid: bool| {
        map.iter()
            .find(|range| range[if uid { "Isuid" } else { "Isgid" }] == true && range["Nsid"] == 0)
            .and_then(|range| range["Hostid"].as_u64())
            .and_then(|id| u32::try_from(id).ok())
            .unwrap_or(0)
    };
    (host_id_of_root(true), host_id_of_root(false))
}

fn main() -> std::process::ExitCode {
    drover_core::run::<LxdDriver>()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;

    #[test]
    fn the_root_of_an_unprivileged_container_is_its_mapped_host_id() {
        let map = r#"[{"Isuid":true,"Isgid":false,"Hostid":100000,"Nsid":0,"Maprange":65536},{"Isuid":false,"Isgid":true,"Hostid":200000,"Nsid":0,"Maprange":65536}]"#;
        let instance = json!({"config": {"volatile.idmap.next": map}});
        assert_eq!(root_owner(&instance), (100_000, 200_000));
        let started = json!({"config": {"volatile.idmap.current": map}});
        assert_eq!(root_owner(&started), (100_000, 200_000));
    }

    #[test]
    fn a_privileged_container_has_no_map_and_its_root_is_root() {
        assert_eq!(
            root_owner(&json!({"config": {"volatile.idmap.current": "[]"}})),
            (0, 0)
        );
        assert_eq!(root_owner(&json!({"config": {}})), (0, 0));
    }

    #[test]
    fn the_example_settings_load_and_a_remote_needs_its_credentials() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/config/drover-lxd.toml");
        let settings = Settings::<LxdSettings>::load(Some(&example), &BTreeMap::new())
            .expect("the example loads");
        assert_eq!(
            settings.driver.images["debian:bookworm"],
            "ci/debian-bookworm"
        );

        let mut remote = settings.driver.clone();
        remote.url = Some("https://127.0.0.1:8443".into());
        let err = LxdDriver {
            settings: remote,
            runner: settings.runner_name.clone(),
        }
        .connect()
        .err()
        .expect("no credentials");
        assert!(
            err.to_string().contains("so client_cert is needed too"),
            "{err}"
        );
    }
}
