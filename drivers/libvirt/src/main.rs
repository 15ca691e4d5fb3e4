//! `drover-libvirt`: each GitLab job in a fresh virtual machine of its own, through libvirt
//! (the `virt` crate) and QEMU. Section numbers (§) refer to `contract.md`.
//!
//! Per job one persistent domain, `drover-<runner>-p<project>-j<job>`, named from the job's
//! trusted identity (or a VM booted ahead and handed to it, see `ready`), and labelled in its
//! `<metadata>` (runner, project, job, expiry, cache) for `gc`. Its root disk is a qcow2 overlay
//! on the operator's base image, in a storage pool of the driver's; the guest boots (directly
//! from a kernel, or from the image's own boot loader), and stages go through the core's stage
//! channel over virtio-serial to `drover-guest-agent` (see `channel` for why not SSH). The
//! cache is a disk volume per runner and project (§8), never a host directory: no file the job
//! makes is ever looked at by the host (see the README).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use drover_core::naming::{LABEL_EXPIRES, LABEL_PROJECT, LABEL_RUNNER, ResourceNames, is_expired};
use drover_core::protocol::ConfigOutput;
use drover_core::state::StateLock;
use drover_core::{
    Check, Driver, Error, GcReport, GcRequest, Job, Result, ResultExt, Script, Settings,
    fresh_environment_config, progress,
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

mod channel;
mod domain;
mod libvirt;
mod ready;

use channel::{Serial, Sockets};
use domain::{Boot, Disk, Network, Spec};
use libvirt::Libvirt;

/// The `builds_dir` inside every VM (§2).
const BUILDS_DIR: &str = "/builds";
/// The `cache_dir` inside every VM: the project's cache disk (§8).
const CACHE_DIR: &str = "/cache";
/// The label naming the cache volume a domain uses, so two VMs never share one.
const LABEL_CACHE: &str = "drover.cache";
/// How many cache disks a project may have, one per job running at once.
const CACHE_SLOTS: u32 = 64;
/// How long cleanup waits for a VM's agent to answer before it asks it to write out its cache.
const FLUSH_HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long cleanup waits for a VM to write out its cache.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of the console log goes into the job log when a VM fails.
const CONSOLE_TAIL_LINES: usize = 20;

/// A job `image:` as the operator maps it to a base disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Image {
    /// The base disk, raw or qcow2 (detected); never written: every job gets an overlay.
    disk: PathBuf,
    /// A kernel for direct kernel boot; without one the disk's own boot loader boots.
    #[serde(default)]
    kernel: Option<PathBuf>,
    /// The kernel's initrd.
    #[serde(default)]
    initrd: Option<PathBuf>,
    /// The kernel's command line.
    #[serde(default = "default_cmdline")]
    cmdline: String,
}

/// The `[driver]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LibvirtSettings {
    /// The libvirt connection, `qemu:///system` or `qemu:///session`.
    #[serde(default = "default_uri")]
    uri: String,
    /// The storage pool of the job overlays and cache disks; made as a directory pool in
    /// `<state_dir>/volumes` when it does not exist.
    #[serde(default = "default_pool")]
    pool: String,
    /// The directory of that pool when the driver makes it (default `<state_dir>/volumes`).
    #[serde(default)]
    pool_dir: Option<PathBuf>,
    /// Job directories (console logs, channel sockets), the domain type probe, the helper disk.
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    /// Job `image:` names mapped to base disks.
    #[serde(default)]
    images: BTreeMap<String, Image>,
    /// `auto` (a timed test boot decides), `kvm` or `qemu` (TCG).
    #[serde(default = "default_domain_type")]
    domain_type: String,
    /// vCPUs unless the policy gives CPUs.
    #[serde(default = "default_vcpus")]
    vcpus: u32,
    /// Memory unless the policy gives some (`1GiB`).
    #[serde(default = "default_memory")]
    memory: String,
    /// `user` (QEMU's user-mode networking), `none`, or `libvirt:NAME`.
    #[serde(default = "default_network")]
    network: String,
    /// The size of each project's cache disk (sparse).
    #[serde(default = "default_cache_size")]
    cache_size: String,
    /// A domain XML template with the driver's placeholders (see `domain.xml`).
    #[serde(default)]
    domain_template: Option<PathBuf>,
    /// A `gitlab-runner` binary given to VMs whose image lacks one, as a read-only disk, so
    /// cache and artifacts are never silently skipped (§8, §10 item 14).
    #[serde(default)]
    gitlab_runner_binary: Option<PathBuf>,
    /// TCP ports of the host's loopback that appear on each VM's 127.0.0.1 as well (with
    /// `network = "user"`), e.g. a GitLab or a proxy the runner host serves locally: the job's
    /// `gitlab-runner` uploads artifacts to the URL the runner has, which may be 127.0.0.1.
    #[serde(default)]
    forward_ports: Vec<u16>,
    /// How many booted VMs to keep ready per job image, each handed to one job at prepare
    /// (see `ready`); 0 boots a VM per job.
    #[serde(default)]
    idle_count: usize,
    /// How long prepare waits for a new VM's stage agent to answer.
    #[serde(default = "default_boot_secs")]
    boot_secs: u64,
    /// The interpreter of the runner's scripts (§7).
    #[serde(default = "drover_core::settings::default_shell")]
    shell: String,
}

