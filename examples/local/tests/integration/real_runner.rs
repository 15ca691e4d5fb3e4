//! drover-local through the real GitLab Runner (`gitlab-runner run-single` against drover's
//! fake GitLab). They run only when a runner binary is given (`GITLAB_RUNNER_BIN` or
//! `gitlab-runner` on PATH) and otherwise skip, saying so in one line.

use std::sync::Arc;
use std::time::Duration;

use drover_harness::conformance::{MARKER_VARIABLE, processes_with_marker};
use drover_harness::coordinator::Coordinator;
use drover_harness::job::JobFile;
use drover_harness::pipeline::{PipelineJob, PipelineOutcome, RunnerMode, run_pipeline};
use drover_harness::real::{RealRunner, helper_dir};
use drover_harness::repository::commit_files;
use drover_harness::{CancelHandle, Driver, Hooks, JobResult, RunnerOptions};
use drover_test_support::require;

use crate::util::{DRIVER, Settings};

/// Upper bound for one real job in these tests (the runner's own start-up included).
const JOB_LIMIT: Duration = Duration::from_secs(120);

struct Real {
    settings: Settings,
    runner: RealRunner,
    coordinator: Coordinator,
    _work: tempfile::TempDir,
}

async fn real_runner(test: &str) -> Option<Real> {
    let binary = require::gitlab_runner(test)?;
    let work = tempfile::tempdir().expect("work dir");
    let coordinator = Coordinator::start(work.path().join("artifacts"))
        .await
        .expect("coordinator");
    Some(Real {
        settings: Settings::new(""),
        runner: RealRunner {
            binary,
            builds_dir: "/builds".into(),
            cache_dir: "/cache".into(),
            work_dir: work.path().to_owned(),
        },
        coordinator,
        _work: work,
    })
}

impl Real {
    fn driver(&self) -> Driver {
        Driver::new(DRIVER)
            .arg("--config")
            .arg(self.settings.path())
    }

    async fn run(
        &self,
        yaml: &str,
        mode: &RunnerMode,
        hooks: &Hooks,
        cancel: &CancelHandle,
    ) -> Vec<PipelineJob> {
        let file = JobFile::parse(yaml).expect("job file");
        let jobs = file.jobs_in_stage_order();
        tokio::time::timeout(
            JOB_LIMIT,
            run_pipeline(
                &file,
                &jobs,
                &self.driver(),
                mode,
                &self.coordinator,
                None,
                hooks,
                cancel,
            ),
        )
        .await
        .expect("the pipeline finished in time")
    }

    async fn run_real(&self, yaml: &str) -> Vec<PipelineJob> {
        self.run(
            yaml,
            &RunnerMode::Real(self.runner.clone()),
            &Hooks::default(),
            &CancelHandle::new(),
        )
        .await
    }
}

fn finished(job: &PipelineJob) -> (&JobResult, String) {
    match &job.outcome {
        PipelineOutcome::Finished(report) => (&report.result, report.log_text().into_owned()),
        other => panic!("job {} did not run: {other:?}", job.name),
    }
}

fn results(jobs: &[PipelineJob]) -> Vec<(String, Option<JobResult>)> {
    jobs.iter()
        .map(|j| (j.name.clone(), j.result().cloned()))
        .collect()
}

