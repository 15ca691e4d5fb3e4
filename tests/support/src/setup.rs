//! A driver under test with an operator settings file of its own, called the ways its
//! integration tests call it: through `drover run-job` and `drover conformance`, one stage at a
//! time as the runner calls it, or a maintenance command (`gc`, `doctor`). Each setup has a
//! runner name of its own, so whatever it leaves on a backend is attributable to one test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Lists what a runner (by `runner_name`) has on the backend: containers, instances, volumes.
pub type Leftovers = Box<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// A driver binary, a temporary directory and the settings file in it.
pub struct DriverSetup {
    /// Holds the settings file, the job files and the driver's `state_dir` (`state/`).
    pub dir: tempfile::TempDir,
    /// The `runner_name` of the settings: the test's name and this process's id.
    pub runner: String,
    driver: PathBuf,
    leftovers: Leftovers,
}

impl DriverSetup {
    /// A setup for `driver` whose settings file is `settings(runner_name, state_dir)` and
    /// whose backend is asked for what is left by `leftovers`.
    pub fn new(
        driver: impl Into<PathBuf>,
        test: &str,
        leftovers: Leftovers,
        settings: impl FnOnce(&str, &Path) -> String,
    ) -> DriverSetup {
        let dir = tempfile::tempdir().expect("temp dir");
        let runner = format!("{test}-{}", std::process::id());
        let text = settings(&runner, &dir.path().join("state"));
        let setup = DriverSetup {
            dir,
            runner,
            driver: driver.into(),
            leftovers,
        };
        std::fs::write(setup.settings(), text).expect("settings");
        setup
    }

    /// The `state_dir` its settings were made with.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// What this setup's runner has left on the backend.
    pub fn leftovers(&self) -> Vec<String> {
        (self.leftovers)(&self.runner)
    }

    /// Sets the setting `key` (dotted for a table's key, e.g. `driver.idle_count`) to `value`
    /// in the settings file, as an operator editing it would.
    pub fn set(&self, key: &str, value: impl Into<toml::Value>) {
        let text = std::fs::read_to_string(self.settings()).expect("settings");
        let mut settings: toml::Table = text.parse().expect("the settings are TOML");
        let mut tables: Vec<&str> = key.split('.').collect();
        let last = tables.pop().unwrap_or(key);
        let mut table = &mut settings;
        for name in tables {
            table = table
                .entry(name)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{name} is not a table in the settings"));
        }
        table.insert(last.to_owned(), value.into());
        std::fs::write(self.settings(), settings.to_string()).expect("settings");
    }