fn default_uri() -> String {
    "qemu:///system".into()
}
fn default_pool() -> String {
    "drover".into()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/drover-libvirt")
}
fn default_domain_type() -> String {
    "auto".into()
}
fn default_vcpus() -> u32 {
    2
}
fn default_memory() -> String {
    "1GiB".into()
}
fn default_network() -> String {
    "user".into()
}
fn default_cache_size() -> String {
    "10GiB".into()
}
fn default_boot_secs() -> u64 {
    120
}
fn default_cmdline() -> String {
    "console=ttyS0 root=/dev/vda rw".into()
}

struct LibvirtDriver {
    settings: LibvirtSettings,
    runner: String,
    network: Network,
    memory_bytes: u64,
    cache_bytes: u64,
    template: String,
}

impl Driver for LibvirtDriver {
    const NAME: &'static str = "drover-libvirt";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Settings = LibvirtSettings;

    fn new(settings: &Settings<LibvirtSettings>) -> Result<Self> {
        let driver = &settings.driver;
        let network = Network::parse(&driver.network).ok_or_else(|| {
            Error::system(format!(
                "[driver] network {:?} is none of \"user\", \"none\", \"libvirt:NAME\"",
                driver.network
            ))
        })?;
        if !driver.forward_ports.is_empty() && network != Network::User {
            return Err(Error::system(format!(
                "[driver] forward_ports needs network = \"user\" (the host's loopback is 10.0.2.2 there), not {:?}",
                driver.network
            )));
        }
        if !["auto", "kvm", "qemu"].contains(&driver.domain_type.as_str()) {
            return Err(Error::system(format!(
                "[driver] domain_type {:?} is none of \"auto\", \"kvm\", \"qemu\"",
                driver.domain_type
            )));
        }
        let size = |key: &str, text: &str| {
            drover_core::policy::parse_memory(text)
                .map_err(|err| Error::system(format!("[driver] {key}: {err}")))
        };
        let template = match &driver.domain_template {
            None => domain::BUILTIN_TEMPLATE.to_owned(),
            Some(path) => {
                let text = std::fs::read_to_string(path).or_system(format_args!(
                    "cannot read [driver] domain_template {}",
                    path.display()
                ))?;
                if let Some(missing) = domain::REQUIRED_PLACEHOLDERS
                    .iter()
                    .find(|placeholder| !text.contains(**placeholder))
                {
                    return Err(Error::system(format!(
                        "[driver] domain_template {} lacks the placeholder {missing}",
                        path.display()
                    )));
                }
                text
            }
        };
        Ok(LibvirtDriver {
            network,
            memory_bytes: size("memory", &driver.memory)?,
            cache_bytes: size("cache_size", &driver.cache_size)?,
            template,
            settings: driver.clone(),
            runner: settings.runner_name.clone(),
        })
    }

