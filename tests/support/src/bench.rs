//! The drivers' benchmark: a drover driver against a bash baseline driver on the same backend,
//! measured in the same run. Both are started the way GitLab Runner starts a custom-executor
//! driver, round by round in alternation, and compared on:
//!
//! 1. job start latency (prepare; cleanup after each, timed too);
//! 2. per-run-stage overhead on a runner-shaped no-op script, above `bash <script>` on the host;
//! 3. throughput of 100 MB of job output, read from the driver's stdout and counted;
//! 4. peak RSS during that run, from `getrusage(RUSAGE_CHILDREN)` in a fresh process of the
//!    bench that has the driver as its only child (for the baseline this is the largest of
//!    `bash driver.sh` and the backend client it runs; for drover, the driver alone).
//!
//! A driver's bench is a `harness = false` bench whose `main` is [`main`] with its [`Backend`].
//! Nothing here asserts a time: the figures are printed as a table of medians and ratios.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};

use crate::setup::as_runner_calls;

/// Bytes of job output the throughput rounds produce.
const OUTPUT_BYTES: u64 = 100_000_000;
/// Reads of the driver's stdout per measured run, at least one byte each: a bound, not a target.
const MAX_READS: u64 = 4 * OUTPUT_BYTES;
/// The project of every job.
const PROJECT_ID: u64 = 1;

/// A script shaped like the runner's, with an empty body (as in examples/local's bench).
const NOOP_SCRIPT: &str = "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\nset -o pipefail\nset -o errexit\nset +o noclobber\n( trap 'exit 1' TERM; eval ':' ) < /dev/null\nexit 0\n";

/// The argument that turns the bench binary into the measuring parent of one driver process.
const MEASURE: &str = "__measure-child";

/// What a driver's bench measures.
pub struct Backend {
    /// The driver's name, e.g. `drover-lxd`.
    pub driver: &'static str,
    /// The driver binary (`env!("CARGO_BIN_EXE_...")`).
    pub drover: &'static str,
    /// The baseline driver script.
    pub baseline: PathBuf,
    /// The baseline's name in the table, e.g. `benches/lxd-baseline/driver.sh`.
    pub baseline_name: &'static str,
    /// The backend and its version, e.g. `LXD 5.0.2`.
    pub version: String,
    /// The client the baseline runs per stage, e.g. `lxc exec`.
    pub exec_client: &'static str,
    /// What serves the API, whose memory is not counted, e.g. `the LXD daemon`.
    pub daemon: &'static str,
    /// The driver's settings file, given its `state_dir`.
    pub settings: fn(state_dir: &Path) -> String,
    /// Removes what a job of `side` left, whatever its cleanup did (run when a job is still
    /// there as the bench ends, e.g. after a failure).
    pub force_remove: fn(side: Side, job_id: u64),
    /// Removes what jobs keep for later jobs (e.g. a project's cache disk), once the bench is
    /// over, also after a failure.
    pub remove_kept: fn(),
    /// How many rounds of each measurement.
    pub rounds: Rounds,
    /// A driver that keeps instances ready for later jobs: its job start from one is measured
    /// too (against the same baseline).
    pub ready_start: Option<ReadyStart>,
}

/// How to measure a job start from an instance kept ready.
pub struct ReadyStart {
    /// The driver's settings with the pool of ready instances on, given its `state_dir`.
    pub settings: fn(state_dir: &Path) -> String,
    /// Waits, bounded, until an instance is ready; false when none came. Given the driver's
    /// `state_dir`.
    pub wait: fn(state_dir: &Path) -> bool,
    /// Removes the instances kept ready, also after a failure; given the driver's `state_dir`,
    /// which still exists then.
    pub remove: fn(state_dir: &Path),
}

/// Runs its function when dropped: on the way out of a scope, also when a panic unwinds it.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Rounds per measurement: backends whose jobs start in seconds get fewer.
pub struct Rounds {
    /// Job start (prepare then cleanup).
    pub start: usize,
    /// Unmeasured no-op stages first.
    pub stage_warmup: usize,
    /// Measured no-op stages.
    pub stage: usize,
    /// Measured 100 MB outputs.
    pub output: usize,
}

