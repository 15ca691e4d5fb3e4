//! drover-core as GitLab Runner sees it: the test driver is started exactly as the runner
//! starts a driver (own process group, the control variables, the per-job temp dir as cwd,
//! stdin from /dev/null, stdout and stderr read until EOF) and the tests assert what the
//! runner would notice: exit codes, the job log, `BUILD_EXIT_CODE_FILE`, and what is left.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const DRIVER: &str = env!("CARGO_BIN_EXE_drover-test-driver");

/// One job's runner-side state: the temp dir, its response file and the settings file.
struct Runner {
    dir: tempfile::TempDir,
    settings: String,
    env: Vec<(String, String)>,
}

/// What the runner sees of one call.
struct Call {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    elapsed: Duration,
}

impl Runner {
    fn new(settings: &str) -> Runner {
        let dir = tempfile::Builder::new()
            .prefix("custom-executor")
            .tempdir()
            .expect("temp dir");
        let response = r#"{"id": 1001, "token": "secret-job-token",
            "job_info": {"name": "t", "stage": "test", "project_id": 42, "project_name": "p"},
            "runner_info": {"timeout": 600}, "variables": []}"#;
        std::fs::write(dir.path().join("response.json"), response).expect("response file");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let env = vec![
            ("BUILD_FAILURE_EXIT_CODE".into(), "1".into()),
            ("SYSTEM_FAILURE_EXIT_CODE".into(), "2".into()),
            ("JOB_RESPONSE_FILE".into(), path("response.json")),
            ("BUILD_EXIT_CODE_FILE".into(), path("build_exit_code")),
            ("TMPDIR".into(), path("")),
            ("CUSTOM_ENV_CI_JOB_SERVICES".into(), String::new()),
            ("CUSTOM_ENV_CI_JOB_TOKEN".into(), "secret-job-token".into()),
        ];
        let settings_path = path("driver.toml");
        std::fs::write(&settings_path, settings).expect("settings");
        Runner {
            dir,
            settings: settings_path,
            env,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn script(&self, body: &str) -> PathBuf {
        let path = self.path().join(format!("script{}", fastish_id()));
        std::fs::write(&path, body).expect("script");
        path
    }

    /// Starts the driver like the runner: `<exec> <args...>`, a process group of its own.
    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut command = Command::new(DRIVER);
        command
            .arg("--config")
            .arg(&self.settings)
            .args(args)
            .current_dir(self.path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        command.spawn().expect("driver starts")
    }

    fn call(&self, args: &[&str]) -> Call {
        finish(self.start(args, &[]), Duration::from_secs(30))
    }

    fn build_exit_code(&self) -> Option<String> {
        std::fs::read_to_string(self.path().join("build_exit_code")).ok()
    }
}

fn fastish_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// Waits as Go's `cmd.Wait` does: until the process exited **and** both pipes reached EOF
/// (§6.1). Panics if that takes longer than `limit`, and kills the group then.
fn finish(mut child: Child, limit: Duration) -> Call {
    let started = Instant::now();
    let pgid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    let (tx, rx) = mpsc::channel();
    let mut stdout = child.stdout.take().expect("stdout piped");
    let mut stderr = child.stderr.take().expect("stderr piped");
    let out_tx = tx.clone();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        let _ = out_tx.send((1, buf));
    });
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        let _ = tx.send((2, buf));
    });
    let mut outputs = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        let remaining = limit.saturating_sub(started.elapsed());
        match rx.recv_timeout(remaining) {
            Ok((fd, bytes)) => outputs[fd - 1] = bytes,
            Err(_) => {
                let _ = killpg(pgid, Signal::SIGKILL);
                panic!("the call's pipes stayed open for more than {limit:?}");
            }
        }
    }
    let status = child.wait().expect("wait");
    let [stdout, stderr] = outputs;
    Call {
        status,
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

fn sigterm_group(child: &Child) {
    let pgid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    killpg(pgid, Signal::SIGTERM).expect("SIGTERM the group");
}

fn process_alive(pid: i32) -> bool {
    // A zombie has been killed already; only a live process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> i32 {
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never appeared", path.display());
}

#[test]
fn a_panic_is_a_system_failure_with_one_line_not_exit_101() {
    for stage in ["config", "prepare", "cleanup"] {
        let runner = Runner::new(&format!("[driver]\npanic_in = \"{stage}\"\n"));
        let call = runner.call(&[stage]);
        assert_eq!(call.status.code(), Some(2), "{stage}: {}", call.stderr);
        assert_eq!(call.stderr.lines().count(), 1, "{stage}: {}", call.stderr);
        assert!(
            call.stderr.contains("internal error: asked to panic"),
            "{}",
            call.stderr
        );
    }
}

#[test]
fn script_exit_codes_become_1_with_the_real_code_in_the_file() {
    let runner = Runner::new("");
    let failing = runner.script("echo before; exit 3\n");
    let call = runner.call(&["run", failing.to_str().expect("utf-8"), "build_script"]);
    assert_eq!(call.status.code(), Some(1));
    assert_eq!(runner.build_exit_code().as_deref(), Some("3"));
    assert_eq!(call.stdout, b"before\n");

    // A script exiting 2 is a script failure too, never a system failure (§4.4).
    let two = runner.script("exit 2\n");
    let call = runner.call(&["run", two.to_str().expect("utf-8"), "step_release"]);
    assert_eq!(call.status.code(), Some(1));
    assert_eq!(runner.build_exit_code().as_deref(), Some("2"));

    // A later successful stage removes the stale code (§4.5).
    let ok = runner.script("true\n");
    let call = runner.call(&[
        "run",
        "--ignored-run-arg",
        ok.to_str().expect("utf-8"),
        "after_script",
    ]);
    assert_eq!(call.status.code(), Some(0), "{}", call.stderr);
    assert_eq!(runner.build_exit_code(), None);
}

#[test]
fn output_is_streamed_byte_exact_including_non_utf8() {
    let runner = Runner::new("");
    let script = runner.script("printf '\\377\\376\\200 no newline'; printf 'err\\n' >&2\n");
    let call = runner.call(&["run", script.to_str().expect("utf-8"), "build_script"]);
    assert_eq!(call.status.code(), Some(0));
    assert_eq!(call.stdout, b"\xff\xfe\x80 no newline");
    assert_eq!(call.stderr, "err\n");
}

#[test]
fn sigterm_during_a_long_run_stops_the_child_work_within_2s() {
    let runner = Runner::new("");
    let pid_file = runner.path().join("sleep.pid");
    let script = runner.script(&format!(
        "trap 'exit 1' TERM\necho started\nsleep 300 & echo $! > {}\nwait\n",
        pid_file.display()
    ));
    let child = runner.start(
        &["run", script.to_str().expect("utf-8"), "build_script"],
        &[],
    );
    let sleep_pid = read_pid(&pid_file);
    let signalled = Instant::now();
    sigterm_group(&child);
    let call = finish(child, Duration::from_secs(10));
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "the stage returned {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert!(
        !process_alive(sleep_pid),
        "the script's sleep {sleep_pid} survived the cancel"
    );
    assert_eq!(call.stdout, b"started\n");
    assert_ne!(call.status.code(), Some(0));
}