    /// A fresh VM per job: the builds dir is never shared (§2, §10 item 6).
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
        if !resources.mounts.is_empty() {
            return Err(Error::system(
                "drover-libvirt shares no host directory with a VM; remove DROVER_MOUNTS from the job (or the mount from [policy] mounts)",
            ));
        }
        let requested = resources.required_image()?;
        let image = self.settings.images.get(&requested).ok_or_else(|| {
            Error::system(format!(
                "no [driver.images] entry maps the job's image {requested:?} to a base disk; add one (see examples/config/drover-libvirt.toml)"
            ))
        })?;
        let base = BaseDisk::open(&image.disk)?;
        for (key, path) in [("kernel", &image.kernel), ("initrd", &image.initrd)] {
            if let Some(path) = path.as_ref().filter(|path| !path.is_file()) {
                return Err(Error::system(format!(
                    "the {key} {} of image {requested:?} does not exist",
                    path.display()
                )));
            }
        }
        let lv = Libvirt::connect(&self.settings.uri).await?;
        let version = lv.describe().await?;
        progress!("Using {version} at {}", lv.uri);
        let name = job.names().job();
        // A domain of the same name can only be left from an earlier attempt (§5.1).
        self.remove(&lv, &name).await?;
        let domain_type = self.domain_type(&lv, image, &version).await?;
        self.pool(&lv).await?;
        let default_memory_kib = self.memory_bytes / 1024;
        let launch = Launch {
            image_name: &requested,
            image,
            base: &base,
            domain_type,
            memory_kib: resources
                .memory_bytes
                .map_or(default_memory_kib, |b| b / 1024),
            vcpus: resources
                .cpus
                .map_or(self.settings.vcpus, |cpus| cpus.ceil().max(1.0) as u32),
            helper: self.helper_disk()?,
        };
        // Ready VMs have the default shape; a job asking for another gets a VM of its own.
        let ready_key = (self.settings.idle_count > 0
            && launch.memory_kib == default_memory_kib
            && launch.vcpus == self.settings.vcpus)
            .then(|| ready::key(self, &launch));
        let lock = StateLock::acquire(&self.settings.state_dir).await?;
        let (cache_volume, cache_path) = self.cache_disk(&lv, job).await?;
        let cache = Disk {
            path: cache_path,
            format: "raw",
            target: "vdb",
            serial: Some("drover-cache"),
            read_only: false,
        };
        let mut labels = job.labels();
        labels.insert(LABEL_CACHE.into(), cache_volume);
        let taken = match &ready_key {
            Some(key) => self.take_ready(&lv, key, &name, &labels).await?,
            None => None,
        };
        // A ready VM gets the cache disk once its agent answers, never while it boots: its
        // initramfs could find the cache disk first and take it for the root disk.
        let (vm, plug) = match taken {
            Some(vm) => {
                progress!("Using ready VM {vm} (booted from {requested} ahead of the job)");
                (vm, Some(cache))
            }
            None => {
                progress!(
                    "Starting VM {name} from {requested} ({}, {} vCPU, {} MiB)",
                    launch.domain_type,
                    launch.vcpus,
                    launch.memory_kib / 1024
                );
                self.start_vm(&lv, &name, &name, labels, &launch, Some(cache))
                    .await?;
                (name.clone(), None)
            }
        };
        drop(lock);
        let defined = Instant::now();
        let job_dir = self.job_dir(&name);
        let sockets = read_sockets(&job_dir).ok_or_else(|| {
            Error::system(format!(
                "VM {vm} has no saved stage channel in {}",
                job_dir.display()
            ))
        })?;
        let serial = Serial::new(&vm, sockets, &self.settings.shell);
        self.wait_for_agent(&lv, &serial, &vm, &job_dir, job.cancel_token())
            .await?;
        if let Some(cache) = plug {
            lv.attach(&vm, cache.xml()).await?;
        }
        let answered = Instant::now();
        let setup = guest_setup(
            &name,
            launch.helper.as_ref().map(|(_, size)| *size),
            &self.settings.forward_ports,
        );
        // Ready VMs for the next jobs start while this one's guest runs its setup: libvirt and
        // QEMU do that work, and the job does not wait for it twice.
        let top_up = async {
            if let Some(key) = &ready_key {
                match StateLock::acquire(&self.settings.state_dir).await {
                    Ok(_lock) => self.replenish(&lv, key, &launch).await,
                    Err(err) => progress!("Started no ready VMs for the next jobs: {err}"),
                }
            }
        };
        let setup_stage =
            drover_core::channel::run_stage(&serial, setup.as_bytes(), job.cancel_token());
        let (status, ()) = tokio::join!(setup_stage, top_up);
        let status = status?;
        if status != 0 {
            return Err(Error::system(format!(
                "setting up VM {vm} failed (exit status {status}); see the lines above"
            )));
        }
        progress!(
            "Ready in {:.2} s ({} {:.2} s, boot to the stage agent {:.2} s, setup {:.2} s)",
            started.elapsed().as_secs_f64(),
            if vm == name {
                "volumes, define and start"
            } else {
                "hand-over"
            },
            (defined - started).as_secs_f64(),
            (answered - defined).as_secs_f64(),
            answered.elapsed().as_secs_f64()
        );
        Ok(())
    }

    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        let name = job.names().job();
        let job_dir = self.job_dir(&name);
        let sockets = read_sockets(&job_dir).ok_or_else(|| {
            Error::system(format!(
                "VM {name} has no stage channel: its prepare did not finish"
            ))
        })?;
        let body = script.read().await?;
        let vm = self.domain_of(&name);
        let serial = Serial::new(&vm, sockets, &self.settings.shell);
        let result = drover_core::channel::run_stage(&serial, &body, job.cancel_token()).await;
        match result {
            Ok(status) => Ok(status),
            Err(err) => {
                let running = match Libvirt::connect(&self.settings.uri).await {
                    Ok(lv) => lv.running(&vm).await.ok().flatten(),
                    Err(_) => None,
                };
                if running == Some(true) {
                    return Err(err);
                }
                show_console(&job_dir);
                Err(Error::system(format!(
                    "VM {vm} stopped while the stage ran (its console's last lines are above)"
                )))
            }
        }
    }

    async fn cleanup(&self, job: &Job) -> Result<()> {
        let lv = Libvirt::connect(&self.settings.uri).await?;
        let name = job.names().job();
        if lv.running(&self.domain_of(&name)).await? == Some(true) {
            self.flush_cache(&name).await;
        }
        self.remove(&lv, &name).await
    }

    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let lv = Libvirt::connect(&self.settings.uri).await?;
        let _lock = StateLock::acquire(&self.settings.state_dir).await?;
        let mut report = GcReport::default();
        let (mut known, mut kept) = (Vec::new(), Vec::new());
        for domain in lv.drover_domains().await? {
            if domain.labels.get(LABEL_RUNNER) != Some(&request.runner) {
                continue;
            }
            known.push(domain.name.clone());
            let remove = if domain.labels.contains_key(ready::LABEL_READY) {
                // A ready VM: of no use once ready VMs are switched off or it stopped, and
                // abandoned when a prepare killed while it took it left it without a
                // directory (the lock rules out one taking it now).
                self.settings.idle_count == 0
                    || !ready::is_untaken(&self.job_dir(&domain.name))
                    || lv.running(&domain.name).await? != Some(true)
            } else {
                // Job VMs, and the test boots of a driver killed while it probed.
                is_expired(&domain.labels, &request.runner, request.now)
            };
            if !remove {
                report.kept += 1;
                kept.push(domain.name);
                continue;
            }
            if !request.dry_run {
                self.remove(&lv, &domain.name).await?;
            }
            report.removed.push(domain.name);
        }
        // What a driver killed between making a volume or directory and defining the domain
        // left: overlays and job directories of this runner without a domain, once old enough
        // that no prepare is still making them.
        let prefix = ResourceNames::runner_prefix(&request.runner);
        let old = |path: &Path| {
            std::fs::symlink_metadata(path)
                .and_then(|meta| meta.modified())
                .is_ok_and(|modified| {
                    request
                        .now
                        .duration_since(modified)
                        .is_ok_and(|age| age > Duration::from_secs(600))
                })
        };
        let pool_dir = lv.pool_path(&self.settings.pool).await?;
        for volume in lv.volumes(&self.settings.pool).await? {
            let Some(domain) = volume
                .strip_suffix(".qcow2")
                .filter(|name| name.starts_with(&prefix))
            else {
                continue;
            };
            if known.iter().any(|name| name == domain) {
                continue;
            }
            if pool_dir
                .as_ref()
                .is_some_and(|dir| !old(&Path::new(dir).join(&volume)))
            {
                continue;
            }
            if !request.dry_run {
                lv.delete_volume(&self.settings.pool, &volume).await?;
            }
            report.removed.push(volume);
        }
        // A job's directory goes with its VM, or, when it has none, once old enough that no
        // prepare is still making it.
        if let Ok(entries) = std::fs::read_dir(self.settings.state_dir.join("jobs")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let vm = self.domain_of(&name);
                let gone = known.contains(&vm) && !kept.contains(&vm);
                if !name.starts_with(&prefix) || kept.contains(&vm) || !(gone || old(&entry.path()))
                {
                    continue;
                }
                if !request.dry_run {
                    remove_dir(&entry.path())?;
                }
                report.removed.push(format!("{}", entry.path().display()));
            }
        }
        Ok(report)
    }

    async fn doctor(&self) -> Result<Vec<Check>> {
        let lv = match Libvirt::connect(&self.settings.uri).await {
            Ok(lv) => lv,
            Err(err) => return Ok(vec![Check::failed("libvirt", err.to_string())]),
        };
        let version = match lv.describe().await {
            Ok(version) => version,
            Err(err) => return Ok(vec![Check::failed("libvirt", err.to_string())]),
        };
        let mut checks = vec![Check::ok("libvirt", format!("{version} at {}", lv.uri))];
        checks.push(match lv.pool_path(&self.settings.pool).await {
            Ok(Some(dir)) => Check::ok("pool", format!("{} in {dir}", self.settings.pool)),
            // Not a fault: the first prepare makes it.
            Ok(None) => Check::ok(
                "pool",
                format!(
                    "{} does not run yet; the first prepare makes it in {}",
                    self.settings.pool,
                    self.pool_dir().display()
                ),
            ),
            Err(err) => Check::failed("pool", err.to_string()),
        });
        for (job_image, image) in &self.settings.images {
            checks.push(match BaseDisk::open(&image.disk) {
                Ok(base) => Check::ok(
                    "image",
                    format!(
                        "{job_image} -> {} ({}, {} MiB)",
                        image.disk.display(),
                        base.format,
                        base.size >> 20
                    ),
                ),
                Err(err) => Check::failed("image", err.to_string()),
            });
        }
        let image = self.settings.images.values().find(|i| i.kernel.is_some());
        checks.push(match image {
            Some(image) => match self.domain_type(&lv, image, &version).await {
                Ok(found) => Check::ok(
                    "domain_type",
                    format!("{found}: {}", self.domain_type_reason()),
                ),
                Err(err) => Check::failed("domain_type", err.to_string()),
            },
            None => Check::ok(
                "domain_type",
                format!(
                    "{} (no image with a kernel to test-boot with)",
                    self.settings.domain_type
                ),
            ),
        });
        if let Some(binary) = &self.settings.gitlab_runner_binary {
            checks.push(Check::gitlab_runner_binary(binary));
        }
        Ok(checks)
    }
}

