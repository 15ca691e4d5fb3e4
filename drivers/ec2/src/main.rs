//! `drover-ec2`: each GitLab job on an AWS EC2 instance of its own, reached over SSH, with a
//! warm pool of instances launched ahead of demand. Section numbers (§) refer to
//! `contract.md`.
//!
//! - Instances are launched through the official SDK with every tag in the launch call itself
//!   (runner, intent, job, project, expiry), so an instance is findable by `gc` from the moment
//!   it exists, even when the driver was killed during the call. Spot pools are tried first
//!   when the market allows it, then on-demand; throttling backs off; a settings error fails
//!   at once and launches nothing (`ec2`).
//! - Which instance a job gets, and when idle ones are launched or removed, is the core's
//!   warm pool ([`drover_core::pool`]) with this driver as its provider; its journal is in the
//!   state directory.
//! - A key pair is made per launch on the runner host and its public half given to the
//!   instances in their user data; the host key is pinned on first contact. Stages go through
//!   the core's stage channel over one SSH connection per job ([`drover_core::ssh`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use drover_core::channel::{PerStageExec, run_stage};
use drover_core::naming::{LABEL_EXPIRES, LABEL_JOB, LABEL_PROJECT, LABEL_RUNNER};
use drover_core::pool::{Intent, Journal, Lease, Observed, Pool, PoolSettings, Provider};
use drover_core::protocol::ConfigOutput;
use drover_core::ssh::{Ssh, SshTarget, make_key};
use drover_core::{
    Check, Driver, Error, GcReport, GcRequest, Job, Result, ResultExt, Script, Settings,
    fresh_environment_config, progress,
};
use serde::{Deserialize, Serialize};

mod ec2;

use ec2::{Ec2, Seen};

/// Tag: the launch (pool intent) an instance came from.
const TAG_INTENT: &str = "drover.intent";
/// Tag: the fingerprint of the launch settings.
const TAG_KEY: &str = "drover.pool";
/// Tag: how many jobs the instance was leased to.
const TAG_USES: &str = "drover.uses";

/// How long cleanup waits for the instance of a launch cut off by a stopped prepare to show
/// up in EC2's list.
const LAUNCH_SHOWS_UP: Duration = Duration::from_secs(15);

/// How long a stage waits to connect again when the job's connection is gone.
const RECONNECT: Duration = Duration::from_secs(30);

/// A launch template, by id or name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchTemplate {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    /// `$Default` when missing.
    #[serde(default)]
    version: Option<String>,
}

/// The root volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootVolume {
    /// The AMI's root device name.
    #[serde(default = "default_device")]
    device_name: String,
    #[serde(default)]
    size_gb: Option<i32>,
    /// `gp3`, `gp2`, `io2`...
    #[serde(default)]
    volume_type: Option<String>,
    #[serde(default)]
    encrypted: Option<bool>,
}

fn default_device() -> String {
    "/dev/xvda".into()
}

