//! drover-podman against the real podman service, called as GitLab Runner calls it (through
//! the `drover` CLI's emulated runner). Every test skips with one line when no engine answers;
//! `tests/install-and-test.sh` sets podman up and exports `DROVER_PODMAN_SOCKET`.

use std::path::{Path, PathBuf};
use std::process::Command;

use drover_harness::real::gitlab_runner_for_test;
use drover_harness::repository::commit_files;
use drover_harness::setup::DriverSetup;

const DRIVER: &str = env!("CARGO_BIN_EXE_drover-podman");
const USER_IMAGE: &str = "localhost/drover-test/debian:bookworm";
const HELPER_IMAGE: &str = "localhost/drover-test/helper:bookworm";
const SERVICE_IMAGE: &str = "localhost/drover-test/busybox:latest";

/// The engine's socket, or `None` (and one line saying why) when there is none to test with.
fn engine(test: &str) -> Option<PathBuf> {
    let socket = std::env::var_os("DROVER_PODMAN_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/podman/podman.sock"));
    let answers = Command::new("curl")
        .args(["-sf", "--max-time", "5", "--unix-socket"])
        .arg(&socket)
        .arg("http://d/_ping")
        .output()
        .is_ok_and(|o| o.status.success());
    if !answers {
        eprintln!(
            "skipped {test}: no podman API at {} (run tests/setup/podman.sh as root)",
            socket.display()
        );
        return None;
    }
    Some(socket)
}

/// A settings file with a runner name of its own, so leftovers are attributable to one test.
fn new_setup(test: &str, socket: &Path, driver: &str, policy: &str) -> DriverSetup {
    setup_in(test, None, socket, driver, policy)
}

/// The same, with the `state_dir` of another setup when given.
fn setup_in(
    test: &str,
    state_of: Option<&DriverSetup>,
    socket: &Path,
    driver: &str,
    policy: &str,
) -> DriverSetup {
    DriverSetup::new(DRIVER, test, leftovers, |runner, own_state| {
        let state = state_of.map_or_else(|| own_state.to_owned(), DriverSetup::state_dir);
        format!(
            "runner_name = \"{runner}\"\n\
             [driver]\nsocket = {socket:?}\npull_policy = \"never\"\nstate_dir = {state:?}\n{driver}\n\
             [policy]\ndefault_image = \"{USER_IMAGE}\"\nallowed_images = [\"localhost/drover-test/**\"]\n{policy}\n"
        )
    })
}

/// Containers and volumes of `runner` still on the engine.
fn leftovers(runner: &str) -> Vec<String> {
    let label = format!("label=drover.runner={runner}");
    let mut found = Vec::new();
    for args in [
        vec!["ps", "-a", "--filter", &label, "--format", "{{.Names}}"],
        vec!["volume", "ls", "--filter", &label, "--format", "{{.Name}}"],
    ] {
        let output = Command::new("podman")
            .args(&args)
            .output()
            .expect("podman CLI");
        found.extend(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::to_owned),
        );
    }
    found
}

fn stand_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/harness/stand-in/gitlab-runner")
}

