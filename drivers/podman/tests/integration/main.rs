//! drover-podman against real engines, called as GitLab Runner calls it (through the `drover`
//! CLI's emulated runner). Every test runs twice, against podman (`podman::…`) and against
//! Docker Engine (`docker::…`), each through its Docker-compatible API socket:
//! `DROVER_PODMAN_SOCKET` (default `/run/podman/podman.sock`) and `DROVER_DOCKER_SOCKET` (default
//! `/var/run/docker.sock`). What a test inspects on the engine it asks that same API, so both
//! engines are checked the same way. An engine that does not answer makes its tests skip with
//! one line, or fail where `DROVER_REQUIRE` names it (CI); `tests/setup/podman.sh` and
//! `tests/setup/docker.sh` set them up.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use drover_harness::repository::commit_files;
use drover_test_support::require;
use drover_test_support::setup::DriverSetup;

const DRIVER: &str = env!("CARGO_BIN_EXE_drover-podman");
const USER_IMAGE: &str = "localhost/drover-test/debian:bookworm";
const HELPER_IMAGE: &str = "localhost/drover-test/helper:bookworm";
const SERVICE_IMAGE: &str = "localhost/drover-test/busybox:latest";

/// An engine under test: its name in `DROVER_REQUIRE` and its API socket.
#[derive(Clone)]
struct Engine {
    name: &'static str,
    socket: PathBuf,
}

impl Engine {
    /// The engine `name` (`podman` or `docker`) if its socket answers; otherwise a skip, or a
    /// failure where `DROVER_REQUIRE` names it.
    fn find(name: &'static str, test: &str) -> Option<Engine> {
        let (variable, default, setup) = match name {
            "podman" => (
                "DROVER_PODMAN_SOCKET",
                "/run/podman/podman.sock",
                "tests/setup/podman.sh",
            ),
            _ => (
                "DROVER_DOCKER_SOCKET",
                "/var/run/docker.sock",
                "tests/setup/docker.sh",
            ),
        };
        let socket = std::env::var_os(variable)
            .filter(|s| !s.is_empty())
            .map_or_else(|| PathBuf::from(default), PathBuf::from);
        let engine = Engine { name, socket };
        let found = match engine.api(&["-f", "http://d/_ping"]) {
            Some(_) => Ok(engine),
            None => Err(format!(
                "no {name} API at {} (run {setup} as root, or set {variable})",
                engine.socket.display()
            )),
        };
        require::backend(name, &format!("{name}::{test}"), found)
    }

    /// `curl ARGS` against the engine's socket; its stdout when curl succeeded.
    fn api(&self, args: &[&str]) -> Option<Vec<u8>> {
        let output = Command::new("curl")
            .args(["-s", "--max-time", "10", "--unix-socket"])
            .arg(&self.socket)
            .args(args)
            .output()
            .ok()?;
        output.status.success().then_some(output.stdout)
    }

    /// A JSON answer of the engine's API to `GET path`, with `query` URL-encoded.
    fn get(&self, path: &str, query: &[&str]) -> serde_json::Value {
        let mut args = vec!["-f", "-G"];
        for item in query {
            args.extend(["--data-urlencode", item]);
        }
        let url = format!("http://d/v1.41{path}");
        args.push(&url);
        let body = self
            .api(&args)
            .unwrap_or_else(|| panic!("{}: GET {path} failed", self.name));
        serde_json::from_slice(&body).expect("the engine answers JSON")
    }

