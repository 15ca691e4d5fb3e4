//! The emulated runner against small bash drivers written by the test: a well-behaved one,
//! and broken ones whose mistakes (contract §10) the harness must catch.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_harness::conformance::{SIMPLE_JOB_CALLS, SuiteOptions, run_suite};
use drover_harness::job::Job;
use drover_harness::payload::{PayloadOptions, job_payload};
use drover_harness::{
    CallExit, CancelHandle, Driver, ExecStage, Hooks, JobReport, JobResult, KillCause,
    RunnerOptions, run_job,
};

/// A driver that does everything right: config JSON only on stdout, prepare exits 2 on SIGTERM,
/// run maps the script's status to 1 + BUILD_EXIT_CODE_FILE, cleanup is idempotent.
const GOOD: &str = r#"#!/usr/bin/env bash
base=__BASE__
for arg in "$@"; do case "$arg" in config|prepare|run|cleanup) stage=$arg; break;; esac; done
case "$stage" in
config)
  printf '{"builds_dir":"%s/builds","cache_dir":"%s/cache","builds_dir_is_shared":true,"driver":{"name":"bash-test","version":"1.0"}}\n' "$base" "$base" ;;
prepare)
  trap 'exit 2' TERM
  echo "preparing"
  mkdir -p "$base/builds"
  sleep __PREPARE_SLEEP__ & wait ;;
run)
  script="${@: -2:1}"
  rm -f "$BUILD_EXIT_CODE_FILE"
  bash "$script"
  rc=$?
  if [ "$rc" -ne 0 ]; then echo "$rc" > "$BUILD_EXIT_CODE_FILE"; exit 1; fi ;;
cleanup)
  echo "cleaned" ;;
*) exit 2 ;;
esac
"#;

/// Breaks `GOOD` the way §10 item 1 describes: the script's status goes straight out.
fn passthrough(driver: String) -> String {
    driver.replace(
        "if [ \"$rc\" -ne 0 ]; then echo \"$rc\" > \"$BUILD_EXIT_CODE_FILE\"; exit 1; fi",
        "exit $rc",
    )
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn base(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a driver from `GOOD` with `edit` applied.
    fn driver(&self, name: &str, edit: impl Fn(String) -> String) -> Driver {
        let text = GOOD
            .replace("__BASE__", &format!("'{}'", self.base().display()))
            .replace("__PREPARE_SLEEP__", "0");
        let path: PathBuf = self.base().join(name);
        std::fs::write(&path, edit(text)).expect("write driver");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Driver::new(path).arg("--leading-arg")
    }

    fn options(&self) -> RunnerOptions {
        RunnerOptions {
            graceful_kill_timeout: Duration::from_secs(2),
            force_kill_timeout: Duration::from_secs(2),
            prepare_retry_interval: Duration::from_millis(100),
            temp_root: Some(self.base().to_path_buf()),
            ..RunnerOptions::default()
        }
    }

    async fn run(&self, driver: &Driver, job: Job, options: &RunnerOptions) -> JobReport {
        let payload = job_payload(&job, &[], &PayloadOptions::fresh());
        run_job(
            driver,
            &payload,
            options,
            &Hooks::default(),
            &CancelHandle::new(),
        )
        .await
    }

    fn leftover_executor_dirs(&self) -> usize {
        std::fs::read_dir(self.base())
            .expect("read base")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("custom-executor")
            })
            .count()
    }
}

