//! `drover-local`: runs each GitLab job in a directory of its own on the runner host.
//!
//! It is the zero-dependency default of drover's quickstart and the template for driver
//! authors: every line below is what *any* backend has to decide, with the backend itself
//! reduced to a directory and a local `bash`. Copy it, replace the directory with a container,
//! a VM or an instance, and keep the rest. Section numbers (§) refer to the project's
//! `contract.md`.
//!
//! # Trust model
//!
//! A job's scripts run **on the runner host, as the driver's user, with all of that user's
//! access**: its files, its network, its credentials, and the other jobs of the same runner
//! (and all of the host, if that user is root). A job directory keeps jobs from tripping over
//! each other, not from reaching each other. This is the trust model of GitLab's shell
//! executor: use drover-local only for projects whose every committer you would give a shell
//! on the host as that user. For anything else use a driver that gives each job a container
//! or a VM.
//!
//! What it does contain is the job's processes, so that none outlives the stage that started
//! it, wherever it went: a cgroup v2 of the job's own where the driver can create one, else
//! each stage's driver is a child subreaper that kills all its descendants when the stage
//! ends ([`processes`] says how, and what that cannot stop: a job running as the driver's
//! user, root above all, can move itself out of any cgroup it can see).
//!
//! What the core ([`drover_core`]) already does for us, so this file never does it: parse argv
//! (script and stage are the last two arguments), read settings and the job, turn SIGTERM into
//! cancellation, choose exit codes, write `BUILD_EXIT_CODE_FILE`, catch panics.
//!
//! Layout under `root` (settings, default `/var/lib/drover-local` for root, else
//! `~/.local/share/drover-local`):
//!
//! ```text
//! jobs/drover-<runner>-p<project>-j<job>/   one per job, removed by cleanup
//!     drover-job.json                      labels: runner, project, job, expiry (for gc)
//!     builds/                              builds_dir: the project is checked out below it
//!     home/                                $HOME of the job's processes
//! cache/                                   cache_dir: shared by all jobs, so caches survive
//! ```
//!
//! With the operator's `builds_dir` set, the checkout is `<builds_dir>/<job name>/` instead;
//! cleanup removes it too, and gc removes this runner's ones whose job directory is gone.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};

use drover_core::naming::is_expired;
use drover_core::protocol::ConfigOutput;
use drover_core::{
    Check, Driver, Error, GcReport, GcRequest, Job, JobCommand, ResourceNames, Result, ResultExt,
    Script, Settings, base_config, progress,
};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::processes::{JOB_TAG, StageProcesses, Tracking};

mod cgroup;
mod processes;

/// The driver's `[driver]` table in the operator's settings file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalSettings {
    /// Where job directories and the cache live.
    #[serde(default)]
    root: Option<PathBuf>,
    /// A command run in the job directory at the start of prepare, with its output in the job
    /// log (e.g. to provision tools). A non-zero exit fails prepare, which the runner retries.
    #[serde(default)]
    prepare_hook: Vec<String>,
    /// The interpreter for the runner's scripts. It must match the runner's shell (§4.3, §7):
    /// `bash` by default.
    #[serde(default = "drover_core::settings::default_shell")]
    shell: String,
    /// How the job's processes are tracked so that none outlives its stage: `auto` (a cgroup v2
    /// of the job's own where the driver can create one, else `subreaper`), `cgroup` (prepare
    /// fails where there can be none) or `subreaper` (each stage's driver adopts its orphaned
    /// descendants and kills them all when the stage ends).
    #[serde(default)]
    process_tracking: Tracking,
}

/// The driver: only what it needs from the settings.
struct LocalDriver {
    root: PathBuf,
    prepare_hook: Vec<String>,
    shell: String,
    tracking: Tracking,
    builds_dir: Option<String>,
    cache_dir: Option<String>,
}

/// The name of the file holding a job directory's labels.
const LABELS_FILE: &str = "drover-job.json";

impl Driver for LocalDriver {
    const NAME: &'static str = "drover-local";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Settings = LocalSettings;

    fn new(settings: &Settings<LocalSettings>) -> Result<Self> {
        let root = match &settings.driver.root {
            Some(root) => root.clone(),
            None => default_root()?,
        };
        Ok(LocalDriver {
            root,
            prepare_hook: settings.driver.prepare_hook.clone(),
            shell: settings.driver.shell.clone(),
            tracking: settings.driver.process_tracking,
            builds_dir: settings.builds_dir.clone(),
            cache_dir: settings.cache_dir.clone(),
        })
    }