    /// Prepares job 99001 of project 5 as the runner would and never cleans it up, as after a
    /// runner crash. Its timeout is 1 s and this sets the settings' `gc_grace_secs` to 0, so
    /// the job expires a second later: this returns once `gc --dry-run` sees it (at most 10 s).
    pub fn abandon_an_expired_job(&self) {
        self.set("gc_grace_secs", 0);
        let prepare = self.stage(
            r#"{"id": 99001, "token": "t", "job_info": {"project_id": 5}, "runner_info": {"timeout": 1}, "variables": []}"#,
            &["prepare"],
        );
        let stderr = String::from_utf8_lossy(&prepare.stderr);
        assert!(prepare.status.success(), "{stderr}");
        assert!(
            !self.leftovers().is_empty(),
            "prepare made nothing: {stderr}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let dry = self.driver(&["gc", "--dry-run"]);
            // Drivers name what they would remove differently (`job 99001`, an instance
            // `…-j99001`): any line about this job will do.
            let text = String::from_utf8_lossy(&dry.stdout);
            if text
                .lines()
                .any(|line| line.starts_with("would remove") && line.contains("99001"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "job 99001 did not expire within 10 s: {}",
                String::from_utf8_lossy(&dry.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `gc --dry-run`, which must name `expired` and remove nothing, then `gc`, which must
    /// leave nothing of this runner.
    pub fn expect_gc_removes(&self, expired: &str) {
        let before = self.leftovers();
        let dry = self.driver(&["gc", "--dry-run"]);
        let text = String::from_utf8_lossy(&dry.stdout);
        assert!(text.contains(&format!("would remove {expired}")), "{text}");
        assert_eq!(self.leftovers(), before, "a dry run removed something");
        let gc = self.driver(&["gc"]);
        let text = String::from_utf8_lossy(&gc.stderr);
        assert!(gc.status.success(), "{text}");
        assert_eq!(self.leftovers(), Vec::<String>::new());
    }

    /// The settings file.
    pub fn settings(&self) -> PathBuf {
        self.dir.path().join("driver.toml")
    }

    /// `drover ARGS --driver DRIVER --driver-arg --config --driver-arg SETTINGS`.
    pub fn drover_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(drover_cli(&self.driver));
        command
            .args(args)
            .arg("--driver")
            .arg(&self.driver)
            .args(["--driver-arg", "--config", "--driver-arg"])
            .arg(self.settings());
        command
    }

    /// Runs `drover ARGS` with this driver; whether it succeeded, and its stdout.
    pub fn drover(&self, args: &[&str]) -> (bool, String) {
        let output = self.drover_command(args).output().expect("drover runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }

    /// `drover run-job` of the job file `yaml`, with the emulated runner unless `runner` names
    /// another (e.g. `["--runner", "real", "--gitlab-runner", PATH]`).
    pub fn run_job_command(&self, yaml: &str, runner: &[&str]) -> Command {
        // A file per call: jobs of one setup may run at once, and one must never read
        // another's half-written file.
        let job = tempfile::Builder::new()
            .prefix("job-")
            .suffix(".yml")
            .tempfile_in(self.dir.path())
            .expect("job file");
        std::fs::write(job.path(), yaml).expect("job file");
        let (_, job) = job.keep().expect("job file");
        let job = job.to_string_lossy().into_owned();
        let mut args = vec!["run-job", job.as_str()];
        args.extend(if runner.is_empty() {
            &["--runner", "emulated"][..]
        } else {
            runner
        });
        self.drover_command(&args)
    }

    /// Runs [`Self::run_job_command`]; whether the jobs succeeded, and the job log (with
    /// drover's own stderr after it when it failed, so a failure always says why).
    pub fn run_job(&self, yaml: &str, runner: &[&str]) -> (bool, String) {
        let output = self
            .run_job_command(yaml, runner)
            .output()
            .expect("drover runs");
        let mut log = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            log.push_str(&String::from_utf8_lossy(&output.stderr));
        }
        (output.status.success(), log)
    }

    /// Runs a long job through `drover run-job`, presses Ctrl-C (SIGINT to drover) once the
    /// script is under way, and returns the whole log.
    pub fn run_and_interrupt(&self, runner: &[&str]) -> String {
        use std::io::{BufRead, BufReader};
        let mut child = self
            .run_job_command(
                "long:\n  script:\n    - for i in $(seq 1 600); do echo tick $i; sleep 0.5; done\n  after_script:\n    - echo after_script ran\n",
                runner,
            )
            .stdout(Stdio::piped())
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
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let mut log = String::new();
        let mut interrupted = false;
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Ok(line) =
            received.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if !interrupted && line.contains("tick 3") {
                kill(pid, Signal::SIGINT).expect("SIGINT");
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

    /// Runs the pipeline `yaml` with this driver through `mode` against `coordinator`, bounded
    /// by `bound`; every job must succeed. Returns their logs, one after the other.
    pub async fn expect_pipeline_succeeds(
        &self,
        yaml: &str,
        mode: &drover_harness::pipeline::RunnerMode,
        coordinator: &drover_harness::Coordinator,
        bound: Duration,
    ) -> String {
        use drover_harness::pipeline::{PipelineOutcome, run_pipeline};
        use drover_harness::{CancelHandle, Driver, Hooks, JobResult, job::JobFile};
        let file = JobFile::parse(yaml).expect("job file");
        let jobs = file.jobs_in_stage_order();
        let driver = Driver::new(&self.driver)
            .arg("--config")
            .arg(self.settings());
        let (hooks, cancel) = (Hooks::default(), CancelHandle::new());
        let pipeline = run_pipeline(
            &file,
            &jobs,
            &driver,
            mode,
            coordinator,
            None,
            &hooks,
            &cancel,
        );
        let outcome = tokio::time::timeout(bound, pipeline)
            .await
            .expect("the pipeline finished in time");
        let mut logs = String::new();
        for job in &outcome {
            let log = match &job.outcome {
                PipelineOutcome::Finished(report) => report.log_text().into_owned(),
                other => format!("{other:?}"),
            };
            assert_eq!(
                job.result(),
                Some(&JobResult::Success),
                "{}: {log}",
                job.name
            );
            logs += &log;
        }
        logs
    }

    /// Calls the driver's stage `args` (e.g. `["prepare"]`) as the runner would, for the job
    /// whose `JOB_RESPONSE_FILE` is `response`.
    pub fn stage(&self, response: &str, args: &[&str]) -> Output {
        self.stage_with(response, args, &[])
    }

    /// [`Self::stage`] with more of the runner's variables, e.g. `CUSTOM_ENV_CI_JOB_SERVICES`.
    pub fn stage_with(&self, response: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let tmp = self.dir.path().join("custom-executor1");
        std::fs::create_dir_all(&tmp).expect("tmp");
        std::fs::write(tmp.join("response.json"), response).expect("response");
        as_runner_calls(&mut self.driver_command(args), &tmp)
            .envs(env.iter().copied())
            .output()
            .expect("driver runs")
    }

    /// Runs `script` as stage `build_script` of the job whose `JOB_RESPONSE_FILE` is
    /// `response`; the driver's exit code and what it wrote (stdout, then stderr).
    pub fn run_script(&self, response: &str, script: &str) -> (Option<i32>, String) {
        let path = self.dir.path().join("script");
        std::fs::write(&path, script).expect("script");
        let run = self.stage(response, &["run", &path.to_string_lossy(), "build_script"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        (run.status.code(), text)
    }

    /// Runs `DRIVER --config SETTINGS ARGS`, e.g. `gc` or `doctor`.
    pub fn driver(&self, args: &[&str]) -> Output {
        self.driver_command(args).output().expect("driver runs")
    }

    /// Asserts that `gc` and `doctor`, stuck on `backend` (this setup's socket, which never
    /// answers), stop within 3 s of SIGTERM with a system failure that says they were
    /// interrupted.
    pub fn expect_maintenance_stops_on_sigterm(&self, backend: &HungSocket) {
        for command in ["gc", "doctor"] {
            let (output, took) = self.interrupted(&[command], backend);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
            assert!(
                stderr.contains(&format!("{command} was interrupted")),
                "{command}: {stderr}"
            );
            assert!(took < Duration::from_secs(3), "{command} took {took:?}");
        }
    }

    /// Runs `DRIVER --config SETTINGS ARGS`, sends it SIGTERM once it has connected to
    /// `backend` (at most 10 s), and returns how it ended and how long it took after the signal.
    /// A driver still running 10 s after the signal is SIGKILLed and the test fails.
    fn interrupted(&self, args: &[&str], backend: &HungSocket) -> (Output, Duration) {
        let connected = backend.connections();
        let mut child = self
            .driver_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("driver runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while backend.connections() == connected {
            if Instant::now() >= deadline || child.try_wait().is_ok_and(|done| done.is_some()) {
                let _ = child.kill();
                let output = child.wait_with_output().expect("driver output");
                panic!(
                    "`{}` never called the backend: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        let signalled = Instant::now();
        let (done, waited) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait_with_output());
        });
        match waited.recv_timeout(Duration::from_secs(10)) {
            Ok(output) => (output.expect("driver output"), signalled.elapsed()),
            Err(_) => {
                let _ = kill(pid, Signal::SIGKILL);
                panic!("`{}` ignored SIGTERM for 10 s", args.join(" "));
            }
        }
    }

    fn driver_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.driver);
        command.arg("--config").arg(self.settings()).args(args);
        command
    }
}

/// A `JOB_RESPONSE_FILE` for job `job` of project `project`.
pub fn response(job: u64, project: u64) -> String {
    format!(
        r#"{{"id": {job}, "token": "t", "job_info": {{"project_id": {project}}}, "runner_info": {{"timeout": 600}}, "variables": []}}"#
    )
}

/// Gives `command` what GitLab Runner gives a custom executor's stage, for a job whose
/// directory is `job_dir` (holding `response.json`): the working directory, the exit codes,
/// `JOB_RESPONSE_FILE`, `BUILD_EXIT_CODE_FILE` and `TMPDIR` (contract §1, §3).
pub fn as_runner_calls<'a>(command: &'a mut Command, job_dir: &Path) -> &'a mut Command {
    command
        .current_dir(job_dir)
        .env("BUILD_FAILURE_EXIT_CODE", "1")
        .env("SYSTEM_FAILURE_EXIT_CODE", "2")
        .env("JOB_RESPONSE_FILE", job_dir.join("response.json"))
        .env("BUILD_EXIT_CODE_FILE", job_dir.join("build_exit_code"))
        .env("TMPDIR", job_dir)
}

/// The `drover` CLI, built beside the driver by `cargo test --workspace`.
pub fn drover_cli(driver: &Path) -> PathBuf {
    let path = driver.with_file_name("drover");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p drover` first)",
        path.display()
    );
    path
}

/// A unix socket that accepts every connection and never answers: a backend that hangs. It
/// lives as long as the process.
pub struct HungSocket {
    accepted: Arc<AtomicUsize>,
}

impl HungSocket {
    /// Listens at `path`.
    pub fn bind(path: &Path) -> HungSocket {
        let listener = std::os::unix::net::UnixListener::bind(path).expect("bind a test socket");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        HungSocket { accepted }
    }

    /// How many connections it has accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Runs one stage-by-stage job of project `project` on `setup` (prepare, `script` as
/// build_script, cleanup) and returns the script's exit code and output.
pub fn job_with_script(
    setup: &DriverSetup,
    job: u64,
    project: u64,
    script: &str,
) -> (Option<i32>, String) {
    let response = response(job, project);
    let prepare = setup.stage(&response, &["prepare"]);
    assert!(
        prepare.status.success(),
        "prepare: {}",
        String::from_utf8_lossy(&prepare.stderr)
    );
    let ran = setup.run_script(&response, script);
    let cleanup = setup.stage(&response, &["cleanup"]);
    assert!(
        cleanup.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    ran
}

/// What a cache must be in every driver (the isolation issue's item 3): a job of one project
/// can neither read nor write another project's cache, nor another runner's cache of the same
/// project; a project's next job on the same runner finds its cache, and on the host the cache
/// (`<state_dir>/cache/<runner>/p<project>`) is private. `other_runner` is a setup of another
/// runner name on the same host state as `setup`.
pub fn expect_caches_per_runner_and_project(setup: &DriverSetup, other_runner: &DriverSetup) {
    let (code, log) = job_with_script(setup, 99101, 5, "echo secret-of-p5 > /cache/p5.txt\n");
    assert_eq!(code, Some(0), "{log}");
    let probe = "if [ -e /cache/p5.txt ]; then echo FOUND; cat /cache/p5.txt; fi; echo intruder > /cache/intruder.txt\n";
    let (code, log) = job_with_script(setup, 99102, 6, probe);
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !log.contains("FOUND"),
        "project 6 saw project 5's cache: {log}"
    );
    let (code, log) = job_with_script(other_runner, 99103, 5, probe);
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !log.contains("FOUND"),
        "another runner saw this runner's cache: {log}"
    );
    let (code, log) = job_with_script(
        setup,
        99104,
        5,
        "cat /cache/p5.txt; if [ -e /cache/intruder.txt ]; then echo INTRUDED; fi\n",
    );
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("secret-of-p5"),
        "the project's cache did not survive: {log}"
    );
    assert!(
        !log.contains("INTRUDED"),
        "another job wrote into this project's cache: {log}"
    );
}

/// Runs every `parts`-th case of the conformance suite from `part` on through `setup`, so that
/// `parts` tests side by side run all of them (the hostile group included), and asserts that
/// each passed and that the runner left nothing on the backend.
pub fn expect_conformance_part(setup: &DriverSetup, part: usize, parts: usize) {
    let cases: Vec<&str> = drover_harness::conformance::CASES
        .into_iter()
        .skip(part)
        .step_by(parts)
        .collect();
    let mut args = vec!["conformance"];
    for case in &cases {
        args.extend(["--case", case]);
    }
    let (ok, log) = setup.drover(&args);
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!(
            "{} passed, 0 failed, 0 not applicable",
            cases.len()
        )),
        "{log}"
    );
    for case in cases {
        assert!(log.contains(&format!("PASS {case} ")), "{log}");
    }
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}
