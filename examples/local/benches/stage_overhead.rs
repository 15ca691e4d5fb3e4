//! The core's per-stage overhead: `drover-local run <script> build_script`, started the way
//! GitLab Runner starts it, against `bash <script>` alone, on the same no-op runner-shaped
//! script, in the same run. Prints medians and their ratio.
//!
//! `cargo bench -p drover-local` (release build). Not a test: nothing here asserts a time.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DRIVER: &str = env!("CARGO_BIN_EXE_drover-local");
const ROUNDS: usize = 300;

/// A script shaped like the runner's (§4.3), with an empty body.
const NOOP_SCRIPT: &str = "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\nset -o pipefail\nset -o errexit\nset +o noclobber\n( trap 'exit 1' TERM; eval ':' ) < /dev/null\nexit 0\n";

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tmp = dir.path();
    std::fs::write(
        tmp.join("response.json"),
        r#"{"id": 1, "job_info": {"project_id": 1}, "runner_info": {"timeout": 600}}"#,
    )
    .expect("response");
    std::fs::write(
        tmp.join("driver.toml"),
        format!("[driver]\nroot = {:?}\n", tmp.join("root")),
    )
    .expect("settings");
    let script = tmp.join("script");
    std::fs::write(&script, NOOP_SCRIPT).expect("script");

    let driver = |args: &[&str]| {
        let mut command = Command::new(DRIVER);
        command
            .arg("--config")
            .arg(tmp.join("driver.toml"))
            .args(args)
            .current_dir(tmp)
            .env("BUILD_FAILURE_EXIT_CODE", "1")
            .env("SYSTEM_FAILURE_EXIT_CODE", "2")
            .env("JOB_RESPONSE_FILE", tmp.join("response.json"))
            .env("BUILD_EXIT_CODE_FILE", tmp.join("build_exit_code"))
            .env("TMPDIR", tmp);
        command
    };
    run_ok(&mut driver(&["prepare"]));

    let script_arg = script.to_str().expect("utf-8 path");
    let bash = median(|| {
        let mut command = Command::new("bash");
        command.arg(&script);
        command
    });
    let stage = median(|| driver(&["run", script_arg, "build_script"]));
    run_ok(&mut driver(&["cleanup"]));

    println!("no-op run stage, median of {ROUNDS} rounds:");
    println!("  bash script (baseline)              {:>8.2} ms", ms(bash));
    println!(
        "  drover-local run script build_script {:>8.2} ms",
        ms(stage)
    );
    println!(
        "  ratio driver / baseline              {:>8.2}",
        stage.as_secs_f64() / bash.as_secs_f64()
    );
    println!(
        "  core overhead per stage              {:>8.2} ms",
        ms(stage.saturating_sub(bash))
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run_ok(command: &mut Command) {
    let status = command.stdin(Stdio::null()).status().expect("starts");
    assert!(status.success(), "{command:?} failed: {status}");
}

/// Alternates warm-up and measurement so both sides see the same machine state.
fn median(mut make: impl FnMut() -> Command) -> Duration {
    for _ in 0..10 {
        run_ok(&mut make());
    }
    let mut times: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let mut command = make();
            let started = Instant::now();
            run_ok(command.stdout(Stdio::null()).stderr(Stdio::null()));
            started.elapsed()
        })
        .collect();
    times.sort();
    times[ROUNDS / 2]
}