async fn nothing_left_running(marker: &str) {
    for _ in 0..50 {
        if processes_with_marker(marker).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("left running: {:?}", processes_with_marker(marker));
}

#[tokio::test(flavor = "multi_thread")]
async fn real_runner_success_and_the_scripts_exit_code() {
    let Some(real) = real_runner("real_runner_success_and_the_scripts_exit_code").await else {
        return;
    };
    let jobs = real.run_real("ok:\n  script: [echo fine]\n").await;
    let (result, log) = finished(&jobs[0]);
    assert_eq!(result, &JobResult::Success, "{log}");
    assert!(
        log.contains("Using Custom executor with driver drover-local"),
        "{log}"
    );

    let jobs = real
        .run_real("bad:\n  script: [echo failing, exit 3]\n")
        .await;
    let (result, log) = finished(&jobs[0]);
    assert_eq!(result, &JobResult::ScriptFailure { exit_code: 3 }, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_runner_cancel_mid_script_runs_after_script_and_leaves_nothing() {
    let Some(real) =
        real_runner("real_runner_cancel_mid_script_runs_after_script_and_leaves_nothing").await
    else {
        return;
    };
    let marker = format!("cancel-{}", std::process::id());
    let cancel = CancelHandle::new();
    let hooks = Hooks {
        on_log: Some(Arc::new({
            let cancel = cancel.clone();
            // The trace arrives in PATCHes; cancel once the script is well under way.
            move |chunk: &[u8]| {
                if String::from_utf8_lossy(chunk).contains("tick 3") {
                    cancel.cancel();
                }
            }
        })),
        ..Hooks::default()
    };
    let yaml = format!(
        "long:\n  variables: {{{MARKER_VARIABLE}: {marker}}}\n  script:\n    - for i in $(seq 1 600); do echo tick $i; sleep 0.5; done\n  after_script:\n    - echo after_script ran\n"
    );
    let jobs = real
        .run(
            &yaml,
            &RunnerMode::Real(real.runner.clone()),
            &hooks,
            &cancel,
        )
        .await;
    let (result, log) = finished(&jobs[0]);
    assert_eq!(result, &JobResult::Canceled, "{log}");
    assert!(log.contains("after_script ran"), "{log}");
    assert!(
        !log.contains("tick 60\n"),
        "the script went on after the cancel: {log}"
    );
    nothing_left_running(&marker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn real_runner_job_timeout() {
    let Some(real) = real_runner("real_runner_job_timeout").await else {
        return;
    };
    let marker = format!("timeout-{}", std::process::id());
    let yaml = format!(
        "slow:\n  timeout: 5s\n  variables: {{{MARKER_VARIABLE}: {marker}}}\n  script: [sleep 300]\n  after_script: [echo after_script ran]\n"
    );
    let jobs = real.run_real(&yaml).await;
    let (result, log) = finished(&jobs[0]);
    assert_eq!(result, &JobResult::TimedOut, "{log}");
    // §6.2: a job timeout skips after_script.
    assert!(!log.contains("after_script ran"), "{log}");
    nothing_left_running(&marker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn real_runner_pipeline_passes_artifacts_and_cache() {
    let Some(real) = real_runner("real_runner_pipeline_passes_artifacts_and_cache").await else {
        return;
    };
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../jobs/pipeline.yml"))
            .expect("example pipeline");
    let jobs = real.run_real(&yaml).await;
    let (build, build_log) = finished(&jobs[0]);
    assert_eq!(build, &JobResult::Success, "{build_log}");
    let (test, test_log) = finished(&jobs[1]);
    assert_eq!(test, &JobResult::Success, "{test_log}");
    assert!(test_log.contains("release 1.0 built by job"), "{test_log}");
    assert!(
        test_log.contains("dependencies fetched by job"),
        "{test_log}"
    );
    let uploads: Vec<_> = real
        .coordinator
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.contains("/artifacts"))
        .collect();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(uploads[0].status, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn emulated_and_real_runners_give_the_same_results() {
    let Some(real) = real_runner("emulated_and_real_runners_give_the_same_results").await else {
        return;
    };
    let emulated = RunnerMode::Emulated(RunnerOptions {
        path_prefix: Some(
            helper_dir(&real.runner.binary, &real.runner.work_dir.join("emulated")).expect("link"),
        ),
        ..RunnerOptions::default()
    });
    let pipeline =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../jobs/pipeline.yml"))
            .expect("example pipeline");
    for yaml in [
        pipeline.as_str(),
        "fails:\n  script: [exit 7]\n  after_script: [exit 1]\n",
        "twice:\n  script: [exit 2]\n",
        "slow:\n  timeout: 3s\n  script: [sleep 60]\n",
    ] {
        let by_real = results(&real.run_real(yaml).await);
        let by_emulation = results(
            &real
                .run(yaml, &emulated, &Hooks::default(), &CancelHandle::new())
                .await,
        );
        assert_eq!(by_real, by_emulation, "{yaml}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_runners_fetch_the_repository_given_with_repo() {
    let Some(real) = real_runner("both_runners_fetch_the_repository_given_with_repo").await else {
        return;
    };
    let repo = real.settings.dir.path().join("repo");
    commit_files(&repo, &[("hello.txt", "from the repository\n")]).expect("test repository");
    let job = real.settings.dir.path().join("show.yml");
    std::fs::write(&job, "show:\n  script: [cat hello.txt]\n").expect("job file");
    for runner in ["real", "emulated"] {
        let output = std::process::Command::new(crate::util::drover())
            .arg("run-job")
            .arg(&job)
            .args(["--driver", DRIVER, "--runner", runner, "--repo"])
            .arg(&repo)
            .arg("--gitlab-runner")
            .arg(&real.runner.binary)
            .args(["--driver-arg", "--config", "--driver-arg"])
            .arg(real.settings.path())
            .output()
            .expect("drover runs");
        let log = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{runner}: {log}");
        for expected in [
            "Fetching changes...",
            "Initialized empty Git repository",
            "Checking out",
            "from the repository",
        ] {
            assert!(log.contains(expected), "{runner}: {expected}: {log}");
        }
    }
}
