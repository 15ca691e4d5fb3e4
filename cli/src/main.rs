//! `drover`: run jobs or the conformance suite against a custom-executor driver, through the
//! user's own GitLab Runner or the emulation of it in `drover-harness`.
//!
//! Exit codes: 0 when every job (or conformance case) succeeded, 1 when one failed, 2 when drover
//! itself could not run (bad arguments, unreadable job file, driver not found, no runner binary
//! for `--runner real`, a runner that crashed).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use drover_harness::conformance::{SuiteOptions, Verdict, run_suite};
use drover_harness::coordinator::Coordinator;
use drover_harness::job::JobFile;
use drover_harness::payload::PayloadOptions;
use drover_harness::pipeline::{PipelineOutcome, RunnerMode, run_pipeline};
use drover_harness::real::{GITLAB_RUNNER_BIN, RealRunner, find_gitlab_runner, helper_dir};
use drover_harness::repository::serve_checkout;
use drover_harness::{CancelHandle, Driver, Hooks, JobResult, RunnerOptions};

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "Play GitLab Runner against a custom-executor driver",
    after_help = "Exit status: 0 every job (or conformance case) succeeded; 1 a job failed, was \
                  canceled or skipped; 2 drover could not run (bad arguments or job file, driver \
                  not found, no GitLab Runner for --runner real, the runner itself broke)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The driver, as `[runners.custom]` would name it.
#[derive(clap::Args)]
struct DriverArgs {
    /// The driver executable (config_exec, prepare_exec, run_exec and cleanup_exec alike): a
    /// path, or a name looked up beside this `drover` binary and then on PATH.
    #[arg(long)]
    driver: PathBuf,
    /// An argument placed before the stage word (like `*_args`); repeatable.
    #[arg(long = "driver-arg", allow_hyphen_values = true)]
    driver_args: Vec<OsString>,
}

impl DriverArgs {
    /// The driver, or an error when there is no such executable: a missing driver is drover's
    /// problem (exit 2), not a failed job.
    fn driver(&self) -> anyhow::Result<Driver> {
        let program = resolve_driver(&self.driver);
        let runnable = std::fs::metadata(&program)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0);
        anyhow::ensure!(
            runnable,
            "driver {} not found: pass a path to an executable, or the name of one beside drover or on PATH",
            self.driver.display()
        );
        Ok(Driver {
            program,
            args: self.driver_args.clone(),
        })
    }
}

/// Makes the driver's path independent of the working directory: every stage runs in the
/// job's temp dir (§1.1), where a relative path would name nothing.
fn resolve_driver(driver: &Path) -> PathBuf {
    if driver.components().count() > 1 {
        return std::path::absolute(driver).unwrap_or_else(|_| driver.to_owned());
    }
    let beside_drover = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned));
    // Beside drover first: a build tree's driver, not an older one installed on PATH.
    beside_drover
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .map(|dir| dir.join(driver))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| driver.to_owned())
}

/// Which runner plays GitLab Runner.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RunnerKind {
    /// The real `gitlab-runner run-single` when a binary is found, else the emulation.
    Auto,
    /// Your own `gitlab-runner` (`--gitlab-runner`, `$GITLAB_RUNNER_BIN` or PATH), against
    /// drover's fake GitLab on 127.0.0.1.
    Real,
    /// drover's emulation of the custom executor.
    Emulated,
}

#[derive(Subcommand)]
enum Command {
    /// Run the jobs of a `.gitlab-ci.yml` subset, in stage order, printing the job log live.
    RunJob {
        /// The job file.
        file: PathBuf,
        #[command(flatten)]
        driver: DriverArgs,
        /// Run only this job.
        #[arg(long)]
        job: Option<String>,
        /// `builds_dir` unless the driver's config overrides it.
        #[arg(long, default_value = "/builds")]
        builds_dir: String,
        /// `cache_dir` unless the driver's config overrides it.
        #[arg(long, default_value = "/cache")]
        cache_dir: String,
        /// Which runner to use.
        #[arg(long, value_enum, default_value = "auto")]
        runner: RunnerKind,
        /// A git repository (a work tree) on this host whose current commit the jobs check
        /// out, as from GitLab; without one, jobs run with GIT_STRATEGY=none.
        #[arg(long, value_name = "DIR")]
        repo: Option<PathBuf>,
        /// The GitLab Runner binary (default: $GITLAB_RUNNER_BIN, then `gitlab-runner` on
        /// PATH). It runs the jobs with `--runner real`, and in both modes it is put on the
        /// job environment's PATH as `gitlab-runner`, for cache and artifacts.
        #[arg(long, value_name = "PATH")]
        gitlab_runner: Option<PathBuf>,
    },
    /// Run the conformance suite; exits 0 only if every case passes, 1 if one fails.
    Conformance {
        #[command(flatten)]
        driver: DriverArgs,
        /// `image:` for every job (container drivers).
        #[arg(long)]
        image: Option<String>,
        /// Run only this case; repeatable.
        #[arg(long = "case")]
        cases: Vec<String>,
    },
}

