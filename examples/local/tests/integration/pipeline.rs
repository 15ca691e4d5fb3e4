//! Pipelines through the emulated runner: stage order, dependencies, artifacts passed through
//! the fake GitLab, and the cache through the shared cache dir. The job environment's
//! `gitlab-runner` is the stand-in from tests/harness/stand-in (no GitLab Runner in CI), which
//! also shows that `--gitlab-runner` reaches the job's PATH.

use std::path::PathBuf;

use crate::util::{DRIVER, Settings, drover};

fn stand_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/harness/stand-in/gitlab-runner")
}

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../jobs")
        .join(name)
}

fn run_pipeline(settings: &Settings, file: &std::path::Path) -> (bool, String) {
    let output = std::process::Command::new(drover())
        .arg("run-job")
        .arg(file)
        .args([
            "--driver",
            DRIVER,
            "--runner",
            "emulated",
            "--gitlab-runner",
        ])
        .arg(stand_in())
        .args(["--driver-arg", "--config", "--driver-arg"])
        .arg(settings.path())
        .output()
        .expect("drover runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn artifacts_and_cache_pass_from_build_to_test() {
    let settings = Settings::new("");
    let (ok, log) = run_pipeline(&settings, &example("pipeline.yml"));
    assert!(ok, "{log}");
    let build = log
        .find("Job build result: success")
        .expect("build ran first");
    let test = log.find("Job test result: success").expect("test ran");
    assert!(build < test, "{log}");
    // Each job starts in an empty directory: these came through artifacts and the cache.
    assert!(
        log.contains("release 1.0 built by job"),
        "artifacts did not arrive: {log}"
    );
    assert!(
        log.contains("dependencies fetched by job"),
        "cache was not restored: {log}"
    );
    assert!(
        !log.contains("Missing gitlab-runner"),
        "the helper was not on the job's PATH: {log}"
    );
}

#[test]
fn a_failed_stage_skips_the_later_ones_and_jobs_run_in_stage_order() {
    let settings = Settings::new("");
    let file = settings.dir.path().join("failing.yml");
    std::fs::write(
        &file,
        "stages: [first, second]\n\
         late:\n  stage: second\n  script: [echo never]\n\
         early:\n  stage: first\n  script: [exit 4]\n",
    )
    .expect("job file");
    let (ok, log) = run_pipeline(&settings, &file);
    assert!(!ok);
    assert!(
        log.contains("Job early result: script_failure (exit code 4)"),
        "{log}"
    );
    assert!(
        log.contains("Job late skipped: a job of stage first failed"),
        "{log}"
    );
    assert!(!log.contains("never\n"), "{log}");
}

#[test]
fn only_the_named_dependencies_are_downloaded() {
    let settings = Settings::new("");
    let file = settings.dir.path().join("deps.yml");
    std::fs::write(
        &file,
        "stages: [build, test]\n\
         one:\n  stage: build\n  script: [mkdir -p a, echo one > a/one]\n  artifacts: {paths: [a/]}\n\
         two:\n  stage: build\n  script: [mkdir -p b, echo two > b/two]\n  artifacts: {paths: [b/]}\n\
         check:\n  stage: test\n  dependencies: [two]\n  script: [test ! -e a/one, cat b/two]\n",
    )
    .expect("job file");
    let (ok, log) = run_pipeline(&settings, &file);
    assert!(ok, "{log}");
    assert!(log.contains("Downloading artifacts for two"), "{log}");
    assert!(!log.contains("Downloading artifacts for one"), "{log}");
}