/// The `[driver]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Settings {
    /// The region (else the SDK's chain: `AWS_REGION`, the profile).
    #[serde(default)]
    region: Option<String>,
    /// Another EC2 endpoint (a VPC endpoint, a test double).
    #[serde(default)]
    endpoint: Option<String>,
    /// A named profile of the shared AWS config files.
    #[serde(default)]
    profile: Option<String>,
    /// Static credentials (docker+machine's `amazonec2-access-key`); better from the SDK's
    /// chain (an instance role, `AWS_*` variables) or `DROVER_DRIVER__SECRET_ACCESS_KEY`.
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<String>,
    /// The AMI (unless the launch template has one).
    #[serde(default)]
    ami: Option<String>,
    #[serde(default)]
    launch_template: Option<LaunchTemplate>,
    /// Instance types, tried in order on capacity errors.
    #[serde(default)]
    instance_types: Vec<String>,
    /// Subnets, tried in order on capacity errors.
    #[serde(default)]
    subnets: Vec<String>,
    /// Security group ids.
    #[serde(default)]
    security_groups: Vec<String>,
    /// An instance profile name or ARN.
    #[serde(default)]
    iam_instance_profile: Option<String>,
    #[serde(default)]
    root_volume: Option<RootVolume>,
    /// `on-demand`, `spot`, or `spot-then-on-demand`.
    #[serde(default = "default_market")]
    market: String,
    /// The highest spot price per hour (the on-demand price when missing).
    #[serde(default)]
    max_spot_price: Option<String>,
    /// More tags on every instance, volume and network interface.
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// A shell script run at first boot after the driver's own user data (it must start with
    /// `#!`).
    #[serde(default)]
    user_data: Option<PathBuf>,
    /// The user stages run as.
    #[serde(default = "default_user")]
    ssh_user: String,
    #[serde(default = "default_port")]
    ssh_port: u16,
    /// `private`, `public`, or a template of `{private_ip}`, `{public_ip}`, `{private_dns}`,
    /// `{public_dns}`, `{instance_id}` and `{tag:KEY}`, optionally with `:PORT`.
    #[serde(default = "default_address")]
    address: String,
    /// A jump host, `[user@]host[:port]`.
    #[serde(default)]
    jump_host: Option<String>,
    /// An OpenSSH client configuration file for the driver's connections.
    #[serde(default)]
    ssh_config: Option<PathBuf>,
    /// How long prepare waits for a launched instance to accept SSH.
    #[serde(default = "default_boot_secs")]
    boot_secs: u64,
    /// With `pool.max_builds > 1`: the command that readies an instance for its next job;
    /// it must exit 0, or the instance is terminated.
    #[serde(default)]
    reset_command: Option<String>,
    /// The warm pool: `idle_count`, `idle_time`, `max_builds`, `max_instances`, `periods`.
    #[serde(default)]
    pool: PoolSettings,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_builds_dir")]
    builds_dir: String,
    #[serde(default = "default_cache_dir")]
    cache_dir: String,
    /// The interpreter of the runner's scripts (§7).
    #[serde(default = "drover_core::settings::default_shell")]
    shell: String,
}

fn default_market() -> String {
    "on-demand".into()
}
fn default_user() -> String {
    "root".into()
}
fn default_port() -> u16 {
    22
}
fn default_address() -> String {
    "private".into()
}
fn default_boot_secs() -> u64 {
    300
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/drover-ec2")
}
fn default_builds_dir() -> String {
    "/builds".into()
}
fn default_cache_dir() -> String {
    "/cache".into()
}

struct Ec2Driver {
    settings: Ec2Settings,
    runner: String,
    /// The launch settings' fingerprint: instances launched with other settings are not used.
    key: String,
    user_data: Option<String>,
}

impl Driver for Ec2Driver {
    const NAME: &'static str = "drover-ec2";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Settings = Ec2Settings;

