//! `main` for every driver: argv, settings, signals, the stage, and the one place where an
//! outcome becomes an exit code.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use drover_protocol::{ControlVariables, Outcome, Stage};
use tokio_util::sync::CancellationToken;

use crate::driver::{Driver, GcRequest, Script};
use crate::log::{Stream, error_line, write_all};
use crate::process::kill_live_groups;
use crate::settings::{Settings, settings_path};
use crate::{Error, Job, Result, signals};

/// The exit code for failures before the job's control variables could be read: the runner's
/// constant for a system failure (§1.1).
const SYSTEM_FAILURE: u8 = 2;

/// How long a cancelled config or prepare may take to wind down. Its outcome is a system
/// failure whatever it does (§6.3), and the runner always calls cleanup next (§5.1), so there
/// is nothing to wait for: a backend call that takes seconds (creating a VM or an instance)
/// must not hold the runner.
const SETUP_CANCEL_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(disable_help_subcommand = true)]
struct Cli {
    /// Operator settings file (TOML). Default: $DROVER_CONFIG. Put it in `*_args` before the
    /// stage, e.g. `run_args = ["--config", "/etc/drover/driver.toml", "run"]`.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// config_exec: print the job's configuration as one JSON value.
    Config,
    /// prepare_exec: create the job's environment.
    Prepare,
    /// run_exec: run a script; the runner appends `<script> <stage>` as the last two arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0.., value_name = "ARGS")]
        args: Vec<OsString>,
    },
    /// cleanup_exec: remove the job's environment.
    Cleanup,
    /// Remove resources of jobs whose cleanup never ran.
    Gc {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check that the backend is usable and say what to fix.
    Doctor,
}

/// Runs the driver `D` as GitLab Runner invoked it and returns the exit code the runner
/// expects. A driver's `main` is this one call:
///
/// ```no_run
/// # struct MyDriver;
/// # impl drover_core::Driver for MyDriver {
/// #     const NAME: &'static str = "my-driver";
/// #     const VERSION: &'static str = "0.1.0";
/// #     type Settings = toml::Table;
/// #     fn new(_: &drover_core::Settings<toml::Table>) -> drover_core::Result<Self> { Ok(MyDriver) }
/// #     async fn prepare(&self, _: &drover_core::Job) -> drover_core::Result<()> { Ok(()) }
/// #     async fn run(&self, _: &drover_core::Job, _: &drover_core::Script) -> drover_core::Result<i32> { Ok(0) }
/// #     async fn cleanup(&self, _: &drover_core::Job) -> drover_core::Result<()> { Ok(()) }
/// # }
/// fn main() -> std::process::ExitCode {
///     drover_core::run::<MyDriver>()
/// }
/// ```
pub fn run<D: Driver>() -> ExitCode {
    let command = Cli::command()
        .name(D::NAME)
        .version(D::VERSION)
        .about(format!(
            "{} {}: a GitLab Runner custom-executor driver (drover)",
            D::NAME,
            D::VERSION
        ));
    let parsed = command
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let message = err.to_string();
            let first = message.lines().next().unwrap_or("invalid arguments");
            error_line(D::NAME, &first.trim_start_matches("error: "));
            return ExitCode::from(SYSTEM_FAILURE);
        }
    };
    install_panic_hook(D::NAME);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error_line(
                D::NAME,
                &format_args!("cannot start the async runtime: {err}"),
            );
            return ExitCode::from(SYSTEM_FAILURE);
        }
    };
    // A panic is a bug, but the runner must still see a system failure, not the "unknown"
    // exit code 101 (§10 item 15); the hook has already printed it as one line.
    let code = panic::catch_unwind(AssertUnwindSafe(|| runtime.block_on(main::<D>(cli))))
        .unwrap_or(SYSTEM_FAILURE);
    kill_live_groups();
    ExitCode::from(code)
}

fn install_panic_hook(driver: &'static str) {
    panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        error_line(
            driver,
            &format_args!(
                "internal error: {message}{location}; this is a bug in the driver, please report it"
            ),
        );
    }));
}