/// Which driver a measurement is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The bash baseline.
    Baseline,
    /// The drover driver.
    Drover,
}

impl Side {
    /// Round `i`'s order: alternated so neither driver always runs first.
    fn order(round: usize) -> [Side; 2] {
        if round % 2 == 0 {
            [Side::Baseline, Side::Drover]
        } else {
            [Side::Drover, Side::Baseline]
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Baseline => 0,
            Side::Drover => 1,
        }
    }
}

/// The bench's temp dir and the jobs it has prepared; dropping it removes every job left.
struct Bench<'a> {
    backend: &'a Backend,
    tmp: tempfile::TempDir,
    settings: PathBuf,
    next_id: u64,
    live: Vec<(Side, u64)>,
}

impl Bench<'_> {
    fn new(backend: &Backend, settings_text: fn(&Path) -> String) -> Bench<'_> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let settings = tmp.path().join("driver.toml");
        std::fs::write(&settings, settings_text(&Bench::state_dir_in(tmp.path())))
            .expect("settings");
        // Exactly `OUTPUT_BYTES` of line-shaped output (no pipefail: `yes` ends on SIGPIPE).
        let output = format!(
            "#!/usr/bin/env bash\n\nset -o errexit\nyes '{} bench: one line of job output' | head -c {OUTPUT_BYTES}\n",
            backend.driver
        );
        for (name, body) in [("noop.sh", NOOP_SCRIPT), ("output.sh", &output)] {
            std::fs::write(tmp.path().join(name), body).expect("script");
        }
        Bench {
            backend,
            // Job ids unlikely to meet another bench's on the same backend.
            next_id: 900_000_000 + u64::from(std::process::id()) * 1000,
            tmp,
            settings,
            live: Vec::new(),
        }
    }

    /// The drover driver's `state_dir` in a bench's temp dir `tmp`.
    fn state_dir_in(tmp: &Path) -> PathBuf {
        tmp.join("state")
    }

    fn script(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn job_dir(&self, id: u64) -> PathBuf {
        self.tmp.path().join(format!("job-{id}"))
    }

    /// `driver <args>` with the cwd and environment GitLab Runner gives a custom executor.
    fn command(&self, driver: Side, id: u64, args: &[&OsStr]) -> Command {
        let mut command = match driver {
            Side::Baseline => Command::new(&self.backend.baseline),
            Side::Drover => {
                let mut command = Command::new(self.backend.drover);
                command.arg("--config").arg(&self.settings);
                command
            }
        };
        as_runner_calls(command.args(args), &self.job_dir(id))
            .env("CUSTOM_ENV_CI_JOB_ID", id.to_string())
            .env("CUSTOM_ENV_CI_PROJECT_ID", PROJECT_ID.to_string())
            .stdin(Stdio::null());
        command
    }

    /// A fresh job for `driver`, prepared; returns its id, the time prepare took and the
    /// driver's own account of it (see [`ready_line`]).
    fn prepare(&mut self, driver: Side) -> (u64, Duration, Option<String>) {
        let id = self.next_id;
        self.next_id += 1;
        let dir = self.job_dir(id);
        std::fs::create_dir_all(&dir).expect("job dir");
        std::fs::write(
            dir.join("response.json"),
            format!(
                r#"{{"id": {id}, "token": "t", "job_info": {{"project_id": {PROJECT_ID}}}, "runner_info": {{"timeout": 600}}, "variables": []}}"#
            ),
        )
        .expect("response");
        // Recorded before it runs: a prepare that fails half-way still gets cleaned up.
        self.live.push((driver, id));
        let started = Instant::now();
        let output = run_ok(&mut self.command(driver, id, &["prepare".as_ref()]));
        (id, started.elapsed(), ready_line(&output.stderr))
    }

    fn cleanup(&mut self, driver: Side, id: u64) -> Duration {
        let started = Instant::now();
        run_ok(&mut self.command(driver, id, &["cleanup".as_ref()]));
        let took = started.elapsed();
        self.live.retain(|&job| job != (driver, id));
        took
    }

    fn run_stage(&self, driver: Side, id: u64, script: &Path) -> Duration {
        let mut command = self.command(
            driver,
            id,
            &["run".as_ref(), script.as_os_str(), "build_script".as_ref()],
        );
        let started = Instant::now();
        run_ok(&mut command);
        started.elapsed()
    }
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        for (driver, id) in std::mem::take(&mut self.live) {
            (self.backend.force_remove)(driver, id);
            match self.command(driver, id, &["cleanup".as_ref()]).output() {
                Ok(output) if output.status.success() => {}
                Ok(output) => eprintln!(
                    "warning: removing {driver:?} job {id}: {}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                ),
                Err(error) => eprintln!("warning: removing {driver:?} job {id}: {error}"),
            }
        }
    }
}