    fn new(settings: &Settings<Ec2Settings>) -> Result<Self> {
        let driver = &settings.driver;
        if !["on-demand", "spot", "spot-then-on-demand"].contains(&driver.market.as_str()) {
            return Err(Error::system(format!(
                "[driver] market {:?} is none of \"on-demand\", \"spot\", \"spot-then-on-demand\"",
                driver.market
            )));
        }
        if driver.ami.is_none() && driver.launch_template.is_none() {
            return Err(Error::system(
                "[driver] needs an ami or a launch_template to launch instances from",
            ));
        }
        if let Some(template) = &driver.launch_template {
            if template.id.is_some() == template.name.is_some() {
                return Err(Error::system(
                    "[driver.launch_template] needs exactly one of id and name",
                ));
            }
        }
        if driver.pool.max_builds > 1 && driver.reset_command.is_none() {
            return Err(Error::system(
                "[driver.pool] max_builds > 1 needs a [driver] reset_command that readies an instance for its next job (an instance is never reused unchecked)",
            ));
        }
        driver.pool.validate()?;
        address_template(&driver.address)?;
        let user_data = match &driver.user_data {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).or_system(format_args!(
                    "cannot read [driver] user_data {}",
                    path.display()
                ))?;
                if !text.starts_with("#!") {
                    return Err(Error::system(format!(
                        "[driver] user_data {} must be a script starting with #! (it runs after the driver's own)",
                        path.display()
                    )));
                }
                Some(text)
            }
        };
        // Everything a launch is made of: a change makes idle instances of the old settings go.
        let launch = serde_json::json!([
            driver.ami,
            driver.launch_template,
            driver.instance_types,
            driver.subnets,
            driver.security_groups,
            driver.iam_instance_profile,
            driver.root_volume,
            driver.market,
            driver.max_spot_price,
            driver.tags,
            user_data,
            driver.ssh_user,
            driver.region,
            driver.endpoint,
        ]);
        Ok(Ec2Driver {
            key: drover_core::pool::fingerprint(&launch.to_string()),
            settings: driver.clone(),
            runner: settings.runner_name.clone(),
            user_data,
        })
    }

    /// A fresh instance per job (unless `max_builds` says otherwise): never shared (§2).
    async fn config(&self, job: &Job) -> Result<ConfigOutput> {
        Ok(fresh_environment_config::<Self>(
            job,
            &self.settings.builds_dir,
            &self.settings.cache_dir,
            &self.settings.shell,
        ))
    }

    async fn prepare(&self, job: &Job) -> Result<()> {
        let started = Instant::now();
        let resources = job.resources()?;
        if !resources.mounts.is_empty() {
            return Err(Error::system(
                "drover-ec2 shares no host directory with an instance; remove DROVER_MOUNTS from the job (or the mount from [policy] mounts)",
            ));
        }
        let ec2 = Ec2::connect(&self.settings).await;
        let name = job.names().job();
        let mut tags = job.labels();
        // A lease lasts the job's timeout plus the grace; the tag says so to any gc.
        tags.insert(TAG_USES.into(), "1".into());
        let cloud = Cloud {
            ec2: &ec2,
            driver: self,
            job_tags: Some(tags.clone()),
        };
        let pool = self.pool(&cloud);
        let mut skip = Vec::new();
        let (lease, ssh) = loop {
            let lease = pool.take(&name, job.timeout(), &skip).await?;
            if !lease.launched {
                let mut lease_tags = tags.clone();
                lease_tags.insert(TAG_USES.into(), lease.use_number.to_string());
                ec2.tag(&lease.id, &lease_tags).await?;
            }
            progress!(
                "{} instance {} ({}use {} of {})",
                if lease.launched {
                    "Launched"
                } else {
                    "Using warm"
                },
                lease.id,
                if lease.launched {
                    ""
                } else {
                    "from the pool, "
                },
                lease.use_number,
                self.settings.pool.max_builds
            );
            let reach = self.reach(&ec2, &lease, job).await;
            match reach {
                Ok(ssh) => break (lease, ssh),
                Err(err) if !lease.launched => {
                    progress!(
                        "Instance {} did not answer ({err}); terminating it",
                        lease.id
                    );
                    pool.discard(&lease.id).await?;
                    skip.push(lease.id);
                }
                Err(err) => return Err(err),
            }
        };
        let connected = started.elapsed();
        let setup = self.setup_script();
        let channel = PerStageExec::new(&ssh, "sh");
        let (status, upkeep) = tokio::join!(
            run_stage(&channel, setup.as_bytes(), job.cancel_token()),
            pool.upkeep()
        );
        if let Err(err) = upkeep {
            progress!("The pool's upkeep failed: {err}");
        }
        let status = status?;
        if status != 0 {
            return Err(Error::system(format!(
                "setting up instance {} failed (exit status {status}); see the lines above",
                lease.id
            )));
        }
        progress!(
            "Ready in {:.2} s (instance {}, connected after {:.2} s, {} EC2 calls)",
            started.elapsed().as_secs_f64(),
            lease.id,
            connected.as_secs_f64(),
            ec2.calls()
        );
        Ok(())
    }

    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        let name = job.names().job();
        let journal = Journal::read(&self.settings.state_dir)?;
        let id = journal.leased_to(&name).ok_or_else(|| {
            Error::system(format!(
                "job {name} has no instance: its prepare did not finish"
            ))
        })?;
        let ssh = self.ssh_of(&id, &journal)?;
        let body = script.read().await?;
        let result = match ssh.ensure(RECONNECT, job.cancel_token()).await {
            Ok(()) => {
                run_stage(
                    &PerStageExec::new(&ssh, &self.settings.shell),
                    &body,
                    job.cancel_token(),
                )
                .await
            }
            Err(err) => Err(err),
        };
        match result {
            Err(err) if !ssh.connected() => Err(self.explain_loss(&id, err).await),
            other => other,
        }
    }

    async fn cleanup(&self, job: &Job) -> Result<()> {
        let name = job.names().job();
        let ec2 = Ec2::connect(&self.settings).await;
        let cloud = Cloud {
            ec2: &ec2,
            driver: self,
            job_tags: None,
        };
        let pool = self.pool(&cloud);
        let journal = pool.load()?;
        if let Some(id) = journal.leased_to(&name) {
            // A prepare stopped before it reached the instance left no connection to end.
            let reusable = match self.ssh_of(&id, &journal) {
                Ok(ssh) => {
                    let reusable = self.settings.pool.max_builds > 1 && self.reset(&ssh, job).await;
                    ssh.close().await;
                    reusable
                }
                Err(_) => false,
            };
            if let Some((id, terminated)) = pool.release(&name, reusable).await? {
                progress!(
                    "{} instance {id}",
                    if terminated {
                        "Terminated"
                    } else {
                        "Returned to the pool:"
                    }
                );
            }
        }
        // A launch for this job that was cut off (the driver stopped during RunInstances) left
        // an instance the journal does not know: its job tag finds it, once EC2 lists it.
        let job_id = job.identity().job_id.to_string();
        let project = job.identity().project_id.to_string();
        let open = pool.launch_open_for(&name)?;
        let deadline = Instant::now()
            + if open {
                LAUNCH_SHOWS_UP
            } else {
                Duration::ZERO
            };
        loop {
            // The pool's own (one this job returned to it) stay.
            let known = pool.load()?.entries;
            let left: Vec<String> = ec2
                .owned(
                    &self.runner,
                    &[(LABEL_JOB, &job_id), (LABEL_PROJECT, &project)],
                )
                .await?
                .into_iter()
                .map(|seen| seen.id)
                .filter(|id| !known.contains_key(id))
                .collect();
            if !left.is_empty() {
                progress!("Terminating {} left by an earlier attempt", left.join(", "));
                ec2.terminate(&left).await?;
                self.forget(&left);
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let upkeep = pool.upkeep().await?;
        self.forget(
            &upkeep
                .terminated
                .iter()
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>(),
        );
        Ok(())
    }

    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let ec2 = Ec2::connect(&self.settings).await;
        if request.dry_run {
            let now = drover_core::pool::unix_now();
            let seen = ec2.owned(&request.runner, &[]).await?;
            let expired: Vec<String> = seen
                .iter()
                .filter(|s| {
                    s.tags
                        .get(LABEL_EXPIRES)
                        .and_then(|at| at.parse::<u64>().ok())
                        .is_some_and(|at| at <= now)
                })
                .map(|s| s.id.clone())
                .collect();
            return Ok(GcReport {
                kept: seen.len() - expired.len(),
                removed: expired,
            });
        }
        let cloud = Cloud {
            ec2: &ec2,
            driver: self,
            job_tags: None,
        };
        let pool = self.pool(&cloud);
        let upkeep = pool.upkeep().await?;
        for (id, why) in &upkeep.terminated {
            progress!("Terminated instance {id}: {why}");
        }
        for id in &upkeep.adopted {
            progress!("Adopted instance {id} into the pool");
        }
        let removed: Vec<String> = upkeep.terminated.iter().map(|(id, _)| id.clone()).collect();
        self.forget(&removed);
        let kept = pool.load()?.entries.len();
        Ok(GcReport { removed, kept })
    }

    async fn doctor(&self) -> Result<Vec<Check>> {
        let ec2 = Ec2::connect(&self.settings).await;
        let mut checks: Vec<Check> = ec2
            .checks(&self.settings)
            .await
            .into_iter()
            .map(|(name, result)| match result {
                Ok(detail) => Check::ok(name, detail),
                Err(fix) => Check::failed(name, fix),
            })
            .collect();
        for tool in ["ssh", "ssh-keygen"] {
            let found = std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
            });
            checks.push(if found {
                Check::ok(tool, "found on PATH")
            } else {
                Check::failed(tool, "not on PATH: install openssh-client")
            });
        }
        Ok(checks)
    }
}