async fn main<D: Driver>(cli: Cli) -> u8 {
    // First, so a SIGTERM from here on is a cancellation rather than death (§6).
    let cancel = match signals::install() {
        Ok(cancel) => cancel,
        Err(err) => return fail::<D>(&err, None),
    };
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let settings: Settings<D::Settings> =
        match Settings::load(settings_path(cli.config, &env).as_deref(), &env) {
            Ok(settings) => settings,
            Err(err) => return fail::<D>(&err, None),
        };
    let driver = match D::new(&settings) {
        Ok(driver) => driver,
        Err(err) => return fail::<D>(&err, None),
    };
    let stage = match cli.command {
        Command::Config => Stage::Config,
        Command::Prepare => Stage::Prepare,
        Command::Cleanup => Stage::Cleanup,
        Command::Run { args } => match Stage::run_from_trailing_args(&args) {
            Ok(stage) => stage,
            Err(err) => return fail::<D>(&err.into(), None),
        },
        Command::Gc { dry_run } => return gc(&driver, &settings, dry_run, &cancel).await,
        Command::Doctor => return doctor(&driver, &cancel).await,
    };
    let job = match Job::load(
        &env,
        &settings.runner_name,
        settings.policy.clone(),
        Duration::from_secs(settings.gc_grace_secs),
        cancel.clone(),
    )
    .await
    {
        Ok(job) => job,
        Err(err) => return fail::<D>(&err, None),
    };
    let grace = Duration::from_secs(settings.cancel_grace_secs);
    let outcome = run_stage(&driver, &job, stage, grace).await;
    outcome.process_exit_code(Some(&job.env().control))
}

async fn run_stage<D: Driver>(driver: &D, job: &Job, stage: Stage, grace: Duration) -> Outcome {
    let control = &job.env().control;
    let cancel = job.cancel_token();
    match stage {
        Stage::Config => {
            match until_cancelled(driver.config(job), cancel, SETUP_CANCEL_GRACE).await {
                Ok(output) if !cancel.is_cancelled() => {
                    match write_all(Stream::Stdout, output.to_json().as_bytes()) {
                        Ok(()) => Outcome::Success,
                        Err(err) => failed::<D>(
                            &Error::system(format!("cannot write config: {err}")),
                            control,
                        ),
                    }
                }
                result => setup_failed::<D>(result.err(), cancel.is_cancelled(), control),
            }
        }
        Stage::Prepare => {
            match until_cancelled(driver.prepare(job), cancel, SETUP_CANCEL_GRACE).await {
                Ok(()) if !cancel.is_cancelled() => Outcome::Success,
                result => setup_failed::<D>(result.err(), cancel.is_cancelled(), control),
            }
        }
        Stage::Run { script, sub_stage } => {
            // A code left by an earlier stage must not be read as this one's (§4.5).
            if let Err(err) = reset_build_exit_code(control) {
                return failed::<D>(&err, control);
            }
            // The runner passes an absolute path (§1.4); a relative one, from a person at a
            // terminal, must not change meaning when a driver runs it from another directory.
            let path = std::path::absolute(&script).unwrap_or(script);
            // The runner always writes the script first: a missing one is the infrastructure's
            // fault, the same for every driver, and never the job's.
            if !path.is_file() {
                return failed::<D>(
                    &Error::system(format!(
                        "the runner's script {} does not exist or is not a file",
                        path.display()
                    )),
                    control,
                );
            }
            let script = Script { path, sub_stage };
            match until_cancelled(driver.run(job, &script), cancel, grace).await {
                Ok(status) => {
                    let outcome = Outcome::from_script_status(status);
                    match record_build_exit_code(control, outcome) {
                        Ok(()) => outcome,
                        Err(err) => failed::<D>(&err, control),
                    }
                }
                Err(err) => failed::<D>(&err, control),
            }
        }
        Stage::Cleanup => match driver.cleanup(job).await {
            // Cancels and job timeouts never reach cleanup (§1.5); only `cleanup_exec_timeout`
            // sends it SIGTERM (§6.2). Cleanup deliberately finishes anyway: stopping half-way
            // would leak what it was removing, and the runner's SIGKILL still bounds it.
            Ok(()) => Outcome::Success,
            Err(err) => failed::<D>(&err, control),
        },
    }
}

