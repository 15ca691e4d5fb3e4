//! drover-lxd against the real LXD daemon, called as GitLab Runner calls it (through the
//! `drover` CLI's emulated runner). Every test skips with one line when no daemon answers, or
//! fails where `DROVER_REQUIRE` names `lxd` (CI); `tests/setup/lxd.sh` sets LXD up and imports
//! the test image.

use std::path::PathBuf;
use std::process::Command;

use drover_test_support::require;
use drover_test_support::setup::DriverSetup;

mod remote;

const DRIVER: &str = env!("CARGO_BIN_EXE_drover-lxd");
const SOCKET: &str = "/var/lib/lxd/unix.socket";
const IMAGE: &str = "drover-test/debian";

/// `true` when LXD answers and the test image is imported; else a skip (one line saying why),
/// or a failure where `DROVER_REQUIRE` names `lxd`.
fn lxd(test: &str) -> bool {
    let answers = Command::new("curl")
        .args(["-sf", "--max-time", "5", "--unix-socket", SOCKET])
        .arg(format!("http://lxd/1.0/images/aliases/{IMAGE}"))
        .output()
        .is_ok_and(|o| o.status.success());
    let found = if answers {
        Ok(())
    } else {
        Err(format!(
            "no LXD at {SOCKET} with image {IMAGE} (run tests/setup/lxd.sh as root)"
        ))
    };
    require::backend("lxd", test, found).is_some()
}

/// A settings file for the daemon on `socket` and a runner name of its own, so leftovers are
/// attributable to one test; `driver` is more `[driver]` TOML.
fn new_setup(test: &str, socket: &str, driver: &str) -> DriverSetup {
    connected_setup(test, &format!("socket = {socket:?}"), driver)
}

/// Settings whose `[driver]` table starts with `connection` (TOML lines).
fn connected_setup(test: &str, connection: &str, driver: &str) -> DriverSetup {
    setup_in(test, None, connection, driver, "")
}

/// The same, with the `state_dir` of another setup when given, and more `[policy]`.
fn setup_in(
    test: &str,
    state_of: Option<&DriverSetup>,
    connection: &str,
    driver: &str,
    policy: &str,
) -> DriverSetup {
    DriverSetup::new(DRIVER, test, Box::new(leftovers), |runner, own_state| {
        let state = state_of.map_or_else(|| own_state.to_owned(), DriverSetup::state_dir);
        format!(
            "runner_name = \"{runner}\"\n\
             [driver]\n{connection}\nstate_dir = {state:?}\n{driver}\n\
             [driver.images]\n\"debian:bookworm\" = \"{IMAGE}\"\n\
             [policy]\ndefault_image = \"debian:bookworm\"\nallowed_images = [\"debian:*\", \"missing:*\"]\n{policy}\n"
        )
    })
}