impl Ec2Driver {
    fn pool<'a, P: Provider>(&'a self, provider: &'a P) -> Pool<'a, P> {
        Pool::new(
            &self.settings.state_dir,
            provider,
            &self.settings.pool,
            &self.key,
        )
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.settings.state_dir.join("instances").join(id)
    }

    fn key_dir(&self, intent: &str) -> PathBuf {
        self.settings.state_dir.join("keys").join(intent)
    }

    /// The connection of instance `id`, from its saved address and the key of its launch.
    fn ssh_of(&self, id: &str, journal: &Journal) -> Result<Ssh> {
        let intent = journal
            .entries
            .get(id)
            .map(|entry| entry.intent.as_str())
            .unwrap_or_default();
        let address = std::fs::read_to_string(self.instance_dir(id).join("address")).or_system(
            format_args!("instance {id} has no saved address: its prepare did not finish"),
        )?;
        self.ssh_at(id, intent, address.trim())
    }

    /// The connection of instance `id` at `address`, with the key of its launch `intent`.
    fn ssh_at(&self, id: &str, intent: &str, address: &str) -> Result<Ssh> {
        Ok(Ssh::new(
            &self.instance_dir(id),
            &self.key_dir(intent).join("id_ed25519"),
            id,
            self.target(address)?,
            self.settings.ssh_config.as_deref(),
            format!("instance {id}"),
        ))
    }