    /// Containers and volumes labelled with `runner`.
    fn leftovers(&self, runner: &str) -> Vec<String> {
        let filter = format!(r#"filters={{"label":["drover.runner={runner}"]}}"#);
        let containers = self.get("/containers/json", &["all=1", &filter]);
        let volumes = self.get("/volumes", &[&filter]);
        let mut found: Vec<String> = containers
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["Names"][0].as_str())
            .map(|name| name.trim_start_matches('/').to_owned())
            .collect();
        found.extend(
            volumes["Volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["Name"].as_str())
                .map(str::to_owned),
        );
        found
    }

    /// The CPU (in billionths) and memory limits of a container.
    fn limits(&self, container: &str) -> String {
        let config = &self.get(&format!("/containers/{container}/json"), &[])["HostConfig"];
        format!("{} {}", config["NanoCpus"], config["Memory"])
    }

    /// Kills a container's processes (SIGKILL), as a restarting engine does.
    fn kill(&self, container: &str) {
        let url = format!("http://d/v1.41/containers/{container}/kill");
        assert!(
            self.api(&["-f", "-X", "POST", &url]).is_some(),
            "{}: cannot kill {container}",
            self.name
        );
    }

    /// Removes a container at once, as a crash or another tool would.
    fn remove(&self, container: &str) {
        let url = format!("http://d/v1.41/containers/{container}?force=true");
        assert!(
            self.api(&["-f", "-X", "DELETE", &url]).is_some(),
            "{}: cannot remove {container}",
            self.name
        );
    }
}

/// Defines each test once per engine: `podman::TEST` and `docker::TEST` call `TEST(&engine)`.
macro_rules! on_each_engine {
    ($($test:ident),* $(,)?) => {
        on_each_engine!(@engine podman: $($test),*);
        on_each_engine!(@engine docker: $($test),*);
    };
    (@engine $engine:ident: $($test:ident),*) => {
        mod $engine {
            $(#[test]
            fn $test() {
                if let Some(engine) = super::Engine::find(stringify!($engine), stringify!($test)) {
                    super::$test(&engine);
                }
            })*
        }
    };
}

on_each_engine!(
    passes_the_conformance_suite_and_leaves_nothing_behind,
    a_user_image_without_git_or_gitlab_runner_gets_cache_and_artifacts_through_the_helper,
    a_service_is_reachable_by_its_alias,
    a_missing_engine_socket_is_a_system_failure_that_names_it,
    an_image_off_the_allow_list_is_a_system_failure_that_names_the_list,
    a_missing_image_with_pull_policy_never_is_a_clear_error,
    gc_removes_only_expired_jobs_and_doctor_reports_the_engine,
    real_runner_pipeline_with_the_runners_own_helpers_in_the_helper_container,
    without_the_channel_directory_each_stage_is_an_exec,
    sources_come_through_the_helper_into_a_user_image_without_git,
    ctrl_c_cancels_the_job_after_script_runs_and_nothing_is_left,
    caches_are_per_runner_and_per_project_and_private_on_the_host,
    a_service_off_the_allow_list_is_refused_and_services_get_their_own_limits,
    a_cpu_request_too_small_to_be_a_limit_is_refused,
    cleanup_and_gc_leave_other_runners_jobs_alone_and_gc_finds_half_made_jobs,
    cleanup_waits_for_an_engine_that_is_restarting,
    a_stage_whose_container_was_stopped_says_so,
);

/// A settings file with a runner name of its own, so leftovers are attributable to one test.
fn new_setup(test: &str, engine: &Engine, driver: &str, policy: &str) -> DriverSetup {
    setup_in(test, None, engine, &engine.socket, driver, policy)
}

/// The same, with the `state_dir` of another setup when given, and the driver pointed at
/// `socket` (the engine's own, unless a test breaks it).
fn setup_in(
    test: &str,
    state_of: Option<&DriverSetup>,
    engine: &Engine,
    socket: &Path,
    driver: &str,
    policy: &str,
) -> DriverSetup {
    let inspect = engine.clone();
    DriverSetup::new(
        DRIVER,
        test,
        Box::new(move |runner| inspect.leftovers(runner)),
        |runner, own_state| {
            let state = state_of.map_or_else(|| own_state.to_owned(), DriverSetup::state_dir);
            format!(
                "runner_name = \"{runner}\"\n\
                 [driver]\nsocket = {socket:?}\npull_policy = \"never\"\nstate_dir = {state:?}\n{driver}\n\
                 [policy]\ndefault_image = \"{USER_IMAGE}\"\nallowed_images = [\"localhost/drover-test/**\"]\n{policy}\n"
            )
        },
    )
}

fn stand_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/harness/stand-in/gitlab-runner")
}

