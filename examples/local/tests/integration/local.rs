//! What only drover-local promises, and the conformance suite through the `drover` CLI.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{DRIVER, Settings, drover, processes_with, run_job};

#[test]
fn passes_the_conformance_suite_run_by_the_drover_cli() {
    // A prepare that lasts a second gives the suite's SIGTERM-during-prepare case something to
    // interrupt (drover-local's own prepare takes well under a millisecond).
    let settings = Settings::new("prepare_hook = [\"sleep\", \"1\"]\n");
    let output = Command::new(drover())
        .arg("conformance")
        .arg("--driver")
        .arg(DRIVER)
        .args(["--driver-arg", "--config", "--driver-arg"])
        .arg(settings.path())
        .output()
        .expect("drover conformance runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "conformance failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn a_process_that_left_its_group_does_not_outlive_the_job() {
    let settings = Settings::new("");
    let marker = format!("{}", 300_000 + std::process::id() % 1000);
    let output = run_job(
        &settings,
        &format!(
            "escape:\n  script:\n    - setsid sleep {marker} > /dev/null 2>&1 < /dev/null &\n    - echo started\n"
        ),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(&format!("sleep {marker}")).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_with(&format!("sleep {marker}")),
        Vec::<String>::new(),
        "escaped process survived cleanup"
    );
    let jobs: Vec<_> = std::fs::read_dir(settings.root().join("jobs"))
        .expect("jobs dir")
        .collect();
    assert!(jobs.is_empty(), "cleanup left {jobs:?}");
}

#[test]
fn gc_removes_expired_job_directories_of_this_runner_only() {
    let settings = Settings::new("");
    let jobs = settings.root().join("jobs");
    let make = |name: &str, runner: &str, expires: u64| {
        std::fs::create_dir_all(jobs.join(name).join("builds")).expect("job dir");
        let labels = format!(r#"{{"drover.runner": "{runner}", "drover.expires": "{expires}"}}"#);
        std::fs::write(jobs.join(name).join("drover-job.json"), labels).expect("labels");
    };
    make("drover-default-p1-j1", "default", 1);
    make("drover-default-p1-j2", "default", u64::MAX / 2);
    make("drover-other-p1-j3", "other", 1);

    let dry = settings.driver(&["gc", "--dry-run"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(text.contains("would remove drover-default-p1-j1"), "{text}");
    assert!(
        jobs.join("drover-default-p1-j1").exists(),
        "a dry run removed something"
    );

    let real = settings.driver(&["gc"]);
    assert!(real.status.success());
    assert!(
        String::from_utf8_lossy(&real.stdout).contains("1 removed, 1 kept"),
        "{}",
        String::from_utf8_lossy(&real.stdout)
    );
    assert!(!jobs.join("drover-default-p1-j1").exists());
    assert!(
        jobs.join("drover-default-p1-j2").exists(),
        "an unexpired job was removed"
    );
    assert!(
        jobs.join("drover-other-p1-j3").exists(),
        "another runner's job was removed"
    );
}

#[test]
fn doctor_says_what_to_fix() {
    let ok = Settings::new("");
    let output = ok.driver(&["doctor"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    let bad = Settings::new("shell = \"no-such-shell\"\n");
    let output = bad.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text.contains("FAIL shell: no-such-shell is not on PATH"),
        "{text}"
    );
}

#[test]
fn a_failing_prepare_hook_is_a_system_failure_that_the_runner_retries() {
    let settings = Settings::new("prepare_hook = [\"false\"]\n");
    let output = run_job(&settings, "hook:\n  script:\n    - echo never\n");
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(log.contains("prepare_hook false exited with 1"), "{log}");
    assert_eq!(log.matches("Preparation failed").count(), 3, "{log}");
    assert!(log.contains("runner_system_failure"), "{log}");
}

#[test]
fn the_cli_finds_the_driver_by_name_beside_itself_and_by_relative_path() {
    let settings = Settings::new("");
    let job = settings.dir.path().join("job.yml");
    std::fs::write(&job, "hello:\n  script:\n    - echo found-it\n").expect("job file");
    let driver_dir = Path::new(DRIVER).parent().expect("driver dir");
    for (cwd, driver) in [
        (settings.dir.path(), "drover-local"),
        (driver_dir, "./drover-local"),
    ] {
        let output = Command::new(drover())
            .current_dir(cwd)
            .args(["run-job", job.to_str().expect("utf-8"), "--driver", driver])
            .args(["--driver-arg", "--config", "--driver-arg"])
            .arg(settings.path())
            .output()
            .expect("drover runs");
        let log = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && log.contains("found-it"),
            "{driver}: {log}"
        );
    }
}