    fn target(&self, address: &str) -> Result<SshTarget> {
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') || host.starts_with('[') => (
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
                port.parse().map_err(|_| {
                    Error::system(format!("the address {address:?} has no valid port"))
                })?,
            ),
            _ => (address.to_owned(), self.settings.ssh_port),
        };
        Ok(SshTarget {
            user: self.settings.ssh_user.clone(),
            host,
            port,
            jump: self.settings.jump_host.clone(),
        })
    }

    /// Waits until instance `id` has an address and accepts SSH, and pins its host key.
    async fn reach(&self, ec2: &Ec2, lease: &Lease, job: &Job) -> Result<Ssh> {
        let (id, intent) = (lease.id.as_str(), lease.intent.as_str());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.settings.boot_secs);
        let dir = self.instance_dir(id);
        std::fs::create_dir_all(&dir).or_system(format_args!("cannot create {}", dir.display()))?;
        let saved = dir.join("address");
        let mut pause = Duration::from_millis(250);
        let address = loop {
            if let Ok(address) = std::fs::read_to_string(&saved) {
                break address.trim().to_owned();
            }
            let seen = ec2.instance(id).await?;
            match &seen {
                Some(seen)
                    if ["shutting-down", "terminated", "stopping", "stopped"]
                        .contains(&seen.state.as_str()) =>
                {
                    return Err(Error::system(format!(
                        "instance {id} is {}{} before the job could start",
                        seen.state,
                        seen.reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    )));
                }
                Some(seen) => {
                    if let Some(address) = render_address(&self.settings.address, seen) {
                        drover_core::state::write_atomic(&saved, address.as_bytes())?;
                        break address;
                    }
                }
                None => {}
            }
            if tokio::time::Instant::now() + pause >= deadline || job.is_cancelled() {
                return Err(Error::system(format!(
                    "instance {id} got no address for [driver] address = {:?} within {} s",
                    self.settings.address, self.settings.boot_secs
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        };
        let ssh = self.ssh_at(id, intent, &address)?;
        progress!(
            "Connecting to {}@{}:{}{}",
            ssh.target().user,
            ssh.target().host,
            ssh.target().port,
            if ssh.pinned() {
                ""
            } else {
                " (pinning its host key on first contact)"
            }
        );
        ssh.connect(deadline, job.cancel_token()).await?;
        Ok(ssh)
    }

    /// What prepare runs on the instance before the first stage.
    fn setup_script(&self) -> String {
        let sudo = if self.settings.ssh_user == "root" {
            ""
        } else {
            "sudo -n "
        };
        format!(
            "set -e\n{sudo}mkdir -p {b} {c}\n{sudo}chown \"$(id -u)\" {b} {c}\ncommand -v gitlab-runner >/dev/null 2>&1 || echo 'drover-ec2: no gitlab-runner on the instance: artifacts and cache will be skipped (bake it into the AMI)' >&2\n",
            b = self.settings.builds_dir,
            c = self.settings.cache_dir,
        )
    }

    /// The reset step between two jobs on one instance: the operator's command, then a check
    /// that the instance still answers. Any failure retires it.
    async fn reset(&self, ssh: &Ssh, job: &Job) -> bool {
        let Some(command) = &self.settings.reset_command else {
            return false;
        };
        if ssh.ensure(RECONNECT, job.cancel_token()).await.is_err() {
            return false;
        }
        let script = format!("{command}\n");
        let status = run_stage(
            &PerStageExec::new(ssh, "sh"),
            script.as_bytes(),
            job.cancel_token(),
        )
        .await;
        match status {
            Ok(0) => true,
            Ok(status) => {
                progress!("The reset_command exited {status}: the instance is retired");
                false
            }
            Err(err) => {
                progress!("The reset step failed ({err}): the instance is retired");
                false
            }
        }
    }

    /// Adds to a lost connection's error what EC2 says about the instance.
    async fn explain_loss(&self, id: &str, err: Error) -> Error {
        let ec2 = Ec2::connect(&self.settings).await;
        match ec2.instance(id).await {
            Ok(Some(seen)) if seen.state != "running" => err.context(format_args!(
                "instance {id} is {}{}",
                seen.state,
                seen.reason.map(|r| format!(" ({r})")).unwrap_or_default()
            )),
            Ok(None) => err.context(format_args!("instance {id} no longer exists")),
            _ => err,
        }
    }

    /// Removes what the runner host kept for terminated instances.
    fn forget(&self, ids: &[String]) {
        for id in ids {
            let _ = std::fs::remove_dir_all(self.instance_dir(id));
        }
    }

    /// The instance's first-boot script: the launch's public key in the SSH user's
    /// `authorized_keys`, then the operator's own script.
    fn user_data(&self, public_key: &str) -> String {
        let user = &self.settings.ssh_user;
        let mut script = format!(
            r#"#!/bin/sh
# drover-ec2: lets the runner host in with the key it made for this launch.
home=$(getent passwd '{user}' | cut -d: -f6)
[ -n "$home" ] || home=/root
mkdir -p "$home/.ssh"
printf '%s\n' '{public_key}' >>"$home/.ssh/authorized_keys"
chmod 700 "$home/.ssh"
chmod 600 "$home/.ssh/authorized_keys"
chown -R '{user}' "$home/.ssh"
"#
        );
        if let Some(extra) = &self.user_data {
            let path = "/var/lib/drover-ec2-user-data";
            script.push_str(&format!(
                "cat >{path} <<'DROVER_USER_DATA_END'\n{extra}\nDROVER_USER_DATA_END\nchmod 700 {path}\n{path}\n"
            ));
        }
        script
    }
}

/// Checks an address setting's placeholders.
fn address_template(address: &str) -> Result<()> {
    let mut rest = address;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            return Err(Error::system(format!(
                "[driver] address {address:?} has an unclosed {{"
            )));
        };
        let name = &rest[start + 1..start + end];
        if !(name.starts_with("tag:")
            || [
                "private_ip",
                "public_ip",
                "private_dns",
                "public_dns",
                "instance_id",
            ]
            .contains(&name))
        {
            return Err(Error::system(format!(
                "[driver] address {address:?}: unknown placeholder {{{name}}} (use private_ip, public_ip, private_dns, public_dns, instance_id or tag:KEY)"
            )));
        }
        rest = &rest[start + end + 1..];
    }
    Ok(())
}