#[test]
fn passes_the_conformance_suite_and_leaves_nothing_behind() {
    let Some(socket) = engine("passes_the_conformance_suite_and_leaves_nothing_behind") else {
        return;
    };
    let setup = new_setup("conformance", &socket, "network_mode = \"none\"", "");
    let output = setup
        .drover_command(&["conformance"])
        .output()
        .expect("drover conformance runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(" passed, 0 failed, 0 not applicable"),
        "{stdout}"
    );
    for case in drover_harness::conformance::HOSTILE {
        assert!(stdout.contains(&format!("PASS {case} ")), "{stdout}");
    }
    // The suite ran successes, failures, a cancel, a timeout and hostile jobs: none may leave
    // anything.
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_user_image_without_git_or_gitlab_runner_gets_cache_and_artifacts_through_the_helper() {
    let Some(socket) = engine(
        "a_user_image_without_git_or_gitlab_runner_gets_cache_and_artifacts_through_the_helper",
    ) else {
        return;
    };
    // Host networking only so the helper reaches drover's fake GitLab on 127.0.0.1.
    let driver = format!(
        "network_mode = \"host\"\nhelper_image = \"{HELPER_IMAGE}\"\ngitlab_runner_binary = {:?}",
        stand_in()
    );
    let setup = new_setup("helper", &socket, &driver, "");
    let pipeline = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/jobs/pipeline.yml"))
        .expect("example pipeline")
        .replace(
            "    - cat out/result.txt\n",
            "    - cat out/result.txt\n    - if command -v git || command -v gitlab-runner; then exit 9; fi\n",
        );
    let (ok, log) = setup.run_job(&pipeline, &[]);
    assert!(ok, "{log}");
    assert!(
        log.contains("release 1.0 built by job"),
        "artifacts did not arrive: {log}"
    );
    assert!(
        log.contains("dependencies fetched by job"),
        "cache was not restored: {log}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_service_is_reachable_by_its_alias() {
    let Some(socket) = engine("a_service_is_reachable_by_its_alias") else {
        return;
    };
    let setup = new_setup("service", &socket, "network_mode = \"none\"", "");
    let yaml = format!(
        "svc:\n  services:\n    - name: {SERVICE_IMAGE}\n      alias: echo-svc\n      command: [\"sh\", \"-c\", \"while true; do echo pong | nc -l -p 7777; done\"]\n  script:\n    - for i in $(seq 1 50); do if exec 3<>/dev/tcp/echo-svc/7777; then cat <&3; break; fi; sleep 0.2; done\n"
    );
    let (ok, log) = setup.run_job(&yaml, &[]);
    assert!(ok, "{log}");
    assert!(
        log.contains("Starting service localhost/drover-test/busybox:latest as echo-svc"),
        "{log}"
    );
    assert!(log.contains("pong"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_missing_engine_socket_is_a_system_failure_that_names_it() {
    let Some(_) = engine("a_missing_engine_socket_is_a_system_failure_that_names_it") else {
        return;
    };
    let setup = new_setup("nosocket", Path::new("/nonexistent/podman.sock"), "", "");
    let (ok, log) = setup.run_job("x:\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(
        log.contains("the engine socket /nonexistent/podman.sock does not exist"),
        "{log}"
    );
    assert!(log.contains("result: runner_system_failure"), "{log}");
}

#[test]
fn an_image_off_the_allow_list_is_a_system_failure_that_names_the_list() {
    let Some(socket) =
        engine("an_image_off_the_allow_list_is_a_system_failure_that_names_the_list")
    else {
        return;
    };
    let setup = new_setup("allowlist", &socket, "", "");
    let (ok, log) = setup.run_job(
        "x:\n  image: docker.io/library/alpine:3\n  script: [echo never]\n",
        &[],
    );
    assert!(!ok);
    assert!(
        log.contains("policy.allowed_images (localhost/drover-test/**)"),
        "{log}"
    );
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_missing_image_with_pull_policy_never_is_a_clear_error() {
    let Some(socket) = engine("a_missing_image_with_pull_policy_never_is_a_clear_error") else {
        return;
    };
    let setup = new_setup("noimage", &socket, "", "");
    let (ok, log) = setup.run_job(
        "x:\n  image: localhost/drover-test/absent:1\n  script: [echo never]\n",
        &[],
    );
    assert!(!ok);
    assert!(
        log.contains(
            "image localhost/drover-test/absent:1 is not present and pull_policy is never"
        ),
        "{log}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn gc_removes_only_expired_jobs_and_doctor_reports_the_engine() {
    let Some(socket) = engine("gc_removes_only_expired_jobs_and_doctor_reports_the_engine") else {
        return;
    };
    let setup = new_setup("gc", &socket, "network_mode = \"none\"", "");
    setup.abandon_an_expired_job();
    setup.expect_gc_removes("job 99001");

    let doctor = setup.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "{text}");
    assert!(text.contains("ok   engine:"), "{text}");
}

#[test]
fn real_runner_pipeline_with_the_runners_own_helpers_in_the_helper_container() {
    let test = "real_runner_pipeline_with_the_runners_own_helpers_in_the_helper_container";
    let (Some(socket), Some(runner)) = (engine(test), gitlab_runner_for_test(test)) else {
        return;
    };
    // The real gitlab-runner binary is mounted into the helper: cache and artifacts use the
    // runner's own helper commands; host networking lets them reach drover's fake GitLab.
    let driver = format!(
        "network_mode = \"host\"\nhelper_image = \"{HELPER_IMAGE}\"\ngitlab_runner_binary = {runner:?}"
    );
    let setup = new_setup("realrunner", &socket, &driver, "");
    let pipeline = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/jobs/pipeline.yml"
    ))
    .expect("example pipeline");
    let runner_arg = runner.to_string_lossy().into_owned();
    let (ok, log) = setup.run_job(
        &pipeline,
        &["--runner", "real", "--gitlab-runner", &runner_arg],
    );
    assert!(ok, "{log}");
    assert!(
        log.contains("Running with gitlab-runner"),
        "not the real runner: {log}"
    );
    assert!(log.contains("release 1.0 built by job"), "{log}");
    assert!(log.contains("dependencies fetched by job"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn without_the_channel_directory_each_stage_is_an_exec() {
    let Some(socket) = engine("without_the_channel_directory_each_stage_is_an_exec") else {
        return;
    };
    // An engine that cannot see the driver's channel directory (one in a VM) leaves its
    // agent without orders; removing the directory after prepare shows what such a job gets:
    // the same bytes and exit status, through an exec per stage.
    let setup = new_setup("attach", &socket, "network_mode = \"none\"", "");
    let response = r#"{"id": 99002, "token": "t", "job_info": {"project_id": 5}, "runner_info": {"timeout": 600}, "variables": []}"#;
    let prepare = setup.stage(response, &["prepare"]);
    assert!(
        prepare.status.success(),
        "{}",
        String::from_utf8_lossy(&prepare.stderr)
    );
    let jobs = setup.dir.path().join("state/jobs");
    for job in std::fs::read_dir(&jobs).expect("job dirs").flatten() {
        std::fs::remove_dir_all(job.path().join("io-job")).expect("remove the channel dir");
    }
    let script = setup.dir.path().join("script");
    std::fs::write(&script, "printf 'out\\377'; printf 'err' >&2; exit 3\n").expect("script");
    let run = setup.stage(
        response,
        &["run", script.to_str().expect("utf-8"), "build_script"],
    );
    assert_eq!(
        run.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(run.stdout, b"out\xff");
    assert_eq!(run.stderr, b"err");
    let code = std::fs::read_to_string(setup.dir.path().join("custom-executor1/build_exit_code"))
        .expect("exit code file");
    assert_eq!(code, "3");
    let cleanup = setup.stage(response, &["cleanup"]);
    assert!(cleanup.status.success());
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn sources_come_through_the_helper_into_a_user_image_without_git() {
    let Some(socket) = engine("sources_come_through_the_helper_into_a_user_image_without_git")
    else {
        return;
    };
    // A repository on this host that drover's fake GitLab serves as the project's; host
    // networking lets the helper's git fetch reach it on 127.0.0.1.
    let setup = new_setup(
        "sources",
        &socket,
        &format!("network_mode = \"host\"\nhelper_image = \"{HELPER_IMAGE}\""),
        "",
    );
    let repo = setup.dir.path().join("repo");
    commit_files(&repo, &[("hello.txt", "from the repository\n")]).expect("test repository");
    let yaml = "show:\n  script:\n    - cat hello.txt\n    - if command -v git; then exit 9; fi\n";
    let repo_arg = repo.to_string_lossy().into_owned();
    let (ok, log) = setup.run_job(yaml, &["--runner", "emulated", "--repo", &repo_arg]);
    assert!(ok, "{log}");
    assert!(log.contains("Checking out"), "{log}");
    assert!(log.contains("from the repository"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

/// Runs a long job through `drover run-job`, presses Ctrl-C (SIGINT to drover) once the
/// script is under way, and returns the whole log.
fn run_and_interrupt(setup: &DriverSetup, runner: &[&str]) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = setup
        .run_job_command(
            "long:\n  script:\n    - for i in $(seq 1 600); do echo tick $i; sleep 0.5; done\n  after_script:\n    - echo after_script ran\n",
            runner,
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("drover runs");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let mut log = String::new();
    let mut interrupted = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while let Ok(line) =
        received.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        if !interrupted && line.contains("tick 3") {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
            interrupted = true;
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().expect("drover exits");
    assert!(interrupted, "the script never started: {log}");
    assert!(!status.success(), "{log}");
    log
}

#[test]
fn ctrl_c_cancels_the_job_after_script_runs_and_nothing_is_left() {
    let Some(socket) = engine("ctrl_c_cancels_the_job_after_script_runs_and_nothing_is_left")
    else {
        return;
    };
    let setup = new_setup("ctrlc", &socket, "network_mode = \"none\"", "");
    let mut runners = vec![vec!["--runner".to_owned(), "emulated".to_owned()]];
    if let Some(binary) = gitlab_runner_for_test("ctrl_c_cancels_the_job (real runner)") {
        runners.push(vec![
            "--runner".into(),
            "real".into(),
            "--gitlab-runner".into(),
            binary.to_string_lossy().into_owned(),
        ]);
    }
    for runner in runners {
        let args: Vec<&str> = runner.iter().map(String::as_str).collect();
        let log = run_and_interrupt(&setup, &args);
        assert!(
            log.contains("Job long result: canceled"),
            "{runner:?}: {log}"
        );
        assert!(log.contains("after_script ran"), "{runner:?}: {log}");
        assert!(
            !log.contains("tick 40\n"),
            "{runner:?}: the script went on after the cancel: {log}"
        );
        assert_eq!(setup.leftovers(), Vec::<String>::new(), "{runner:?}");
    }
}

#[test]
fn gc_and_doctor_stop_on_sigterm_against_an_engine_that_never_answers() {
    // No engine needed: the engine here is a socket that accepts and never answers.
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("hung.sock");
    drover_harness::setup::hung_socket(&socket);
    let setup = new_setup("hung", &socket, "", "");
    setup.expect_maintenance_stops_on_sigterm();
}

#[test]
fn caches_are_per_runner_and_per_project_and_private_on_the_host() {
    let Some(socket) = engine("caches_are_per_runner_and_per_project_and_private_on_the_host")
    else {
        return;
    };
    let setup = new_setup("cacheiso", &socket, "network_mode = \"none\"", "");
    let other = setup_in(
        "cacheisob",
        Some(&setup),
        &socket,
        "network_mode = \"none\"",
        "",
    );
    drover_harness::setup::expect_caches_per_runner_and_project(&setup, &other);
}

#[test]
fn a_service_off_the_allow_list_is_refused_and_services_get_their_own_limits() {
    let test = "a_service_off_the_allow_list_is_refused_and_services_get_their_own_limits";
    let Some(socket) = engine(test) else {
        return;
    };
    // A service image the policy would refuse as the job's image.
    let refused = "x:\n  services: [docker.io/library/alpine:3]\n  script: [echo never]\n";
    let setup = new_setup("svcpolicy", &socket, "network_mode = \"none\"", "");
    let (ok, log) = setup.run_job(refused, &[]);
    assert!(!ok);
    assert!(
        log.contains("service image \"docker.io/library/alpine:3\" is not allowed by the operator's policy.allowed_images"),
        "{log}"
    );
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());

    // With a list of their own, only that list counts; and a service gets its own limits.
    let setup = new_setup(
        "svclimits",
        &socket,
        "network_mode = \"none\"",
        &format!(
            "cpus = 1.5\nmemory = \"512MiB\"\nservice_cpus = 0.5\nservice_memory = \"64MiB\"\nallowed_services = [\"{SERVICE_IMAGE}\"]"
        ),
    );
    let (ok, log) = setup.run_job(
        &format!("x:\n  services: [{USER_IMAGE}]\n  script: [echo never]\n"),
        &[],
    );
    assert!(!ok);
    assert!(log.contains("policy.allowed_services"), "{log}");
    let services = format!(
        r#"[{{"name": "{SERVICE_IMAGE}", "alias": "svc", "entrypoint": null, "command": ["sleep", "600"]}}]"#
    );
    let response = drover_harness::setup::response(99201, 5);
    let prepare = setup.stage_with(
        &response,
        &["prepare"],
        &[("CUSTOM_ENV_CI_JOB_SERVICES", &services)],
    );
    assert!(
        prepare.status.success(),
        "{}",
        String::from_utf8_lossy(&prepare.stderr)
    );
    let limits = |container: &str| {
        let output = Command::new("podman")
            .args([
                "inspect",
                "--format",
                "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
                container,
            ])
            .output()
            .expect("podman inspect");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let job = format!("drover-{}-p5-j99201", setup.runner);
    assert_eq!(limits(&job), format!("1500000000 {}", 512 << 20));
    assert_eq!(
        limits(&format!("{job}-svc-0")),
        format!("500000000 {}", 64 << 20)
    );
    let cleanup = setup.stage(&response, &["cleanup"]);
    assert!(cleanup.status.success());
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_cpu_request_too_small_to_be_a_limit_is_refused() {
    let Some(socket) = engine("a_cpu_request_too_small_to_be_a_limit_is_refused") else {
        return;
    };
    let setup = new_setup(
        "tinycpu",
        &socket,
        "network_mode = \"none\"",
        "max_cpus = 2",
    );
    let job = |cpus: &str| {
        format!("x:\n  variables: {{DROVER_CPUS: \"{cpus}\"}}\n  script: [echo \"ran $((6*7))\"]\n")
    };
    let (ok, log) = setup.run_job(&job("0.0000000001"), &[]);
    assert!(!ok);
    assert!(
        log.contains("must be a number of CPUs from 0.01 to 2"),
        "{log}"
    );
    assert!(!log.contains("ran 42"), "{log}");
    let (ok, log) = setup.run_job(&job("0.5"), &[]);
    assert!(ok, "{log}");
    assert!(log.contains("ran 42"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn cleanup_and_gc_leave_other_runners_jobs_alone_and_gc_finds_half_made_jobs() {
    let test = "cleanup_and_gc_leave_other_runners_jobs_alone_and_gc_finds_half_made_jobs";
    let Some(socket) = engine(test) else {
        return;
    };
    // Two runners, the same job id: one's cleanup must not touch the other's volume.
    let mine = new_setup("mine", &socket, "network_mode = \"none\"", "");
    let theirs = new_setup("theirs", &socket, "network_mode = \"none\"", "");
    let response = drover_harness::setup::response(99301, 5);
    for setup in [&mine, &theirs] {
        let prepare = setup.stage(&response, &["prepare"]);
        assert!(
            prepare.status.success(),
            "{}",
            String::from_utf8_lossy(&prepare.stderr)
        );
    }
    assert!(mine.stage(&response, &["cleanup"]).status.success());
    assert_eq!(mine.leftovers(), Vec::<String>::new());
    assert_eq!(theirs.leftovers().len(), 2, "{:?}", theirs.leftovers());
    assert!(theirs.stage(&response, &["cleanup"]).status.success());
    assert_eq!(theirs.leftovers(), Vec::<String>::new());

    // A job whose containers are gone (a prepare cut short, a crash) still has its volume and
    // its directory: gc finds them by those.
    let setup = new_setup("halfmade", &socket, "network_mode = \"none\"", "");
    setup.abandon_an_expired_job();
    let container = format!("drover-{}-p5-j99001", setup.runner);
    let removed = Command::new("podman")
        .args(["rm", "-f", "-t", "0", &container])
        .output();
    assert!(removed.is_ok_and(|o| o.status.success()));
    assert_eq!(setup.leftovers(), vec![format!("{container}-builds")]);
    let job_dir = setup.state_dir().join("jobs").join(&container);
    assert!(job_dir.exists());
    setup.expect_gc_removes("job 99001");
    assert!(!job_dir.exists(), "gc left {}", job_dir.display());
}