/// How a run ended, as `drover`'s exit status.
enum Outcome {
    /// Every job or case succeeded: 0.
    Succeeded,
    /// A job failed, was canceled or was skipped, or a conformance case failed: 1.
    Failed,
}

/// drover itself could not run: 2, the status clap also gives to bad arguments.
const CANNOT_RUN: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("drover: cannot start the async runtime: {err}");
            return ExitCode::from(CANNOT_RUN);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Succeeded) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("drover: {err:#}");
            ExitCode::from(CANNOT_RUN)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::RunJob {
            file,
            driver,
            job,
            builds_dir,
            cache_dir,
            runner,
            gitlab_runner,
            repo,
        } => {
            let driver = driver.driver()?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let jobs = JobFile::parse(&text).with_context(|| format!("in {}", file.display()))?;
            let selected = match &job {
                Some(name) => vec![jobs.job(name)?],
                None => jobs.jobs_in_stage_order(),
            };
            let work_dir = tempfile::Builder::new()
                .prefix("drover-run-job")
                .tempdir()?;
            let binary = find_gitlab_runner(gitlab_runner.as_deref());
            let mode = match (runner, binary) {
                (RunnerKind::Real | RunnerKind::Auto, Some(binary)) => {
                    let real = RealRunner {
                        binary,
                        builds_dir,
                        cache_dir,
                        work_dir: work_dir.path().to_owned(),
                    };
                    let version = real
                        .version()
                        .await
                        .unwrap_or_else(|| "unknown version".into());
                    eprintln!(
                        "drover: running through {} ({version}) and drover's fake GitLab",
                        real.binary.display()
                    );
                    RunnerMode::Real(real)
                }
                (RunnerKind::Real, None) => anyhow::bail!(
                    "--runner real needs a GitLab Runner binary: pass --gitlab-runner PATH, set {GITLAB_RUNNER_BIN}, or put gitlab-runner on PATH"
                ),
                (RunnerKind::Emulated | RunnerKind::Auto, binary) => {
                    let path_prefix = match binary {
                        Some(binary) => Some(helper_dir(&binary, work_dir.path())?),
                        None => None,
                    };
                    RunnerMode::Emulated(RunnerOptions {
                        builds_dir,
                        cache_dir,
                        path_prefix,
                        ..RunnerOptions::default()
                    })
                }
            };
            let coordinator = Coordinator::start(work_dir.path().join("artifacts")).await?;
            let source = match &repo {
                Some(repo) => Some(
                    serve_checkout(
                        repo,
                        work_dir.path(),
                        &coordinator,
                        &PayloadOptions::fresh().project_path(),
                    )
                    .map_err(anyhow::Error::msg)?,
                ),
                None => None,
            };
            let cancel = CancelHandle::new();
            // Ctrl-C once is a graceful cancel, twice an abort (§6.2).
            tokio::spawn({
                let cancel = cancel.clone();
                async move {
                    while tokio::signal::ctrl_c().await.is_ok() {
                        cancel.cancel();
                    }
                }
            });
            let hooks = Hooks {
                on_log: Some(Arc::new(|chunk: &[u8]| {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(chunk);
                    let _ = out.flush();
                })),
                ..Hooks::default()
            };
            let outcomes = run_pipeline(
                &jobs,
                &selected,
                &driver,
                &mode,
                &coordinator,
                source.as_ref(),
                &hooks,
                &cancel,
            )
            .await;
            let mut all_ok = true;
            let mut broken = None;
            for job in &outcomes {
                let line = match &job.outcome {
                    PipelineOutcome::Finished(report) => {
                        all_ok &= report.result == JobResult::Success;
                        let detail = match &report.result {
                            JobResult::RunnerSystemFailure { reason } => format!(": {reason}"),
                            _ => String::new(),
                        };
                        format!("result: {}{detail}", report.result)
                    }
                    PipelineOutcome::Skipped(why) => {
                        all_ok = false;
                        format!("skipped: {why}")
                    }
                    PipelineOutcome::Broken(err) => {
                        broken.get_or_insert_with(|| format!("job {}: {err}", job.name));
                        format!("could not run: {err}")
                    }
                };
                println!("Job {} {line}", job.name);
            }
            if let Some(broken) = broken {
                anyhow::bail!("the runner could not run {broken}");
            }
            Ok(if all_ok {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            })
        }
        Command::Conformance {
            driver,
            image,
            cases,
        } => {
            let options = SuiteOptions {
                image,
                cases,
                ..SuiteOptions::new(driver.driver()?)
            };
            let results = run_suite(&options, |result| println!("{result}")).await;
            let count = |verdict: fn(&Result<Verdict, String>) -> bool| {
                results.iter().filter(|r| verdict(&r.outcome)).count()
            };
            let passed = count(|o| matches!(o, Ok(Verdict::Passed)));
            let not_applicable = count(|o| matches!(o, Ok(Verdict::NotApplicable(_))));
            let failed = count(Result::is_err);
            println!("{passed} passed, {failed} failed, {not_applicable} not applicable");
            Ok(if failed == 0 {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            })
        }
    }
}
