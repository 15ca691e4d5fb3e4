//! What only drover-local promises, and the conformance suite through the `drover` CLI.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{
    DRIVER, Settings, drover, processes_left, processes_with, run_job, unique_sleep,
};

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
    assert!(
        stdout.contains(" passed, 0 failed, 3 not applicable"),
        "{stdout}"
    );
    // Its jobs run on the host as the driver's user: the hostile group says why it does not
    // apply instead of passing.
    for case in drover_harness::conformance::HOSTILE {
        assert!(
            stdout.contains(&format!("N/A  {case}: this driver runs jobs on the host")),
            "{stdout}"
        );
    }
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

#[test]
fn drover_exits_1_for_a_failed_job_and_2_when_it_cannot_run() {
    let settings = Settings::new("");
    let ok = run_job(&settings, "ok:\n  script:\n    - echo fine\n");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let failed = run_job(&settings, "bad:\n  script:\n    - exit 3\n");
    let log = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(failed.status.code(), Some(1), "{log}");
    assert!(log.contains("Job bad result: script_failure"), "{log}");

    let broken_yaml = run_job(&settings, "bad: [unclosed\n");
    let stderr = String::from_utf8_lossy(&broken_yaml.stderr);
    assert_eq!(broken_yaml.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("drover: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let job = settings.dir.path().join("job.yml");
    std::fs::write(&job, "ok:\n  script:\n    - echo fine\n").expect("job file");
    let no_driver = Command::new(drover())
        .args([
            "run-job",
            job.to_str().expect("utf-8"),
            "--driver",
            "drover-no-such-driver",
        ])
        .output()
        .expect("drover runs");
    let stderr = String::from_utf8_lossy(&no_driver.stderr);
    assert_eq!(no_driver.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("driver drover-no-such-driver not found"),
        "{stderr}"
    );
    let help = Command::new(drover())
        .arg("--help")
        .output()
        .expect("drover runs");
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit status: 0"));
}

/// Whether this host lets the driver track a job's processes in a cgroup v2 of its own: it
/// runs as root (so the driver's cgroup is writable) and a cgroup2 hierarchy is mounted.
fn cgroup_v2_writable() -> bool {
    nix::unistd::geteuid().is_root()
        && std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|mounts| mounts.lines().any(|line| line.contains(" - cgroup2 ")))
}

/// Runs a job whose script starts a process that drops the job's tag variable and leaves its
/// process group, and one orphaned by a double fork; after_script reports any that survived
/// the script's stage. Returns the job log.
fn run_escaping_job(settings: &Settings) -> String {
    let untagged = unique_sleep();
    let orphan = unique_sleep();
    let output = run_job(
        settings,
        &format!(
            "escape:\n  script:\n\
             \x20   - env -u DROVER_LOCAL_JOB setsid sleep {untagged} > /dev/null 2>&1 < /dev/null &\n\
             \x20   - (setsid sleep {orphan} > /dev/null 2>&1 < /dev/null &)\n\
             \x20   - cat /proc/self/cgroup\n\
             \x20 after_script:\n\
             \x20   - for m in {untagged} {orphan}; do pgrep -f \"sleep $m\" > /dev/null && echo \"SURVIVED:$m\"; done; echo checked\n"
        ),
    );
    let log = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{log}");
    assert!(log.contains("checked"), "after_script did not run: {log}");
    assert!(
        !log.contains("SURVIVED:300."),
        "a process outlived the stage that started it: {log}"
    );
    for marker in [&untagged, &orphan] {
        let left = processes_left(&format!("sleep {marker}"), Duration::from_secs(5));
        assert_eq!(
            left,
            Vec::<String>::new(),
            "sleep {marker} outlived the job"
        );
    }
    log
}

/// The job's script printed its own `/proc/self/cgroup`: is it the job's cgroup?
fn ran_in_job_cgroup(log: &str) -> bool {
    log.lines()
        .any(|line| line.contains("0::/") && line.contains("/drover-default-p"))
}

#[test]
fn an_untagged_setsid_or_double_forked_process_does_not_outlive_its_stage() {
    let log = run_escaping_job(&Settings::new(""));
    if cgroup_v2_writable() {
        assert!(
            ran_in_job_cgroup(&log),
            "root with a cgroup2 mount, yet the job did not run in a cgroup of its own: {log}"
        );
    }
}

#[test]
fn without_a_cgroup_the_subreaper_fallback_also_finds_escaped_processes() {
    let log = run_escaping_job(&Settings::new("process_tracking = \"subreaper\"\n"));
    assert!(
        !ran_in_job_cgroup(&log),
        "subreaper tracking ran the job in a cgroup: {log}"
    );
}

#[test]
fn doctor_never_writes_through_a_symlink_at_the_probe_name() {
    let settings = Settings::new("");
    let root = settings.root();
    std::fs::create_dir_all(&root).expect("root");
    let outside = settings.dir.path().join("outside");
    std::fs::write(&outside, "untouched").expect("outside file");
    let missing = settings.dir.path().join("created-through-a-link");
    // The name doctor used to probe with, and the one next to it, each point outside root.
    std::os::unix::fs::symlink(&outside, root.join(".doctor-probe")).expect("symlink");
    std::os::unix::fs::symlink(&missing, root.join(".doctor-probe.new")).expect("symlink");

    let output = settings.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("is writable"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&outside).expect("outside file"),
        "untouched",
        "doctor wrote through the symlink"
    );
    assert!(!missing.exists(), "doctor created a file through a symlink");
    let mut left: Vec<String> = std::fs::read_dir(&root)
        .expect("root")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [".doctor-probe", ".doctor-probe.new"],
        "doctor left its probe behind or removed what was not its own"
    );
}