/// The address of `seen` under the setting, once every value it names is there.
fn render_address(setting: &str, seen: &Seen) -> Option<String> {
    let template = match setting {
        "private" => "{private_ip}",
        "public" => "{public_ip}",
        other => other,
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        let name = &rest[start + 1..end];
        let value = match name.strip_prefix("tag:") {
            Some(tag) => seen.tags.get(tag)?.clone(),
            None => seen.addresses.get(name)?.clone(),
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

/// The pool's provider: EC2, with the tags of this driver.
struct Cloud<'a> {
    ec2: &'a Ec2,
    driver: &'a Ec2Driver,
    /// The job's tags, for a launch made for a job.
    job_tags: Option<BTreeMap<String, String>>,
}

impl Provider for Cloud<'_> {
    async fn launch(&self, intent: &Intent) -> Result<Vec<String>> {
        let driver = self.driver;
        let public_key = make_key(&driver.key_dir(&intent.id)).await?;
        let mut tags = driver.settings.tags.clone();
        tags.insert(LABEL_RUNNER.into(), driver.runner.clone());
        tags.insert(TAG_INTENT.into(), intent.id.clone());
        tags.insert(TAG_KEY.into(), intent.key.clone());
        tags.insert(TAG_USES.into(), "0".into());
        tags.insert("Name".into(), format!("drover-{}", driver.runner));
        if intent.job.is_some() {
            if let Some(job_tags) = &self.job_tags {
                tags.extend(job_tags.clone());
            }
        }
        let launched = self
            .ec2
            .launch(
                &driver.settings,
                intent.count,
                &intent.token,
                &tags,
                &driver.user_data(&public_key),
                false,
            )
            .await?;
        for instance in &launched {
            progress!("Launched {} as {}", instance.id, instance.pool);
        }
        Ok(launched.into_iter().map(|l| l.id).collect())
    }

    async fn list(&self) -> Result<Vec<Observed>> {
        let seen = self.ec2.owned(&self.driver.runner, &[]).await?;
        Ok(seen
            .into_iter()
            .filter(|s| {
                s.state != "stopping" && s.state != "stopped" || s.tags.contains_key(TAG_INTENT)
            })
            .map(|s| {
                let intent = s.tags.get(TAG_INTENT).cloned();
                Observed {
                    reachable: intent.as_ref().is_some_and(|intent| {
                        self.driver.key_dir(intent).join("id_ed25519").is_file()
                    }),
                    intent,
                    job: s.tags.get(LABEL_JOB).cloned(),
                    uses: s
                        .tags
                        .get(TAG_USES)
                        .and_then(|u| u.parse().ok())
                        .unwrap_or(1),
                    expires: s.tags.get(LABEL_EXPIRES).and_then(|e| e.parse().ok()),
                    id: s.id,
                }
            })
            .collect())
    }

    async fn terminate(&self, ids: &[String]) -> Result<()> {
        self.ec2.terminate(ids).await?;
        self.driver.forget(ids);
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    drover_core::run::<Ec2Driver>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(tags: &[(&str, &str)]) -> Seen {
        Seen {
            id: "i-1".into(),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            state: "running".into(),
            reason: None,
            addresses: BTreeMap::from([("private_ip", "10.0.0.5".to_owned())]),
        }
    }

    #[test]
    fn addresses_come_from_the_setting_once_every_value_is_there() {
        assert_eq!(
            render_address("private", &seen(&[])),
            Some("10.0.0.5".into())
        );
        assert_eq!(render_address("public", &seen(&[])), None);
        assert_eq!(
            render_address("{tag:dns}:2222", &seen(&[("dns", "ci-1.internal")])),
            Some("ci-1.internal:2222".into())
        );
        assert!(address_template("{tag:x}").is_ok());
        assert!(address_template("{nope}").is_err());
    }
}