    /// §2: the directories are paths "inside the job environment", which for this driver is
    /// the host. Each job gets its own builds dir, named from its trusted identity, so
    /// concurrent jobs never share a checkout (§10 item 6) and `builds_dir_is_shared` stays
    /// false. The cache dir is shared by every job, which is what lets a cache survive (§8).
    async fn config(&self, job: &Job) -> Result<ConfigOutput> {
        let name = job.names().job();
        Ok(ConfigOutput {
            builds_dir: Some(match self.builds_dir_of(&name) {
                Some(dir) => dir.display().to_string(),
                None => self.job_dir(&name).join("builds").display().to_string(),
            }),
            cache_dir: Some(match &self.cache_dir {
                Some(dir) => dir.clone(),
                None => self.root.join("cache").display().to_string(),
            }),
            builds_dir_is_shared: Some(false),
            shell: Some(self.shell.clone()),
            ..base_config::<Self>()
        })
    }

    /// §1.3. Anything of the job's name (directories, cgroup, processes) can only be left by
    /// an earlier attempt of this job (§5.1), so it is removed first.
    async fn prepare(&self, job: &Job) -> Result<()> {
        let started = std::time::Instant::now();
        let name = job.names().job();
        let dir = self.job_dir(&name);
        progress!("Preparing job directory {}", dir.display());
        self.remove_job(&name).await?;
        for sub in ["builds", "home"] {
            tokio::fs::create_dir_all(dir.join(sub))
                .await
                .or_system(format_args!("cannot create {}", dir.join(sub).display()))?;
        }
        let labels = serde_json::to_vec_pretty(&job.labels()).or_system("labels")?;
        tokio::fs::write(dir.join(LABELS_FILE), labels)
            .await
            .or_system(format_args!(
                "cannot write {}",
                dir.join(LABELS_FILE).display()
            ))?;
        // After the labels, so that gc finds the job should this stage die from here on.
        let processes = StageProcesses::create(&name, self.tracking)?;
        if let Some((program, args)) = self.prepare_hook.split_first() {
            progress!("Running prepare hook {program}");
            let status = processes
                .track(
                    JobCommand::new(program)
                        .args(args)
                        .current_dir(&dir)
                        .env(JOB_TAG, &name),
                )
                .stream(job.cancel_token())
                .await?;
            if status != 0 {
                return Err(Error::system(format!(
                    "prepare_hook {program} exited with {status}"
                )));
            }
        }
        progress!("Ready in {:.2} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// §1.4: run the script with the job's shell, in the job directory, with an environment
    /// that holds nothing of the driver's (the script exports the job's variables itself,
    /// §4.3). The core streams the output, stops the process group on SIGTERM and kills what
    /// is left in it; `StageProcesses` kills what left the group. We only return the script's
    /// status.
    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        let name = job.names().job();
        let dir = self.job_dir(&name);
        if !dir.join(LABELS_FILE).exists() {
            return Err(Error::system(format!(
                "job directory {} does not exist; did prepare_exec run?",
                dir.display()
            )));
        }
        let processes = StageProcesses::open(&name, self.tracking)?;
        let status = processes
            .track(
                JobCommand::for_job(&self.shell)
                    .arg(&script.path)
                    .current_dir(&dir)
                    .env("HOME", dir.join("home"))
                    .env(JOB_TAG, &name),
            )
            .stream(job.cancel_token())
            .await;
        // Kills what the script left, before the runner starts the next stage.
        drop(processes);
        status
    }

    /// §1.5: may run without prepare and more than once, so nothing to remove is success.
    async fn cleanup(&self, job: &Job) -> Result<()> {
        self.remove_job(&job.names().job()).await
    }

    /// Job directories of this runner whose expiry label has passed: their cleanup never ran
    /// (a runner crash, §6.3). Then this runner's job directories under the operator's
    /// `builds_dir` whose job directory under `root` is gone: a cleanup that stopped half-way,
    /// or one of a version that did not remove them.
    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let mut report = GcReport::default();
        let jobs = self.root.join("jobs");
        if let Ok(mut entries) = tokio::fs::read_dir(&jobs).await {
            while let Some(entry) = entries.next_entry().await.or_system(jobs.display())? {
                self.gc_job(&entry, request, &mut report).await?;
            }
        }
        let Some(builds) = &self.builds_dir else {
            return Ok(report);
        };
        let Ok(mut entries) = tokio::fs::read_dir(builds).await else {
            return Ok(report);
        };
        while let Some(entry) = entries.next_entry().await.or_system(builds)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            // The runner makes a job's checkout only after prepare made its job directory,
            // and cleanup removes that directory last: a checkout without one is orphaned.
            if !is_job_name(&request.runner, &name)
                || tokio::fs::symlink_metadata(jobs.join(&name)).await.is_ok()
            {
                continue;
            }
            if !request.dry_run {
                remove_dir(&entry.path()).await?;
            }
            report.removed.push(entry.path().display().to_string());
        }
        Ok(report)
    }

    /// Probes `root` with a file of a random name, created with `O_EXCL`: that never follows a
    /// symlink, and no one can have put one at a name not chosen yet.
    async fn doctor(&self) -> Result<Vec<Check>> {
        let mut checks = Vec::new();
        let probe = self.root.join(format!(
            ".doctor-probe-{:016x}",
            RandomState::new().hash_one(std::process::id())
        ));
        let writable = match tokio::fs::create_dir_all(&self.root).await {
            Ok(()) => write_probe(&probe).await,
            Err(err) => Err(err),
        };
        checks.push(match writable {
            Ok(()) => Check::ok("root", format!("{} is writable", self.root.display())),
            Err(err) => Check::failed(
                "root",
                format!(
                    "cannot write to {} ({err}); set [driver] root to a writable directory",
                    self.root.display()
                ),
            ),
        });
        checks.push(match find_on_path(&self.shell) {
            Some(path) => Check::ok("shell", format!("{}", path.display())),
            None => Check::failed(
                "shell",
                format!(
                    "{} is not on PATH; install it or set [driver] shell",
                    self.shell
                ),
            ),
        });
        Ok(checks)
    }
}