impl LibvirtDriver {
    /// Unmounts the cache disk in VM `name` (writing out what the job's last stages put there)
    /// before the VM is switched off: destroying a domain is pulling its plug. Bounded; a VM
    /// that does not answer loses what it had not written yet, and the job log says so.
    async fn flush_cache(&self, name: &str) {
        let Some(sockets) = read_sockets(&self.job_dir(name)) else {
            return;
        };
        let serial = Serial::new(name, sockets, &self.settings.shell);
        // A busy guest (TCG, a loaded host) may take seconds to answer; one whose agent the
        // job killed is answering again once its init restarted it.
        let nonce = drover_core::channel::nonce();
        if !serial
            .hello(&nonce, FLUSH_HELLO_TIMEOUT)
            .await
            .unwrap_or(false)
        {
            progress!(
                "VM {name} did not answer within {} s; what it had not written to its cache yet is lost",
                FLUSH_HELLO_TIMEOUT.as_secs()
            );
            return;
        }
        let script = format!("sync; umount {CACHE_DIR} 2>/dev/null; sync\n");
        let cancel = CancellationToken::new();
        let stage = drover_core::channel::run_stage(&serial, script.as_bytes(), &cancel);
        match tokio::time::timeout(FLUSH_TIMEOUT, stage).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => progress!("Could not write out the cache of VM {name}: {err}"),
            Err(_) => progress!(
                "VM {name} did not write out its cache within {} s; what it had not written is lost",
                FLUSH_TIMEOUT.as_secs()
            ),
        }
    }

    /// Removes the VM of job (or ready VM) `name`, its overlay and its directory; succeeds
    /// when they are gone.
    async fn remove(&self, lv: &Libvirt, name: &str) -> Result<()> {
        let vm = self.domain_of(name);
        lv.remove_domain(&vm).await?;
        lv.delete_volume(&self.settings.pool, &overlay_volume(&vm))
            .await?;
        remove_dir(&self.job_dir(name))
    }

    /// The directory of job (or ready VM) `name`: its VM's console log, channel sockets and
    /// name. Only the driver writes there.
    fn job_dir(&self, name: &str) -> PathBuf {
        self.settings.state_dir.join("jobs").join(name)
    }

    /// The domain of job `name`: its own, or the ready VM it took (see `ready`).
    fn domain_of(&self, name: &str) -> String {
        let mut text = String::new();
        let read = std::fs::File::open(self.job_dir(name).join("domain"))
            .and_then(|file| file.take(256).read_to_string(&mut text));
        match read {
            Ok(_) if !text.trim().is_empty() => text.trim().to_owned(),
            _ => name.to_owned(),
        }
    }

    /// Makes VM `vm`'s overlay and directory (`jobs/<dir>`), defines and starts it with the
    /// overlay, `cache` and the helper disk as its disks, and saves its channel sockets there.
    async fn start_vm(
        &self,
        lv: &Libvirt,
        vm: &str,
        dir: &str,
        labels: BTreeMap<String, String>,
        launch: &Launch<'_>,
        cache: Option<Disk>,
    ) -> Result<()> {
        let overlay = lv
            .ensure_volume(
                &self.settings.pool,
                &overlay_volume(vm),
                launch.base.overlay_xml(&overlay_volume(vm)),
            )
            .await?;
        let job_dir = self.job_dir(dir);
        std::fs::create_dir_all(&job_dir)
            .and_then(|()| std::fs::write(job_dir.join("domain"), vm))
            .or_system(format_args!("cannot write in {}", job_dir.display()))?;
        let mut disks = vec![Disk {
            path: overlay,
            format: "qcow2",
            target: "vda",
            serial: None,
            read_only: false,
        }];
        disks.extend(cache);
        if let Some((path, _)) = &launch.helper {
            disks.push(Disk {
                path: path.display().to_string(),
                format: "raw",
                target: "vdc",
                serial: Some("drover-helper"),
                read_only: true,
            });
        }
        let image = launch.image;
        let spec = Spec {
            domain_type: launch.domain_type.clone(),
            name: vm.to_owned(),
            labels,
            memory_kib: launch.memory_kib,
            vcpus: launch.vcpus,
            boot: Boot {
                kernel: image.kernel.as_ref().map(|p| p.display().to_string()),
                initrd: image.initrd.as_ref().map(|p| p.display().to_string()),
                cmdline: image.kernel.as_ref().map(|_| image.cmdline.clone()),
            },
            disks,
            network: self.network.clone(),
            console_log: console_log(&job_dir).display().to_string(),
        };
        let xml = lv.define_and_start(spec.render(&self.template)).await?;
        let [ctl, out, err] = domain::channel_sockets(&xml).ok_or_else(|| {
            Error::system(format!(
                "VM {vm} has no org.drover.* channels (does [driver] domain_template keep @CHANNELS@?)"
            ))
        })?;
        let sockets = Sockets {
            ctl: ctl.into(),
            out: out.into(),
            err: err.into(),
        };
        let state = serde_json::to_vec(&sockets).or_system("cannot save the channel")?;
        std::fs::write(job_dir.join("sockets.json"), state)
            .or_system(format_args!("cannot write in {}", job_dir.display()))
    }

    /// The storage pool, made when missing; returns its directory.
    async fn pool(&self, lv: &Libvirt) -> Result<String> {
        lv.ensure_pool(&self.settings.pool, &self.pool_dir()).await
    }

    /// The directory the driver makes its storage pool in.
    fn pool_dir(&self) -> PathBuf {
        self.settings
            .pool_dir
            .clone()
            .unwrap_or_else(|| self.settings.state_dir.join("volumes"))
    }

    /// The project's cache disk for this job: the first of the project's cache volumes that no
    /// other VM of this runner uses (two VMs writing one file system would break it; QEMU's
    /// image locking refuses that as well), made when missing. Returns its name and path.
    /// Call with the [`StateLock`] held until the VM carries the volume's label.
    async fn cache_disk(&self, lv: &Libvirt, job: &Job) -> Result<(String, String)> {
        let project = job.identity().project_id.to_string();
        let runner = job.names().runner().to_owned();
        let used: Vec<String> = lv
            .drover_domains()
            .await?
            .into_iter()
            .filter(|d| {
                d.labels.get(LABEL_RUNNER) == Some(&runner)
                    && d.labels.get(LABEL_PROJECT) == Some(&project)
            })
            .filter_map(|d| d.labels.get(LABEL_CACHE).cloned())
            .collect();
        let volume = (0..CACHE_SLOTS)
            .map(|slot| {
                let suffix = if slot == 0 {
                    "cache".to_owned()
                } else {
                    format!("cache-{slot}")
                };
                format!("{}.raw", job.names().project_scoped(&suffix))
            })
            .find(|volume| !used.contains(volume))
            .ok_or_else(|| {
                Error::system(format!(
                    "all {CACHE_SLOTS} cache disks of project {project} are in use"
                ))
            })?;
        let xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{}</capacity><allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>",
            domain::escape(&volume),
            self.cache_bytes
        );
        let path = lv.ensure_volume(&self.settings.pool, &volume, xml).await?;
        Ok((volume, path))
    }

    /// The operator's gitlab-runner as a raw disk the guest copies it from (the binary padded
    /// to whole sectors, made once per binary), with the binary's size.
    fn helper_disk(&self) -> Result<Option<(PathBuf, u64)>> {
        let Some(binary) = &self.settings.gitlab_runner_binary else {
            return Ok(None);
        };
        let meta = std::fs::metadata(binary).or_system(format_args!(
            "cannot read gitlab_runner_binary {}",
            binary.display()
        ))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |t| t.as_secs());
        let dir = self.settings.state_dir.join("helper");
        let disk = dir.join(format!("gitlab-runner-{}-{mtime}.raw", meta.len()));
        if !disk.is_file() {
            std::fs::create_dir_all(&dir)
                .or_system(format_args!("cannot create {}", dir.display()))?;
            let partial = dir.join(format!(".partial-{}", std::process::id()));
            std::fs::copy(binary, &partial).or_system(format_args!(
                "cannot copy gitlab_runner_binary {}",
                binary.display()
            ))?;
            let padded = meta.len().div_ceil(512) * 512;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&partial)
                .and_then(|file| file.set_len(padded))
                .and_then(|()| std::fs::rename(&partial, &disk))
                .or_system(format_args!("cannot make {}", disk.display()))?;
        }
        Ok(Some((disk, meta.len())))
    }

    /// Waits, bounded by `boot_secs`, until the guest's agent answers on the channel, saying
    /// what it waits for; a VM that stops or never answers fails with its console's last lines.
    async fn wait_for_agent(
        &self,
        lv: &Libvirt,
        serial: &Serial,
        name: &str,
        job_dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let started = Instant::now();
        let bound = Duration::from_secs(self.settings.boot_secs);
        let mut told = Duration::ZERO;
        let nonce = drover_core::channel::nonce();
        loop {
            if serial.hello(&nonce, Duration::from_millis(500)).await? {
                return Ok(());
            }
            if cancel.is_cancelled() {
                return Err(Error::system(format!("cancelled while VM {name} booted")));
            }
            if lv.running(name).await? != Some(true) {
                show_console(job_dir);
                return Err(Error::system(format!(
                    "VM {name} stopped while it booted (its console's last lines are above)"
                )));
            }
            let waited = started.elapsed();
            if waited >= bound {
                show_console(job_dir);
                return Err(Error::system(format!(
                    "VM {name} did not answer on its stage channel within {} s (boot_secs); its console's last lines are above",
                    bound.as_secs()
                )));
            }
            if waited >= told + Duration::from_secs(10) {
                told = waited;
                progress!(
                    "Waiting for the stage agent of VM {name} ({} s)",
                    waited.as_secs()
                );
            }
        }
    }

    /// The domain type: the operator's, or (`auto`) `kvm` if libvirt offers it and a test boot
    /// under it shows the kernel running, else `qemu`. The answer is kept in the state dir
    /// for this libvirt, QEMU and kernel.
    /// `version` is [`Libvirt::describe`]'s answer, which the caller has already asked for.
    async fn domain_type(&self, lv: &Libvirt, image: &Image, version: &str) -> Result<String> {
        if self.settings.domain_type != "auto" {
            return Ok(self.settings.domain_type.clone());
        }
        let Some(kernel) = &image.kernel else {
            // Nothing to test-boot quickly: KVM when offered.
            return Ok(if lv.lists_kvm().await? { "kvm" } else { "qemu" }.into());
        };
        let key = format!("{version} {}", kernel.display());
        let cache = self.settings.state_dir.join("domain-type");
        if let Ok(text) = std::fs::read_to_string(&cache) {
            if let Some((found, reason)) = text
                .strip_prefix(&format!("{key}\n"))
                .and_then(|rest| rest.split_once('\n'))
            {
                progress!("Domain type {found}: {}", reason.trim_end());
                return Ok(found.to_owned());
            }
        }
        let (found, reason) = if lv.lists_kvm().await? {
            progress!("Testing whether KVM really runs a guest here (once per host)");
            match self.test_boot(lv, image, "kvm").await? {
                Some(secs) => (
                    "kvm",
                    format!("a test boot under KVM ran the kernel within {secs:.1} s"),
                ),
                None => (
                    "qemu",
                    format!(
                        "libvirt offers kvm, but a test boot under it showed no kernel output within {PROBE_SECS} s (an emulated or nested KVM that cannot run it), so QEMU's TCG"
                    ),
                ),
            }
        } else {
            (
                "qemu",
                "libvirt offers no kvm here, so QEMU's TCG".to_owned(),
            )
        };
        std::fs::create_dir_all(&self.settings.state_dir).or_system(format_args!(
            "cannot create {}",
            self.settings.state_dir.display()
        ))?;
        std::fs::write(&cache, format!("{key}\n{found}\n{reason}\n"))
            .or_system(format_args!("cannot write {}", cache.display()))?;
        Ok(found.to_owned())
    }

    /// Why the domain type is what it is, for doctor.
    fn domain_type_reason(&self) -> String {
        if self.settings.domain_type != "auto" {
            return "set in [driver] domain_type".into();
        }
        std::fs::read_to_string(self.settings.state_dir.join("domain-type"))
            .ok()
            .and_then(|text| text.lines().nth(2).map(str::to_owned))
            .unwrap_or_else(|| "chosen from libvirt's capabilities".into())
    }

    /// Boots `image`'s kernel alone in a transient domain of type `domain_type`; the seconds
    /// until it printed its banner, or `None` when it did not within [`PROBE_SECS`].
    async fn test_boot(
        &self,
        lv: &Libvirt,
        image: &Image,
        domain_type: &str,
    ) -> Result<Option<f64>> {
        // Named and labelled like the runner's VMs, so gc finds it if the driver is killed now.
        let name = format!(
            "{}probe-{}",
            ResourceNames::runner_prefix(&self.runner),
            std::process::id()
        );
        let expires = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + 2 * PROBE_SECS;
        let dir = self.settings.state_dir.join("probe");
        std::fs::create_dir_all(&dir).or_system(format_args!("cannot create {}", dir.display()))?;
        let log = dir.join(format!("{name}.log"));
        let spec = Spec {
            domain_type: domain_type.to_owned(),
            name: name.clone(),
            labels: BTreeMap::from([
                (LABEL_RUNNER.to_owned(), self.runner.clone()),
                (LABEL_EXPIRES.to_owned(), expires.to_string()),
            ]),
            memory_kib: 256 * 1024,
            vcpus: 1,
            boot: Boot {
                kernel: image.kernel.as_ref().map(|p| p.display().to_string()),
                initrd: None,
                cmdline: Some("console=ttyS0 panic=-1".into()),
            },
            disks: Vec::new(),
            network: Network::None,
            console_log: log.display().to_string(),
        };
        let started = Instant::now();
        let result = async {
            lv.create_transient(spec.render(domain::BUILTIN_TEMPLATE))
                .await?;
            while started.elapsed() < Duration::from_secs(PROBE_SECS) {
                let text = std::fs::read(&log).unwrap_or_default();
                if memchr::memmem::find(&text, b"Linux version").is_some() {
                    return Ok(Some(started.elapsed().as_secs_f64()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(None)
        }
        .await;
        let _ = lv.remove_domain(&name).await;
        let _ = std::fs::remove_file(&log);
        result
    }
}

/// How long the domain type probe waits for the kernel's banner (under TCG it comes in about
/// a second; the emulated KVM of nested sandboxes takes over a minute, or never).
const PROBE_SECS: u64 = 15;

/// What every VM of one job image is started with (a job's own VM or a ready one).
struct Launch<'a> {
    /// The job's `image:`.
    image_name: &'a str,
    image: &'a Image,
    base: &'a BaseDisk,
    /// `kvm` or `qemu`.
    domain_type: String,
    memory_kib: u64,
    vcpus: u32,
    /// The disk with the operator's gitlab-runner, and the binary's size.
    helper: Option<(PathBuf, u64)>,
}

/// A base image's disk: its format and virtual size, read from its header.
struct BaseDisk {
    path: PathBuf,
    format: &'static str,
    size: u64,
}

impl BaseDisk {
    fn open(path: &Path) -> Result<BaseDisk> {
        let missing = |err: std::io::Error| {
            Error::system(format!(
                "the base disk {} cannot be read: {err}; fix [driver.images] or make the image",
                path.display()
            ))
        };
        let mut file = std::fs::File::open(path).map_err(missing)?;
        let len = file.metadata().map_err(missing)?.len();
        let mut header = [0u8; 32];
        let read = file.read(&mut header).map_err(missing)?;
        if read == header.len() && header.starts_with(b"QFI\xfb") {
            let mut size = [0u8; 8];
            size.copy_from_slice(&header[24..32]);
            return Ok(BaseDisk {
                path: path.to_owned(),
                format: "qcow2",
                size: u64::from_be_bytes(size),
            });
        }
        Ok(BaseDisk {
            path: path.to_owned(),
            format: "raw",
            size: len,
        })
    }

    /// The volume XML of a qcow2 overlay named `name` on this disk.
    fn overlay_xml(&self, name: &str) -> String {
        format!(
            "<volume><name>{}</name><capacity unit='bytes'>{}</capacity><target><format type='qcow2'/></target><backingStore><path>{}</path><format type='{}'/></backingStore></volume>",
            domain::escape(name),
            self.size,
            domain::escape(&self.path.display().to_string()),
            self.format
        )
    }
}

/// The name of VM `name`'s root disk overlay in the pool.
fn overlay_volume(name: &str) -> String {
    format!("{name}.qcow2")
}

fn console_log(job_dir: &Path) -> PathBuf {
    job_dir.join("console.log")
}

fn read_sockets(job_dir: &Path) -> Option<Sockets> {
    let text = std::fs::read(job_dir.join("sockets.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(Error::system(format!(
            "cannot remove {}: {err}",
            dir.display()
        ))),
    }
}