/// Instances of `runner` still on the daemon.
fn leftovers(runner: &str) -> Vec<String> {
    let output = Command::new("lxc")
        .args([
            "list",
            "--format",
            "csv",
            "-c",
            "n",
            &format!("user.drover.runner={runner}"),
        ])
        .output()
        .expect("lxc list");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

// The suite in three parts that run side by side: every case waits on LXD far more than it
// computes, and in one piece it was the longest test of the workspace.
#[test]
fn passes_the_conformance_suite_and_leaves_nothing_behind_part_1() {
    passes_part_of_the_conformance_suite(0);
}

#[test]
fn passes_the_conformance_suite_and_leaves_nothing_behind_part_2() {
    passes_part_of_the_conformance_suite(1);
}

#[test]
fn passes_the_conformance_suite_and_leaves_nothing_behind_part_3() {
    passes_part_of_the_conformance_suite(2);
}

/// Every third case of the suite from `part` on (so the three parts together run all of
/// them, the hostile group included), each passing, and nothing left afterwards.
fn passes_part_of_the_conformance_suite(part: usize) {
    let test = format!(
        "passes_the_conformance_suite_and_leaves_nothing_behind_part_{}",
        part + 1
    );
    if !lxd(&test) {
        return;
    }
    let setup = new_setup(&format!("conformance{}", part + 1), SOCKET, "");
    drover_test_support::setup::expect_conformance_part(&setup, part, 3);
}

#[test]
fn cache_written_by_one_job_is_restored_by_the_next_without_gitlab_runner_in_the_image() {
    if !lxd("cache_written_by_one_job_is_restored_by_the_next_without_gitlab_runner_in_the_image") {
        return;
    }
    // The image has no gitlab-runner: the driver copies the operator's in (here the stand-in).
    let stand_in = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/harness/stand-in/gitlab-runner");
    // An operator device (here a host directory) reaches every instance too.
    let shared = tempfile::tempdir().expect("shared dir");
    std::fs::write(
        shared.path().join("note.txt"),
        "from the operator's device\n",
    )
    .expect("note");
    let setup = new_setup(
        "cache",
        SOCKET,
        &format!(
            "gitlab_runner_binary = {stand_in:?}\n[driver.devices.shared]\ntype = \"disk\"\nsource = {:?}\npath = \"/shared\"",
            shared.path()
        ),
    );
    let yaml = "stages: [build, test]\n\
        build:\n  stage: build\n  script: [mkdir -p vendor, echo \"kept by job $CI_JOB_ID\" > vendor/deps.txt]\n  cache: {key: deps, paths: [vendor/]}\n\
        test:\n  stage: test\n  script: [cat vendor/deps.txt, cat /shared/note.txt]\n  cache: {key: deps, paths: [vendor/]}\n";
    let (ok, log) = setup.run_job(yaml, &[]);
    assert!(ok, "{log}");
    assert!(
        log.contains("Copying gitlab-runner into the instance"),
        "{log}"
    );
    assert!(
        log.contains("kept by job"),
        "the cache was not restored: {log}"
    );
    assert!(
        !log.contains("Preparation failed"),
        "prepare had to be retried: {log}"
    );
    assert!(log.contains("from the operator's device"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_missing_socket_and_an_unknown_image_are_clear_system_failures() {
    if !lxd("a_missing_socket_and_an_unknown_image_are_clear_system_failures") {
        return;
    }
    let setup = new_setup("nosocket", "/nonexistent/lxd.socket", "");
    let (ok, log) = setup.run_job("x:\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(
        log.contains("the LXD socket /nonexistent/lxd.socket does not exist"),
        "{log}"
    );
    assert!(log.contains("result: runner_system_failure"), "{log}");

    let setup = new_setup("noimage", SOCKET, "");
    let (ok, log) = setup.run_job("x:\n  image: missing:1\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(log.contains("no LXD image \"missing:1\""), "{log}");
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn artifacts_upload_from_an_image_that_had_no_gitlab_runner() {
    use drover_harness::RunnerOptions;
    use drover_harness::coordinator::Coordinator;
    use drover_harness::pipeline::RunnerMode;

    let test = "artifacts_upload_from_an_image_that_had_no_gitlab_runner";
    if !lxd(test) {
        return;
    }
    // The runner's real helper commands run in the instance (the stand-in needs curl, which
    // the image lacks); CI tests copying a binary in with the stand-in (the cache test).
    let Some(runner) = require::gitlab_runner(test) else {
        return;
    };
    let work = tempfile::tempdir().expect("work dir");
    let coordinator = Coordinator::start(work.path().join("artifacts"))
        .await
        .expect("coordinator");
    let port = coordinator.addr().port();
    // The instance has no network: a proxy device brings drover's fake GitLab to its 127.0.0.1.
    let setup = new_setup(
        "artifacts",
        SOCKET,
        &format!(
            "gitlab_runner_binary = {runner:?}\n\
             [driver.devices.gitlab]\ntype = \"proxy\"\nlisten = \"tcp:127.0.0.1:{port}\"\n\
             connect = \"tcp:127.0.0.1:{port}\"\nbind = \"container\""
        ),
    );
    let yaml = "stages: [build, test]\n\
        build:\n  stage: build\n  script: [mkdir -p out, echo \"built by $CI_JOB_ID\" > out/result.txt]\n  artifacts: {paths: [out/]}\n\
        test:\n  stage: test\n  script: [cat out/result.txt]\n";
    setup
        .expect_pipeline_succeeds(
            yaml,
            &RunnerMode::Emulated(RunnerOptions::default()),
            &coordinator,
            std::time::Duration::from_secs(300),
        )
        .await;
    let uploads: Vec<_> = coordinator
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.contains("/artifacts"))
        .collect();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    assert_eq!(uploads[0].status, 201);
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn gc_removes_only_expired_jobs_and_doctor_reports_the_daemon() {
    let test = "gc_removes_only_expired_jobs_and_doctor_reports_the_daemon";
    if !lxd(test) {
        return;
    }
    let setup = new_setup("gc", SOCKET, "");
    setup.abandon_an_expired_job();
    let instance = format!("drover-{}-p5-j99001", setup.runner);
    assert_eq!(setup.leftovers(), vec![instance.clone()]);
    let stage_dir = setup.dir.path().join("state/io").join(&instance);
    assert!(stage_dir.exists(), "prepare made no stage directory");
    setup.expect_gc_removes(&instance);
    assert!(!stage_dir.exists(), "gc left the stage directory");

    let doctor = setup.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "{text}");
    assert!(text.contains("ok   api: lxd "), "{text}");
    assert!(
        text.contains("ok   profile: default, root disk on pool default"),
        "{text}"
    );

    let broken = new_setup("doctor", SOCKET, "profiles = [\"drover-no-such-profile\"]");
    let doctor = broken.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{text}");
    assert!(text.contains("drover-no-such-profile"), "{text}");
}

#[test]
fn the_real_runner_runs_jobs_with_their_exit_codes_and_leaves_nothing() {
    let test = "the_real_runner_runs_jobs_with_their_exit_codes_and_leaves_nothing";
    if !lxd(test) {
        return;
    }
    let Some(runner) = require::gitlab_runner(test) else {
        return;
    };
    let runner = runner.to_string_lossy();
    let setup = new_setup("realrunner", SOCKET, "");
    let yaml = "ok:\n  script: [echo \"hello $((6*7))\"]\n\
        fails:\n  script: [echo before, exit 3]\n  after_script: [echo \"after $((6*7))\"]\n";
    let (_, log) = setup.run_job(yaml, &["--runner", "real", "--gitlab-runner", &runner]);
    assert!(log.contains("\nhello 42"), "{log}");
    assert!(log.contains("\nafter 42"), "{log}");
    assert!(log.contains("Job ok result: success"), "{log}");
    assert!(
        log.contains("Job fails result: script_failure (exit code 3)"),
        "{log}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_killed_stage_agent_fails_its_stage_clearly_and_the_next_stage_gets_a_new_one() {
    let test = "a_killed_stage_agent_fails_its_stage_clearly_and_the_next_stage_gets_a_new_one";
    if !lxd(test) {
        return;
    }
    // The script outlives the agent and the stage's waiter (it is in a session of its own):
    // the driver must notice on its own that no exit status can come any more, not wait for
    // the script, and stop it. The next stage (after_script) gets a new agent.
    let setup = new_setup("agent", SOCKET, "");
    let (ok, log) = setup.run_job(
        "x:\n  script: [pkill -f drover-agent, sleep 600]\n  after_script: [echo \"after $((6*7))\"]\n",
        &[],
    );
    assert!(!ok);
    assert!(log.contains("the stage agent's waiter was killed"), "{log}");
    assert!(log.contains("was gone; starting it again"), "{log}");
    assert!(log.contains("\nafter 42"), "{log}");
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_ready_instance_starts_the_next_job_and_gc_removes_spares_when_switched_off() {
    let test = "a_ready_instance_starts_the_next_job_and_gc_removes_spares_when_switched_off";
    if !lxd(test) {
        return;
    }
    let setup = new_setup("spares", SOCKET, "idle_count = 1");
    let job = "x:\n  script: [echo \"hello $((6*7))\"]\n";
    let (ok, log) = setup.run_job(job, &[]);
    assert!(ok, "{log}");
    assert!(log.contains("Creating instance"), "{log}");
    // The spare the first job asked for is created by LXD on its own: wait until it is made.
    let made = (0..120).any(|_| {
        let spares = leftovers(&setup.runner);
        let busy = Command::new("lxc")
            .args(["query", "/1.0/operations?recursion=1"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ready = spares.len() == 1 && !busy.contains(&format!("/1.0/instances/{}", spares[0]));
        if !ready {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        ready
    });
    assert!(
        made,
        "no ready instance within 120 s: {:?}",
        leftovers(&setup.runner)
    );

    let (ok, log) = setup.run_job(job, &[]);
    assert!(ok, "{log}");
    assert!(log.contains("Using ready instance"), "{log}");
    assert!(log.contains("\nhello 42"), "{log}");

    // What is left is the spare made for the next job; with the pool off, gc removes it.
    setup.set("driver.idle_count", 0);
    let gc = setup.driver(&["gc"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn gc_and_doctor_stop_on_sigterm_against_a_daemon_that_never_answers() {
    // No daemon needed: the daemon here is a socket that accepts and never answers.
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("hung.sock");
    let backend = drover_test_support::setup::HungSocket::bind(&socket);
    let setup = new_setup("hung", socket.to_str().expect("utf-8"), "");
    setup.expect_maintenance_stops_on_sigterm(&backend);
}

#[test]
fn caches_are_per_runner_and_per_project_and_private_on_the_host() {
    let test = "caches_are_per_runner_and_per_project_and_private_on_the_host";
    if !lxd(test) {
        return;
    }
    let connection = format!("socket = {SOCKET:?}");
    let setup = setup_in("cacheiso", None, &connection, "", "");
    let other = setup_in("cacheisob", Some(&setup), &connection, "", "");
    drover_test_support::setup::expect_caches_per_runner_and_project(&setup, &other);
}

#[test]
fn a_cpu_request_too_small_to_be_a_limit_is_refused() {
    let test = "a_cpu_request_too_small_to_be_a_limit_is_refused";
    if !lxd(test) {
        return;
    }
    let setup = setup_in(
        "tinycpu",
        None,
        &format!("socket = {SOCKET:?}"),
        "",
        "max_cpus = 2",
    );
    let (ok, log) = setup.run_job(
        "x:\n  variables: {DROVER_CPUS: \"0.0000000001\"}\n  script: [echo \"ran $((6*7))\"]\n",
        &[],
    );
    assert!(!ok);
    assert!(
        log.contains("must be a number of CPUs from 0.01 to 2"),
        "{log}"
    );
    assert!(!log.contains("ran 42"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}