fn job(script: &[&str]) -> Job {
    Job {
        name: "t".into(),
        stage: "test".into(),
        script: script.iter().map(|s| s.to_string()).collect(),
        ..Job::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_driver_runs_a_job_like_the_runner() {
    let fx = Fixture::new();
    let driver = fx.driver("good", |t| t);
    let report = fx
        .run(&driver, job(&["echo \"hi $((6*7))\""]), &fx.options())
        .await;
    let log = report.log_text();
    assert_eq!(report.result, JobResult::Success, "{log}");
    assert_eq!(
        report.call_kinds(),
        SIMPLE_JOB_CALLS,
        "{:?}",
        report.call_names()
    );
    for text in [
        "Using Custom executor with driver bash-test 1.0...",
        "preparing\n",
        "Executing \"step_script\" stage of the job script",
        "$ echo \"hi $((6*7))\"",
        "hi 42\n",
        "Skipping Git repository setup",
        "Job succeeded",
    ] {
        assert!(log.contains(text), "{text:?} missing from\n{log}");
    }
    // cleanup's output goes to the debug record, never to the job log (§1.5).
    assert!(!log.contains("cleaned"));
    assert_eq!(report.cleanup_output, b"cleaned\n");
    assert_eq!(
        fx.leftover_executor_dirs(),
        0,
        "temp dirs are removed after cleanup"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_come_from_the_build_exit_code_file() {
    let fx = Fixture::new();
    let driver = fx.driver("good", |t| t);
    let report = fx.run(&driver, job(&["exit 3"]), &fx.options()).await;
    assert_eq!(report.result, JobResult::ScriptFailure { exit_code: 3 });
    assert!(
        report
            .log_text()
            .contains("ERROR: Job failed: exit status 3")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_driver_passing_exit_3_through_is_a_system_failure() {
    let fx = Fixture::new();
    let driver = fx.driver("passthrough", passthrough);
    let report = fx.run(&driver, job(&["exit 3"]), &fx.options()).await;
    match &report.result {
        JobResult::RunnerSystemFailure { reason } => {
            assert!(
                reason.starts_with("unknown Custom executor executable exit code 3"),
                "{reason}"
            )
        }
        other => panic!("want a system failure, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_line_before_the_config_json_fails_after_three_attempts() {
    let fx = Fixture::new();
    let driver = fx.driver("chatty", |t| {
        t.replace("config)\n", "config)\n  echo 'starting up'\n")
    });
    let report = fx.run(&driver, job(&["true"]), &fx.options()).await;
    assert!(
        matches!(&report.result, JobResult::RunnerSystemFailure { reason } if reason.contains("error while parsing JSON output")),
        "{:?}",
        report.result
    );
    let (config, cleanup) = (ExecStage::Config, ExecStage::Cleanup);
    let stages: Vec<ExecStage> = report.calls.iter().map(|c| c.stage).collect();
    assert_eq!(stages, [config, cleanup, config, cleanup, config, cleanup]);
    assert_eq!(report.log_text().matches("Preparation failed").count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_child_holding_stdout_keeps_prepare_running_until_the_kill() {
    let fx = Fixture::new();
    let driver = fx.driver("leaky", |t| {
        t.replace("sleep 0 & wait ;;", "sleep 30 & exit 0 ;;")
    });
    let options = RunnerOptions {
        prepare_exec_timeout: Duration::from_secs(1),
        ..fx.options()
    };
    let started = Instant::now();
    let report = fx.run(&driver, job(&["true"]), &options).await;
    let prepare = &report.calls[1];
    assert_eq!(prepare.stage, ExecStage::Prepare);
    // The driver exited at once, yet the call lasted until the exec timeout killed the
    // pipe holder (§6.1); the exit status 0 then counts as success, as in the runner.
    assert!(prepare.duration >= Duration::from_secs(1), "{prepare:?}");
    assert_eq!(prepare.killed_by, Some(KillCause::StageTimeout));
    assert_eq!(prepare.exit, CallExit::Code(0));
    assert_eq!(report.result, JobResult::Success);
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_timeout_kills_the_script_and_still_cleans_up() {
    let fx = Fixture::new();
    let driver = fx.driver("good", |t| t);
    let mut job = job(&["sleep 300"]);
    job.timeout = Some(Duration::from_secs(2));
    job.after_script = vec!["echo \"after $((6*7))\"".into()];
    let started = Instant::now();
    let report = fx.run(&driver, job, &fx.options()).await;
    assert_eq!(report.result, JobResult::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = report.log_text();
    assert!(
        !log.contains("after 42"),
        "after_script must not run after a timeout"
    );
    assert!(
        log.contains("execution took longer than 2s seconds"),
        "{log}"
    );
    assert_eq!(
        report.calls.last().map(|c| c.stage),
        Some(ExecStage::Cleanup)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_conformance_suite_passes_against_a_good_driver() {
    let fx = Fixture::new();
    let driver = fx.driver("good", |t| t.replace("sleep 0 & wait", "sleep 1 & wait"));
    let mut options = SuiteOptions::new(driver);
    options.runner.temp_root = Some(fx.base().to_path_buf());
    options.runner.graceful_kill_timeout = Duration::from_secs(3);
    options.cases = [
        "success",
        "script-exit-2",
        "after-script-after-failure",
        "cancel-during-script",
        "cleanup-idempotent",
        "non-utf8-output",
        "config-stdout-strict",
        "overridden-job-id",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    let results = run_suite(&options, |_| {}).await;
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.outcome.is_err())
        .map(|r| r.to_string())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_conformance_suite_catches_a_driver_that_passes_exit_codes_through() {
    let fx = Fixture::new();
    let driver = fx.driver("passthrough", passthrough);
    let mut options = SuiteOptions::new(driver);
    options.runner.temp_root = Some(fx.base().to_path_buf());
    options.cases = vec!["script-exit-3".into(), "script-exit-2".into()];
    let results = run_suite(&options, |_| {}).await;
    assert!(results.iter().all(|r| r.outcome.is_err()), "{results:?}");
}