/// Awaits the stage; once cancelled, gives it `grace` to wind down (it sees the same token)
/// and then abandons it.
async fn until_cancelled<T>(
    stage: impl Future<Output = Result<T>>,
    cancel: &CancellationToken,
    grace: Duration,
) -> Result<T> {
    tokio::pin!(stage);
    tokio::select! {
        result = &mut stage => return result,
        () = cancel.cancelled() => {}
    }
    match tokio::time::timeout(grace, stage).await {
        Ok(result) => result,
        Err(_) => Err(Error::system(format!(
            "cancelled, and the stage did not stop within {} s",
            grace.as_secs()
        ))),
    }
}

/// A config or prepare that failed or was cancelled. A cancel must give a system failure,
/// never 1: exit 1 here would be a non-retried script failure (§6.3, §10 item 8).
fn setup_failed<D: Driver>(
    err: Option<Error>,
    cancelled: bool,
    control: &ControlVariables,
) -> Outcome {
    let err = match err {
        Some(err) if !cancelled => err,
        Some(err) => Error::system(format!("cancelled by the runner: {err}")),
        None => Error::system("cancelled by the runner (SIGTERM)"),
    };
    failed::<D>(&err, control)
}

fn failed<D: Driver>(err: &Error, control: &ControlVariables) -> Outcome {
    error_line(D::NAME, err);
    let outcome = err.outcome();
    if let Err(write_err) = record_build_exit_code(control, outcome) {
        error_line(D::NAME, &write_err);
        return Outcome::SystemFailure;
    }
    outcome
}

fn fail<D: Driver>(err: &Error, control: Option<&ControlVariables>) -> u8 {
    error_line(D::NAME, err);
    err.outcome().process_exit_code(control)
}

fn reset_build_exit_code(control: &ControlVariables) -> Result<()> {
    record_build_exit_code(control, Outcome::Success)
}

/// Writes the script's exit code for the runner, or removes a stale one (§4.5).
fn record_build_exit_code(control: &ControlVariables, outcome: Outcome) -> Result<()> {
    let Some(path) = &control.build_exit_code_file else {
        return Ok(());
    };
    let result = match outcome.build_exit_code_file_contents() {
        Some(contents) => std::fs::write(path, contents),
        None => match std::fs::remove_file(path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    result.map_err(|err| Error::system(format!("BUILD_EXIT_CODE_FILE {}: {err}", path.display())))
}

/// `gc` and `doctor` are run by people and timers, not the runner: SIGTERM or Ctrl-C stops
/// them at once, whatever backend call they wait for.
async fn maintenance<T>(
    what: &str,
    work: impl Future<Output = Result<T>>,
    cancel: &CancellationToken,
) -> Result<T> {
    tokio::select! {
        result = work => result,
        () = cancel.cancelled() => Err(Error::system(format!("{what} was interrupted"))),
    }
}

async fn gc<D: Driver>(
    driver: &D,
    settings: &Settings<D::Settings>,
    dry_run: bool,
    cancel: &CancellationToken,
) -> u8 {
    let request = GcRequest {
        runner: settings.runner_name.clone(),
        dry_run,
        now: SystemTime::now(),
    };
    match maintenance("gc", driver.gc(&request), cancel).await {
        Ok(report) => {
            let verb = if dry_run { "would remove" } else { "removed" };
            for name in &report.removed {
                println!("{verb} {name}");
            }
            println!(
                "{} {verb}, {} kept (not expired)",
                report.removed.len(),
                report.kept
            );
            0
        }
        Err(err) => fail::<D>(&err, None),
    }
}

async fn doctor<D: Driver>(driver: &D, cancel: &CancellationToken) -> u8 {
    match maintenance("doctor", driver.doctor(), cancel).await {
        Ok(checks) => {
            for check in &checks {
                let mark = if check.ok { "ok  " } else { "FAIL" };
                println!("{mark} {}: {}", check.name, check.detail);
            }
            if checks.iter().all(|c| c.ok) { 0 } else { 1 }
        }
        Err(err) => fail::<D>(&err, None),
    }
}