#[test]
fn with_builds_dir_set_nothing_of_the_job_is_left_under_it() {
    let builds = tempfile::tempdir().expect("builds dir");
    let settings = Settings::with(&format!("builds_dir = {:?}\n", builds.path()), "");
    let output = run_job(
        &settings,
        "checkout:\n  script:\n    - pwd\n    - echo made > made-by-job\n",
    );
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{log}");
    assert!(
        log.contains(&format!("{}/drover-default-p", builds.path().display())),
        "the job did not run under builds_dir: {log}"
    );
    let left: Vec<_> = std::fs::read_dir(builds.path())
        .expect("builds dir")
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert_eq!(left, Vec::<std::path::PathBuf>::new(), "cleanup left these");
}

#[test]
fn gc_removes_abandoned_job_directories_under_builds_dir_of_this_runner_only() {
    let builds = tempfile::tempdir().expect("builds dir");
    let settings = Settings::with(&format!("builds_dir = {:?}\n", builds.path()), "");
    let jobs = settings.root().join("jobs");
    let checkout = |name: &str| {
        let project = builds.path().join(name).join("group/project");
        std::fs::create_dir_all(&project).expect("checkout");
        std::fs::write(project.join("README"), "checked out").expect("file");
    };
    let labels = |name: &str, expires: u64| {
        std::fs::create_dir_all(jobs.join(name)).expect("job dir");
        let labels = format!(r#"{{"drover.runner": "default", "drover.expires": "{expires}"}}"#);
        std::fs::write(jobs.join(name).join("drover-job.json"), labels).expect("labels");
    };
    // Orphaned: its job directory is gone, so its cleanup ran only half-way or not at all.
    checkout("drover-default-p1-j7");
    // Expired: gc removes it together with its job directory.
    checkout("drover-default-p1-j8");
    labels("drover-default-p1-j8", 1);
    // A job still running.
    checkout("drover-default-p1-j9");
    labels("drover-default-p1-j9", u64::MAX / 2);
    // Another runner's ("default-2" shares the prefix "drover-default-"), and not a job's.
    checkout("drover-other-p1-j10");
    checkout("drover-default-2-p1-j11");
    checkout("unrelated");
    // An orphaned name that is a symlink: gc removes the link, never what it points to.
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("keep"), "keep").expect("file");
    std::os::unix::fs::symlink(outside.path(), builds.path().join("drover-default-p1-j12"))
        .expect("symlink");

    let dry = settings.driver(&["gc", "--dry-run"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{text}");
    assert!(text.contains("drover-default-p1-j7"), "{text}");
    assert!(
        builds.path().join("drover-default-p1-j7").exists(),
        "a dry run removed something"
    );

    let real = settings.driver(&["gc"]);
    let text = String::from_utf8_lossy(&real.stdout);
    assert!(real.status.success(), "{text}");
    for gone in [
        "drover-default-p1-j7",
        "drover-default-p1-j8",
        "drover-default-p1-j12",
    ] {
        assert!(
            builds.path().join(gone).symlink_metadata().is_err(),
            "gc left {gone}: {text}"
        );
    }
    assert!(!jobs.join("drover-default-p1-j8").exists(), "{text}");
    for kept in [
        "drover-default-p1-j9",
        "drover-other-p1-j10",
        "drover-default-2-p1-j11",
        "unrelated",
    ] {
        assert!(
            builds
                .path()
                .join(kept)
                .join("group/project/README")
                .exists(),
            "gc removed {kept}: {text}"
        );
    }
    assert!(
        outside.path().join("keep").exists(),
        "gc followed the symlink"
    );
}