/// Puts the last lines of VM's console into the job log, printable characters only: the guest
/// wrote them, and they must not steer the log's terminal.
fn show_console(job_dir: &Path) {
    let path = console_log(job_dir);
    let Ok(mut file) = std::fs::File::open(&path) else {
        progress!("(no console output from the VM)");
        return;
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut tail = Vec::new();
    let _ = file.take(4096).read_to_end(&mut tail);
    for line in console_tail(&tail) {
        progress!("  console: {line}");
    }
}

/// The last [`CONSOLE_TAIL_LINES`] non-empty lines of `bytes`, control characters dropped.
fn console_tail(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<String> = text
        .split('\n')
        .map(|line| line.chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|line| !line.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].to_vec()
}

/// The first stage in a job's VM: its own identity (hostname, machine-id), the project's cache
/// disk at /cache (formatted when new; waited for, since a ready VM gets it plugged in), and gitlab-runner from the helper disk when the image
/// has none. `sh`, so it runs whatever the image's shell.
fn guest_setup(name: &str, helper_size: Option<u64>, forward_ports: &[u16]) -> String {
    let mut script = format!(
        r#"set -u
name='{name}'
hostname "$name" 2>/dev/null || echo "$name" >/proc/sys/kernel/hostname
echo "$name" >/etc/hostname 2>/dev/null
tr -d '-' </proc/sys/kernel/random/uuid >/etc/machine-id 2>/dev/null
disk() {{
  for s in /sys/block/*/serial; do
    [ "$(cat "$s" 2>/dev/null)" = "$1" ] || continue
    s=${{s%/serial}}; echo "/dev/${{s##*/}}"; return 0
  done
  return 1
}}
# A ready VM gets the cache disk plugged in at prepare: it shows up within moments.
tries=0
until dev=$(disk drover-cache); do
  tries=$((tries + 1))
  [ "$tries" -le 100 ] || {{ echo "the cache disk did not appear in the VM within 10 s" >&2; exit 1; }}
  sleep 0.1
done
if [ -n "$dev" ]; then
  mkdir -p {CACHE_DIR}
  if ! mount -t ext4 "$dev" {CACHE_DIR} 2>/dev/null; then
    echo "Formatting the project's new cache disk"
    mkfs.ext4 -q -F "$dev" >/dev/null && mount -t ext4 "$dev" {CACHE_DIR} || {{ echo "cannot mount the cache disk $dev at {CACHE_DIR}" >&2; exit 1; }}
  fi
fi
helper={helper}
if [ "$helper" -gt 0 ] && ! command -v gitlab-runner >/dev/null 2>&1 && dev=$(disk drover-helper); then
  # Into a directory on the stages' PATH (a busybox init's has no /usr/local/bin).
  bin=/usr/bin
  case ":$PATH:" in *:/usr/local/bin:*) bin=/usr/local/bin ;; esac
  echo "Copying gitlab-runner into the VM's $bin (the image has none)"
  mkdir -p "$bin" && head -c "$helper" "$dev" >"$bin/gitlab-runner" && chmod 0755 "$bin/gitlab-runner" || exit 1