fn passes_the_conformance_suite_and_leaves_nothing_behind(engine: &Engine) {
    let setup = new_setup("conformance", engine, "network_mode = \"none\"", "");
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

fn a_user_image_without_git_or_gitlab_runner_gets_cache_and_artifacts_through_the_helper(
    engine: &Engine,
) {
    // Host networking only so the helper reaches drover's fake GitLab on 127.0.0.1.
    let driver = format!(
        "network_mode = \"host\"\nhelper_image = \"{HELPER_IMAGE}\"\ngitlab_runner_binary = {:?}",
        stand_in()
    );
    let setup = new_setup("helper", engine, &driver, "");
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

fn a_service_is_reachable_by_its_alias(engine: &Engine) {
    let setup = new_setup("service", engine, "network_mode = \"none\"", "");
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

fn a_missing_engine_socket_is_a_system_failure_that_names_it(engine: &Engine) {
    let setup = setup_in(
        "nosocket",
        None,
        engine,
        Path::new("/nonexistent/podman.sock"),
        "",
        "",
    );
    let (ok, log) = setup.run_job("x:\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(
        log.contains("the engine socket /nonexistent/podman.sock does not exist"),
        "{log}"
    );
    assert!(log.contains("result: runner_system_failure"), "{log}");
}

fn an_image_off_the_allow_list_is_a_system_failure_that_names_the_list(engine: &Engine) {
    let setup = new_setup("allowlist", engine, "", "");
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

fn a_missing_image_with_pull_policy_never_is_a_clear_error(engine: &Engine) {
    let setup = new_setup("noimage", engine, "", "");
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

fn gc_removes_only_expired_jobs_and_doctor_reports_the_engine(engine: &Engine) {
    let setup = new_setup("gc", engine, "network_mode = \"none\"", "");
    setup.abandon_an_expired_job();
    setup.expect_gc_removes("job 99001");

    let doctor = setup.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "{text}");
    let named = if engine.name == "podman" {
        "ok   engine: Podman Engine "
    } else {
        "ok   engine: Docker Engine "
    };
    assert!(text.contains(named), "{text}");
}

fn real_runner_pipeline_with_the_runners_own_helpers_in_the_helper_container(engine: &Engine) {
    let Some(runner) = require::gitlab_runner(
        "real_runner_pipeline_with_the_runners_own_helpers_in_the_helper_container",
    ) else {
        return;
    };
    // The real gitlab-runner binary is mounted into the helper: cache and artifacts use the
    // runner's own helper commands; host networking lets them reach drover's fake GitLab.
    let driver = format!(
        "network_mode = \"host\"\nhelper_image = \"{HELPER_IMAGE}\"\ngitlab_runner_binary = {runner:?}"
    );
    let setup = new_setup("realrunner", engine, &driver, "");
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

fn without_the_channel_directory_each_stage_is_an_exec(engine: &Engine) {
    // An engine that cannot see the driver's channel directory (one in a VM) leaves its
    // agent without orders; removing the directory after prepare shows what such a job gets:
    // the same bytes and exit status, through an exec per stage.
    let setup = new_setup("attach", engine, "network_mode = \"none\"", "");
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

fn sources_come_through_the_helper_into_a_user_image_without_git(engine: &Engine) {
    // A repository on this host that drover's fake GitLab serves as the project's; host
    // networking lets the helper's git fetch reach it on 127.0.0.1.
    let setup = new_setup(
        "sources",
        engine,
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

fn ctrl_c_cancels_the_job_after_script_runs_and_nothing_is_left(engine: &Engine) {
    let setup = new_setup("ctrlc", engine, "network_mode = \"none\"", "");
    let mut runners = vec![vec!["--runner".to_owned(), "emulated".to_owned()]];
    if let Some(binary) = require::gitlab_runner("ctrl_c_cancels_the_job (real runner)") {
        runners.push(vec![
            "--runner".into(),
            "real".into(),
            "--gitlab-runner".into(),
            binary.to_string_lossy().into_owned(),
        ]);
    }
    for runner in runners {
        let args: Vec<&str> = runner.iter().map(String::as_str).collect();
        let log = setup.run_and_interrupt(&args);
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

#[test] // no engine: its engine is a socket that never answers
fn gc_and_doctor_stop_on_sigterm_against_an_engine_that_never_answers() {
    // No engine needed: the engine here is a socket that accepts and never answers.
    let dir = tempfile::tempdir().expect("tmp");
    let socket = dir.path().join("hung.sock");
    let backend = drover_test_support::setup::HungSocket::bind(&socket);
    let engine = Engine {
        name: "none",
        socket: socket.clone(),
    };
    let setup = new_setup("hung", &engine, "", "");
    setup.expect_maintenance_stops_on_sigterm(&backend);
}

fn caches_are_per_runner_and_per_project_and_private_on_the_host(engine: &Engine) {
    let setup = new_setup("cacheiso", engine, "network_mode = \"none\"", "");
    let other = setup_in(
        "cacheisob",
        Some(&setup),
        engine,
        &engine.socket,
        "network_mode = \"none\"",
        "",
    );
    drover_test_support::setup::expect_caches_per_runner_and_project(&setup, &other);
}

fn a_service_off_the_allow_list_is_refused_and_services_get_their_own_limits(engine: &Engine) {
    // A service image the policy would refuse as the job's image.
    let refused = "x:\n  services: [docker.io/library/alpine:3]\n  script: [echo never]\n";
    let setup = new_setup("svcpolicy", engine, "network_mode = \"none\"", "");
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
        engine,
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
    let response = drover_test_support::setup::response(99201, 5);
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
    let limits = |container: &str| engine.limits(container);
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

fn a_cpu_request_too_small_to_be_a_limit_is_refused(engine: &Engine) {
    let setup = new_setup("tinycpu", engine, "network_mode = \"none\"", "max_cpus = 2");
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

fn cleanup_and_gc_leave_other_runners_jobs_alone_and_gc_finds_half_made_jobs(engine: &Engine) {
    // Two runners, the same job id: one's cleanup must not touch the other's volume.
    let mine = new_setup("mine", engine, "network_mode = \"none\"", "");
    let theirs = new_setup("theirs", engine, "network_mode = \"none\"", "");
    let response = drover_test_support::setup::response(99301, 5);
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
    let setup = new_setup("halfmade", engine, "network_mode = \"none\"", "");
    setup.abandon_an_expired_job();
    let container = format!("drover-{}-p5-j99001", setup.runner);
    engine.remove(&container);
    assert_eq!(setup.leftovers(), vec![format!("{container}-builds")]);
    let job_dir = setup.state_dir().join("jobs").join(&container);
    assert!(job_dir.exists());
    setup.expect_gc_removes("job 99001");
    assert!(!job_dir.exists(), "gc left {}", job_dir.display());
}

/// The engine's socket through a proxy that can play a restarting engine: it accepts and drops
/// the next connections it is told to, then forwards again.
struct RestartingEngine {
    socket: PathBuf,
    drop_next: Arc<AtomicUsize>,
}

impl RestartingEngine {
    fn start(dir: &Path, engine: &Engine) -> RestartingEngine {
        let socket = dir.join("engine.sock");
        let listener = UnixListener::bind(&socket).expect("bind the proxy");
        let drop_next = Arc::new(AtomicUsize::new(0));
        let (target, dropping) = (engine.socket.clone(), Arc::clone(&drop_next));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let drop_this = dropping
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if !drop_this {
                    let target = target.clone();
                    std::thread::spawn(move || forward(client, &target));
                }
            }
        });
        RestartingEngine { socket, drop_next }
    }

    fn drop_next(&self, connections: usize) {
        self.drop_next.store(connections, Ordering::SeqCst);
    }
}

fn forward(client: UnixStream, target: &Path) {
    let Ok(server) = UnixStream::connect(target) else {
        return;
    };
    let (mut from_client, mut to_server) = (
        client.try_clone().expect("clone"),
        server.try_clone().expect("clone"),
    );
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_server);
        let _ = to_server.shutdown(std::net::Shutdown::Write);
    });
    let (mut from_server, mut to_client) = (server, client);
    let _ = std::io::copy(&mut from_server, &mut to_client);
    let _ = to_client.shutdown(std::net::Shutdown::Write);
    let _ = upstream.join();
}

fn cleanup_waits_for_an_engine_that_is_restarting(engine: &Engine) {
    let dir = tempfile::tempdir().expect("tmp");
    let proxy = RestartingEngine::start(dir.path(), engine);
    let setup = setup_in(
        "restart",
        None,
        engine,
        &proxy.socket,
        "network_mode = \"none\"",
        "",
    );
    let response = drover_test_support::setup::response(99401, 5);
    let prepare = setup.stage(&response, &["prepare"]);
    assert!(
        prepare.status.success(),
        "{}",
        String::from_utf8_lossy(&prepare.stderr)
    );
    // The engine goes away for three connections: cleanup must wait for it, not give up and
    // leave the job's container and volume behind.
    proxy.drop_next(3);
    let cleanup = setup.stage(&response, &["cleanup"]);
    let stderr = String::from_utf8_lossy(&cleanup.stderr);
    assert!(cleanup.status.success(), "{stderr}");
    assert!(stderr.contains("reaching the engine failed"), "{stderr}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

fn a_stage_whose_container_was_stopped_says_so(engine: &Engine) {
    let setup = new_setup("stopped", engine, "network_mode = \"none\"", "");
    let response = drover_test_support::setup::response(99501, 5);
    let prepare = setup.stage(&response, &["prepare"]);
    assert!(
        prepare.status.success(),
        "{}",
        String::from_utf8_lossy(&prepare.stderr)
    );
    let container = format!("drover-{}-p5-j99501", setup.runner);
    engine.kill(&container);
    let (code, text) = setup.run_script(&response, "echo never\n");
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "container {container} exited with 137 while the stage ran"
        )),
        "{text}"
    );
    assert!(!text.contains("never"), "{text}");
    assert!(setup.stage(&response, &["cleanup"]).status.success());
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}
