//! `drover-local`: runs each GitLab job in a directory of its own on the runner host.
//!
//! It is the zero-dependency default of drover's quickstart and the template for driver
//! authors: every line below is what *any* backend has to decide, with the backend itself
//! reduced to a directory and a local `bash`. Copy it, replace the directory with a container,
//! a VM or an instance, and keep the rest. Section numbers (§) refer to the project's
//! `contract.md`.
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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use drover_core::naming::is_expired;
use drover_core::protocol::ConfigOutput;
use drover_core::{
    Check, Driver, Error, GcReport, GcRequest, Job, JobCommand, Result, ResultExt, Script,
    Settings, base_config, progress,
};
use serde::Deserialize;

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
}

/// The driver: only what it needs from the settings.
struct LocalDriver {
    root: PathBuf,
    prepare_hook: Vec<String>,
    shell: String,
    builds_dir: Option<String>,
    cache_dir: Option<String>,
}

/// The name of the file holding a job directory's labels.
const LABELS_FILE: &str = "drover-job.json";

/// Every process of a job carries this variable, so cleanup can find the ones that escaped
/// their process group (`setsid`, double fork) and would otherwise outlive the job.
const JOB_TAG: &str = "DROVER_LOCAL_JOB";

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
            builds_dir: settings.builds_dir.clone(),
            cache_dir: settings.cache_dir.clone(),
        })
    }

    /// §2: the directories are paths "inside the job environment", which for this driver is
    /// the host. Each job gets its own builds dir, named from its trusted identity, so
    /// concurrent jobs never share a checkout (§10 item 6) and `builds_dir_is_shared` stays
    /// false. The cache dir is shared by every job, which is what lets a cache survive (§8).
    async fn config(&self, job: &Job) -> Result<ConfigOutput> {
        let job_dir = self.job_dir(job);
        Ok(ConfigOutput {
            builds_dir: Some(match &self.builds_dir {
                Some(dir) => format!("{dir}/{}", job.names().job()),
                None => job_dir.join("builds").display().to_string(),
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

    /// §1.3. A directory of the same name can only be a leftover of an earlier attempt of this
    /// job (§5.1), so it is removed first.
    async fn prepare(&self, job: &Job) -> Result<()> {
        let started = std::time::Instant::now();
        let dir = self.job_dir(job);
        progress!("Preparing job directory {}", dir.display());
        if dir.exists() {
            self.remove_job_dir(&dir, &job.names().job()).await?;
        }
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
        if let Some((program, args)) = self.prepare_hook.split_first() {
            progress!("Running prepare hook {program}");
            let status = JobCommand::new(program)
                .args(args)
                .current_dir(&dir)
                .env(JOB_TAG, job.names().job())
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
    /// it leaves behind; we only return the script's status.
    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        let dir = self.job_dir(job);
        if !dir.join(LABELS_FILE).exists() {
            return Err(Error::system(format!(
                "job directory {} does not exist; did prepare_exec run?",
                dir.display()
            )));
        }
        JobCommand::for_job(&self.shell)
            .arg(&script.path)
            .current_dir(&dir)
            .env("HOME", dir.join("home"))
            .env(JOB_TAG, job.names().job())
            .stream(job.cancel_token())
            .await
    }

    /// §1.5: may run without prepare and more than once, so a missing directory is success.
    async fn cleanup(&self, job: &Job) -> Result<()> {
        self.remove_job_dir(&self.job_dir(job), &job.names().job())
            .await
    }

    /// Job directories of this runner whose expiry label has passed: their cleanup never ran
    /// (a runner crash, §6.3).
    async fn gc(&self, request: &GcRequest) -> Result<GcReport> {
        let mut report = GcReport::default();
        let jobs = self.root.join("jobs");
        let Ok(mut entries) = tokio::fs::read_dir(&jobs).await else {
            return Ok(report);
        };
        while let Some(entry) = entries.next_entry().await.or_system(jobs.display())? {
            let dir = entry.path();
            let Ok(bytes) = tokio::fs::read(dir.join(LABELS_FILE)).await else {
                continue;
            };
            let labels: BTreeMap<String, String> =
                serde_json::from_slice(&bytes).unwrap_or_default();
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_expired(&labels, &request.runner, request.now) {
                report.kept += usize::from(
                    labels.get(drover_core::naming::LABEL_RUNNER) == Some(&request.runner),
                );
                continue;
            }
            if !request.dry_run {
                self.remove_job_dir(&dir, &name).await?;
            }
            report.removed.push(name);
        }
        Ok(report)
    }

    async fn doctor(&self) -> Result<Vec<Check>> {
        let mut checks = Vec::new();
        let probe = self.root.join(".doctor-probe");
        let writable = tokio::fs::create_dir_all(&self.root).await.is_ok()
            && tokio::fs::write(&probe, b"ok").await.is_ok()
            && tokio::fs::remove_file(&probe).await.is_ok();
        checks.push(if writable {
            Check::ok("root", format!("{} is writable", self.root.display()))
        } else {
            Check::failed(
                "root",
                format!(
                    "cannot write to {}; set [driver] root to a writable directory",
                    self.root.display()
                ),
            )
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
    fn job_dir(&self, job: &Job) -> PathBuf {
        self.root.join("jobs").join(job.names().job())
    }

    /// Kills the job's leftover processes, then removes its directory.
    async fn remove_job_dir(&self, dir: &Path, name: &str) -> Result<()> {
        processes::kill_tagged(JOB_TAG, name);
        match tokio::fs::remove_dir_all(dir).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(Error::system(format!(
                "cannot remove {}: {err}",
                dir.display()
            ))),
            _ => Ok(()),
        }
    }
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