/// The bench binary's `main`: measures and prints the table, or, when started by itself with
/// `MEASURE`, measures one driver process. `backend` is only asked for in the first case
/// (checking the backend there, not in every measuring process).
pub fn main(backend: impl FnOnce() -> Backend) -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|arg| arg == MEASURE) {
        return measure_child(&args[1..]);
    }
    let backend = backend();
    // Declared first, so dropped last: after every job is removed.
    let _kept = OnDrop(backend.remove_kept);
    let mut bench = Bench::new(&backend, backend.settings);

    // 1. Job start latency, each job cleaned up before the next.
    let mut start: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut stop: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut start_lines = Vec::new();
    for round in 0..backend.rounds.start {
        for driver in Side::order(round) {
            let (id, took, line) = bench.prepare(driver);
            start[driver.index()].push(took);
            if driver == Side::Drover {
                start_lines.push((took, line));
            }
            stop[driver.index()].push(bench.cleanup(driver, id));
        }
    }
    eprintln!("job start: done");
    let ready_start = backend.ready_start.as_ref().map(|ready| {
        let mut warm = Bench::new(&backend, ready.settings);
        let state_dir = Bench::state_dir_in(warm.tmp.path());
        // Dropped before `warm`, whose temp dir holds the state dir.
        let remove = OnDrop(|| (ready.remove)(&state_dir));
        // The first job has no instance ready; it asks for the next one.
        let (id, _, _) = warm.prepare(Side::Drover);
        warm.cleanup(Side::Drover, id);
        let mut times = Vec::new();
        for _ in 0..backend.rounds.start {
            assert!((ready.wait)(&state_dir), "no instance was made ready");
            let (id, took, line) = warm.prepare(Side::Drover);
            times.push((took, line));
            warm.cleanup(Side::Drover, id);
        }
        drop(remove);
        drop(warm);
        eprintln!("job start from a ready instance: done");
        median_line(times)
    });

    // 2. Per-run-stage overhead, one prepared job each, against bash on the host.
    let jobs = [
        bench.prepare(Side::Baseline).0,
        bench.prepare(Side::Drover).0,
    ];
    let noop = bench.script("noop.sh");
    let floor_run = || {
        let started = Instant::now();
        run_ok(Command::new("bash").arg(&noop).stdin(Stdio::null()));
        started.elapsed()
    };
    for round in 0..backend.rounds.stage_warmup {
        floor_run();
        for driver in Side::order(round) {
            bench.run_stage(driver, jobs[driver.index()], &noop);
        }
    }
    let mut floor = Vec::new();
    let mut stage: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..backend.rounds.stage {
        floor.push(floor_run());
        for driver in Side::order(round) {
            stage[driver.index()].push(bench.run_stage(driver, jobs[driver.index()], &noop));
        }
    }
    eprintln!("run stage: done");

    // 3 and 4. 100 MB of job output, each run in a fresh measuring process.
    let output_script = bench.script("output.sh");
    let output_command = |bench: &Bench, driver: Side| {
        bench.command(
            driver,
            jobs[driver.index()],
            &[
                "run".as_ref(),
                output_script.as_os_str(),
                "build_script".as_ref(),
            ],
        )
    };
    let mut host_floor = Command::new("bash");
    host_floor.arg(&output_script);
    let mut output: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let mut output_floor = Vec::new();
    // One unmeasured round each first.
    for driver in Side::order(0) {
        measured(&output_command(&bench, driver));
    }
    for round in 0..backend.rounds.output {
        output_floor.push(measured(&host_floor));
        for driver in Side::order(round) {
            let sample = measured(&output_command(&bench, driver));
            assert_eq!(
                sample.stdout_bytes, OUTPUT_BYTES,
                "{driver:?}: {sample:?}: not all of the output arrived on stdout"
            );
            output[driver.index()].push(sample);
        }
    }
    for driver in [Side::Baseline, Side::Drover] {
        bench.cleanup(driver, jobs[driver.index()]);
    }
    eprintln!("output: done");

    drop(bench);

    // The table.
    let start_ms = start.map(|times| ms(median(times)));
    let stop_ms = stop.map(|times| ms(median(times)));
    let floor_ms = ms(median(floor));
    let stage_ms = stage.map(|times| ms(median(times)));
    let overhead_ms = stage_ms.map(|stage| stage - floor_ms);
    let throughput = output
        .clone()
        .map(|samples| mb_per_s(median(samples.iter().map(|s| s.elapsed).collect())));
    let floor_throughput = mb_per_s(median(output_floor.iter().map(|s| s.elapsed).collect()));
    let rss_mib = output
        .clone()
        .map(|samples| samples.iter().map(|s| s.max_rss_kib).max().unwrap_or(0) as f64 / 1024.0);
    let stderr_bytes = output.map(|samples| samples.iter().map(|s| s.stderr_bytes).max());

    println!();
    println!(
        "{} vs {} ({}), one run, alternating",
        backend.driver, backend.baseline_name, backend.version
    );
    println!();
    let row = |metric: &str, unit: &str, values: [f64; 2]| {
        println!(
            "| {metric:<44} | {:>10.2} {unit:<4} | {:>10.2} {unit:<4} | {:>6.2} |",
            values[0],
            values[1],
            values[1] / values[0]
        );
    };
    println!(
        "| {:<44} | {:>15} | {:>15} | {:>6} |",
        "metric", "baseline", "drover", "ratio"
    );
    println!("|{:-<46}|{:-<17}|{:-<17}|{:-<8}|", "", "", "", "");
    row(
        &format!("job start: prepare, median of {}", backend.rounds.start),
        "ms",
        start_ms,
    );
    if let Some((ready_ms, _)) = ready_start {
        row(
            &format!(
                "  from a ready instance, median of {}",
                backend.rounds.start
            ),
            "ms",
            [start_ms[0], ready_ms],
        );
    }
    row(
        &format!("job end: cleanup, median of {}", backend.rounds.start),
        "ms",
        stop_ms,
    );
    row(
        &format!("no-op run stage, median of {}", backend.rounds.stage),
        "ms",
        stage_ms,
    );
    row(
        &format!("  overhead above host bash ({floor_ms:.2} ms)"),
        "ms",
        overhead_ms,
    );
    row(
        &format!("100 MB job output, median of {}", backend.rounds.output),
        "MB/s",
        throughput,
    );
    row("peak RSS during the 100 MB run (max)", "MiB", rss_mib);
    println!();
    println!(
        "host floors: `bash noop.sh` {floor_ms:.2} ms; `bash output.sh` to a pipe {floor_throughput:.0} MB/s"
    );
    println!(
        "peak RSS: baseline = largest of `bash driver.sh` and its `{}` client; drover = {} ({}'s own memory is not counted)",
        backend.exec_client, backend.driver, backend.daemon
    );
    if let (_, Some(line)) = median_line(start_lines) {
        println!(
            "{}'s median job start, in its words: {line}",
            backend.driver
        );
    }
    if let Some((_, Some(line))) = &ready_start {
        println!("  and from a ready instance: {line}");
    }
    println!(
        "stderr bytes during the 100 MB run (max): baseline {:?}, drover {:?}",
        stderr_bytes[0], stderr_bytes[1]
    );
    let stage_ratio = overhead_ms[1] / overhead_ms[0];
    let output_ratio = throughput[1] / throughput[0];
    println!(
        "targets: per-stage overhead <= 0.5 x baseline: {stage_ratio:.2} ({}); output throughput >= baseline: {output_ratio:.2} ({})",
        if stage_ratio <= 0.5 { "met" } else { "NOT met" },
        if output_ratio >= 1.0 {
            "met"
        } else {
            "NOT met"
        },
    );
    ExitCode::SUCCESS
}

fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("starts");
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// One run measured by a fresh process of this bench, which has the command as its only child.
#[derive(Debug, Clone, Copy)]
struct Sample {
    elapsed: Duration,
    stdout_bytes: u64,
    stderr_bytes: u64,
    max_rss_kib: i64,
}

/// Runs `command` under `MEASURE` (same program, arguments, cwd and environment).
fn measured(command: &Command) -> Sample {
    let mut parent = Command::new(std::env::current_exe().expect("own path"));
    parent
        .arg(MEASURE)
        .arg(command.get_program())
        .args(command.get_args())
        .stdin(Stdio::null());
    if let Some(dir) = command.get_current_dir() {
        parent.current_dir(dir);
    }
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => parent.env(key, value),
            None => parent.env_remove(key),
        };
    }
    let output = run_ok(&mut parent);
    let line = String::from_utf8(output.stdout).expect("utf-8 report");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "measuring process said {line:?}");
    let number = |i: usize| fields[i].parse::<u64>().expect("a number");
    Sample {
        elapsed: Duration::from_nanos(number(0)),
        stdout_bytes: number(1),
        stderr_bytes: number(2),
        max_rss_kib: fields[3].parse().expect("a number"),
    }
}

/// The `MEASURE` side: runs `args`, counts its stdout and stderr, waits, prints
/// `<elapsed ns> <stdout bytes> <stderr bytes> <max RSS KiB of reaped children>`, and exits
/// with the child's status.
fn measure_child(args: &[OsString]) -> ExitCode {
    let (program, rest) = args.split_first().expect("a program to measure");
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let stderr = child.stderr.take().expect("piped stderr");
    let stderr_count = std::thread::spawn(move || count(stderr));
    let stdout_bytes = count(child.stdout.take().expect("piped stdout"));
    let status = child.wait().expect("waits");
    let elapsed = started.elapsed();
    let stderr_bytes = stderr_count.join().expect("stderr reader");
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    println!(
        "{} {stdout_bytes} {stderr_bytes} {}",
        elapsed.as_nanos(),
        usage.max_rss()
    );
    if status.success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{program:?} failed: {status}");
        ExitCode::FAILURE
    }
}

fn count(mut from: impl Read) -> u64 {
    let mut buffer = vec![0u8; 1 << 16];
    let mut total = 0u64;
    for _ in 0..MAX_READS {
        match from.read(&mut buffer) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => panic!("reading the child's output: {error}"),
        }
    }
    panic!("more than {MAX_READS} reads of the child's output");
}

/// The last line of a prepare's stderr that says where its time went (drover's drivers print
/// `Ready in <seconds> s`, some with a breakdown).
fn ready_line(stderr: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|line| line.starts_with("Ready in "))
        .map(str::to_owned)
}

/// The median time in ms and the line of the run that took it.
fn median_line(mut runs: Vec<(Duration, Option<String>)>) -> (f64, Option<String>) {
    assert!(!runs.is_empty(), "no samples");
    runs.sort_by_key(|(took, _)| *took);
    let (took, line) = runs.swap_remove(runs.len() / 2);
    (ms(took), line)
}

fn median(mut times: Vec<Duration>) -> Duration {
    assert!(!times.is_empty(), "no samples");
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb_per_s(d: Duration) -> f64 {
    OUTPUT_BYTES as f64 / 1e6 / d.as_secs_f64()
}