impl LocalDriver {
    fn job_dir(&self, name: &str) -> PathBuf {
        self.root.join("jobs").join(name)
    }

    /// The job's checkout under the operator's `builds_dir`, if that is set.
    fn builds_dir_of(&self, name: &str) -> Option<PathBuf> {
        self.builds_dir
            .as_ref()
            .map(|dir| PathBuf::from(format!("{dir}/{name}")))
    }

    /// Kills the job's processes and removes its cgroup, its checkout under `builds_dir`, and
    /// last its job directory, whose labels let gc finish the work should this stop half-way.
    async fn remove_job(&self, name: &str) -> Result<()> {
        let killed = processes::kill_job(name);
        if let Some(builds) = self.builds_dir_of(name) {
            remove_dir(&builds).await?;
        }
        remove_dir(&self.job_dir(name)).await?;
        killed
    }

    /// gc of one entry of `root/jobs`.
    async fn gc_job(
        &self,
        entry: &tokio::fs::DirEntry,
        request: &GcRequest,
        report: &mut GcReport,
    ) -> Result<()> {
        let Ok(bytes) = tokio::fs::read(entry.path().join(LABELS_FILE)).await else {
            return Ok(());
        };
        let labels: BTreeMap<String, String> = serde_json::from_slice(&bytes).unwrap_or_default();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_expired(&labels, &request.runner, request.now) {
            report.kept +=
                usize::from(labels.get(drover_core::naming::LABEL_RUNNER) == Some(&request.runner));
            return Ok(());
        }
        if !request.dry_run {
            self.remove_job(&name).await?;
        }
        report.removed.push(name);
        Ok(())
    }
}

/// Removes a directory and everything below it; nothing there is success. A symlink is
/// removed, never followed: std's `remove_dir_all` removes a symlink itself and opens every
/// level below with `O_NOFOLLOW` (CVE-2022-21658, fixed in Rust 1.58.1), and a job can make
/// any name in its checkout a symlink.
async fn remove_dir(dir: &Path) -> Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(Error::system(format!(
            "cannot remove {}: {err}",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Whether `name` is exactly a job name of `runner`, `drover-<runner>-p<project>-j<job>` as
/// [`ResourceNames::job`] makes it: the prefix alone also matches runner `<runner>-2`'s.
fn is_job_name(runner: &str, name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix(&ResourceNames::runner_prefix(runner))
        .and_then(|rest| rest.strip_prefix('p'))
        .and_then(|rest| rest.split_once("-j"))
        .is_some_and(|(project, job)| digits(project) && digits(job))
}

/// Creates `probe`, which must not exist yet, writes to it and removes it.
async fn write_probe(probe: &Path) -> std::io::Result<()> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(probe)
        .await?;
    let written = file.write_all(b"ok").await;
    drop(file);
    // Removes the name we created; should someone have replaced it meanwhile, `unlink`
    // removes their symlink, not what it points to.
    let removed = tokio::fs::remove_file(probe).await;
    written.and(removed)
}

fn default_root() -> Result<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/drover-local"));
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/share")))
        .map(|data| data.join("drover-local"))
        .ok_or_else(|| {
            Error::system("neither HOME nor [driver] root is set; set root in the settings file")
        })
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.exists());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn main() -> std::process::ExitCode {
    drover_core::run::<LocalDriver>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_match_their_runner_exactly() {
        assert!(is_job_name("ci", "drover-ci-p1-j22"));
        assert!(!is_job_name("ci", "drover-ci-2-p1-j22"));
        assert!(!is_job_name("ci", "drover-ci-p1-j22-net"));
        assert!(!is_job_name("ci", "drover-ci-p-j1"));
        assert!(!is_job_name("ci", "drover-other-p1-j1"));
    }
}