#[test]
fn a_background_child_cannot_hold_the_stage_open() {
    let runner = Runner::new("");
    let pid_file = runner.path().join("escaped.pid");
    // One child stays in the group, one leaves it with setsid; both inherit the output pipes.
    let script = runner.script(&format!(
        "sleep 300 &\nsetsid sleep 301 & echo $! > {}\necho done\n",
        pid_file.display()
    ));
    let call = finish(
        runner.start(
            &["run", script.to_str().expect("utf-8"), "build_script"],
            &[],
        ),
        Duration::from_secs(10),
    );
    let escaped = read_pid(&pid_file);
    let _ = nix::sys::signal::kill(Pid::from_raw(escaped), Signal::SIGKILL);
    assert_eq!(call.status.code(), Some(0), "{}", call.stderr);
    assert_eq!(call.stdout, b"done\n");
    assert!(
        call.elapsed < Duration::from_secs(4),
        "the runner's pipes stayed open {:?}",
        call.elapsed
    );
}

#[test]
fn sigterm_during_prepare_exits_with_system_failure_within_5s() {
    let runner = Runner::new("[driver]\nprepare_millis = 60000\n");
    let mut child = runner.start(&["prepare"], &[]);
    // Wait for the first byte of the job log: the core is up and the stage has begun.
    let mut stderr = child.stderr.take().expect("stderr");
    let mut first = [0u8; 1];
    stderr
        .read_exact(&mut first)
        .expect("prepare prints progress");
    let signalled = Instant::now();
    sigterm_group(&child);
    let status = child.wait().expect("wait");
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert_eq!(status.code(), Some(2), "{rest}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert!(rest.contains("cancelled by the runner"), "{rest}");
}

#[test]
fn a_malformed_job_response_file_is_one_line_and_a_system_failure() {
    let runner = Runner::new("");
    std::fs::write(runner.path().join("response.json"), "{\"job_info\": {}").expect("write");
    for stage in ["config", "prepare", "cleanup"] {
        let call = runner.call(&[stage]);
        assert_eq!(call.status.code(), Some(2), "{stage}");
        assert_eq!(call.stderr.lines().count(), 1, "{}", call.stderr);
        assert!(
            call.stderr
                .contains("JOB_RESPONSE_FILE is not a valid job payload"),
            "{}",
            call.stderr
        );
    }
}

#[test]
fn missing_variables_are_named_in_one_line_and_a_system_failure() {
    let runner = Runner::new("");
    for missing in ["JOB_RESPONSE_FILE", "BUILD_FAILURE_EXIT_CODE"] {
        let mut command = Command::new(DRIVER);
        command
            .args(["--config", &runner.settings, "prepare"])
            .current_dir(runner.path())
            .envs(
                runner
                    .env
                    .iter()
                    .filter(|(k, _)| k != missing)
                    .map(|(k, v)| (k, v)),
            )
            .env_remove(missing)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let call = finish(command.spawn().expect("starts"), Duration::from_secs(10));
        assert_eq!(call.status.code(), Some(2));
        assert_eq!(call.stderr.lines().count(), 1, "{}", call.stderr);
        assert!(
            call.stderr.contains(&format!("{missing} is not set")),
            "{}",
            call.stderr
        );
    }
}

#[test]
fn config_prints_exactly_one_json_value() {
    let runner = Runner::new("");
    let call = runner.call(&["config"]);
    assert_eq!(call.status.code(), Some(0), "{}", call.stderr);
    let value: serde_json::Value = serde_json::from_slice(&call.stdout).expect("one JSON value");
    assert_eq!(value["driver"]["name"], "drover-test-driver");
}

#[test]
fn run_needs_the_script_and_stage_as_its_last_two_arguments() {
    let runner = Runner::new("");
    let call = runner.call(&["run", "only-one"]);
    assert_eq!(call.status.code(), Some(2));
    assert!(
        call.stderr.contains("last two arguments"),
        "{}",
        call.stderr
    );
}

#[test]
fn operator_secrets_never_reach_the_jobs_environment() {
    let runner = Runner::new("");
    let script = runner.script("env\n");
    let child = runner.start(
        &["run", script.to_str().expect("utf-8"), "build_script"],
        &[
            ("REGISTRY_PASSWORD", "operator-secret"),
            ("AWS_SECRET_ACCESS_KEY", "cloud-secret"),
        ],
    );
    let call = finish(child, Duration::from_secs(10));
    let env = String::from_utf8_lossy(&call.stdout);
    assert!(env.contains("PATH="), "{env}{}", call.stderr);
    for secret in [
        "operator-secret",
        "cloud-secret",
        "secret-job-token",
        "CUSTOM_ENV_",
    ] {
        assert!(!env.contains(secret), "{secret} leaked into the job: {env}");
    }
}

#[test]
fn an_unreadable_settings_file_is_named() {
    let runner = Runner::new("[driver]\nunknown_key = 1\n");
    let call = runner.call(&["prepare"]);
    assert_eq!(call.status.code(), Some(2));
    assert!(
        call.stderr
            .contains("driver.toml: driver: unknown field `unknown_key`"),
        "{}",
        call.stderr
    );
}

#[test]
fn overrides_take_their_settings_type_and_errors_never_show_the_value() {
    let runner = Runner::new("");
    let script = runner.script("echo ok\n");
    // An all-digit name and an all-digit string in `[driver]` stay strings (no stage panics).
    let call = finish(
        runner.start(
            &["run", script.to_str().expect("utf-8"), "build_script"],
            &[
                ("DROVER_RUNNER_NAME", "42"),
                ("DROVER_DRIVER__PANIC_IN", "123456"),
            ],
        ),
        Duration::from_secs(10),
    );
    assert_eq!(call.status.code(), Some(0), "{}", call.stderr);
    assert_eq!(call.stdout, b"ok\n");

    let call = finish(
        runner.start(
            &["prepare"],
            &[("DROVER_DRIVER__PREPARE_MILLIS", "hunter2")],
        ),
        Duration::from_secs(10),
    );
    assert_eq!(call.status.code(), Some(2));
    assert!(
        call.stderr
            .contains("DROVER_DRIVER__PREPARE_MILLIS: expected a whole number"),
        "{}",
        call.stderr
    );
    assert!(!call.stderr.contains("hunter2"), "{}", call.stderr);
}

#[test]
fn a_job_timeout_too_large_for_a_clock_does_not_break_prepare() {
    let runner = Runner::new("");
    let response = r#"{"id": 1001, "token": "t", "job_info": {"project_id": 42},
        "runner_info": {"timeout": 9223372036854775807}, "variables": []}"#;
    std::fs::write(runner.path().join("response.json"), response).expect("response file");
    let prepare = runner.call(&["prepare"]);
    assert_eq!(prepare.status.code(), Some(0), "{}", prepare.stderr);
}

#[test]
fn a_missing_script_is_a_system_failure_whatever_the_driver() {
    let runner = Runner::new("");
    let missing = runner.path().join("script-that-is-not-there");
    let run = runner.call(&["run", missing.to_str().expect("utf-8"), "build_script"]);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("the runner's script") && run.stderr.contains("does not exist"),
        "{}",
        run.stderr
    );
    assert_eq!(runner.build_exit_code(), None);
}