fi
mkdir -p {BUILDS_DIR}
"#,
        helper = helper_size.unwrap_or(0)
    );
    if !forward_ports.is_empty() {
        script += &forwarding(forward_ports);
    }
    script
}

/// The setup stage's part that brings the host's loopback ports `ports` to the guest's
/// 127.0.0.1 (see `forward_ports`): socat when the image has it, else `guest/forward.pl`.
/// Each forwarder runs in a session of its own, so no stage's cancel stops it, and is waited
/// for until it listens.
fn forwarding(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        r#"cat >/run/drover-forward.pl <<'DROVER_FORWARD_PL'
{FORWARDER}DROVER_FORWARD_PL
for port in {ports}; do
  if command -v socat >/dev/null 2>&1; then
    setsid socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "TCP:10.0.2.2:$port" </dev/null >/dev/null 2>&1 &
  elif command -v perl >/dev/null 2>&1; then
    setsid perl /run/drover-forward.pl "$port" </dev/null >/dev/null 2>&1 &
  else
    echo "[driver] forward_ports needs socat or perl in the image" >&2; exit 1
  fi
  hex=$(printf '%04X' "$port") tries=0
  until grep -q "^ *[0-9]*: 0100007F:$hex 00000000:0000 0A" /proc/net/tcp; do
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || {{ echo "nothing listens on the VM's 127.0.0.1:$port for forward_ports after 10 s" >&2; exit 1; }}
    sleep 0.1
  done
done
"#,
        ports = ports.join(" ")
    )
}

/// The guest's forwarder of `forward_ports` for images without socat.
const FORWARDER: &str = include_str!("../guest/forward.pl");

fn main() -> std::process::ExitCode {
    drover_core::run::<LibvirtDriver>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_tail_is_printable_and_bounded() {
        let mut text = String::new();
        for n in 0..50 {
            text += &format!("line {n}\x1b[2J\r\n");
        }
        let tail = console_tail(text.as_bytes());
        assert_eq!(tail.len(), CONSOLE_TAIL_LINES);
        assert_eq!(tail.last().map(String::as_str), Some("line 49[2J"));
        assert!(tail.iter().all(|l| !l.chars().any(char::is_control)));
    }

    #[test]
    fn the_example_settings_load() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/config/drover-libvirt.toml");
        let settings = Settings::<LibvirtSettings>::load(Some(&example), &BTreeMap::new())
            .expect("the example loads");
        assert!(settings.driver.images.contains_key("debian:bookworm"));
        LibvirtDriver::new(&settings).expect("valid");
    }

    #[test]
    fn a_qcow2_base_gives_its_virtual_size_and_a_raw_one_its_length() {
        let dir = tempfile::tempdir().expect("tmp");
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, vec![0u8; 4096]).expect("raw");
        let base = BaseDisk::open(&raw).expect("raw opens");
        assert_eq!((base.format, base.size), ("raw", 4096));
        let qcow = dir.path().join("base.qcow2");
        let mut header = b"QFI\xfb".to_vec();
        header.resize(24, 0);
        header.extend_from_slice(&(10u64 << 30).to_be_bytes());
        std::fs::write(&qcow, header).expect("qcow2");
        let base = BaseDisk::open(&qcow).expect("qcow2 opens");
        assert_eq!((base.format, base.size), ("qcow2", 10 << 30));
        assert!(
            base.overlay_xml("x.qcow2")
                .contains("<format type='qcow2'/></backingStore>")
        );
        let err = BaseDisk::open(&dir.path().join("missing"))
            .err()
            .expect("missing");
        assert!(err.to_string().contains("cannot be read"), "{err}");
    }
}
