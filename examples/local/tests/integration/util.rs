//! Shared by the integration tests: the driver under test, its settings, and the `drover` CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const DRIVER: &str = env!("CARGO_BIN_EXE_drover-local");

/// The `drover` CLI, built beside this driver by `cargo test --workspace`.
pub fn drover() -> PathBuf {
    drover_test_support::setup::drover_cli(Path::new(DRIVER))
}

pub struct Settings {
    pub dir: tempfile::TempDir,
}

impl Settings {
    /// Settings with `extra` in the `[driver]` table.
    pub fn new(extra: &str) -> Settings {
        Settings::with("", extra)
    }

    /// Settings with `top` before the `[driver]` table (e.g. `builds_dir`) and `extra` in it.
    pub fn with(top: &str, extra: &str) -> Settings {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "{top}[driver]\nroot = {:?}\n{extra}",
            dir.path().join("root")
        );
        std::fs::write(dir.path().join("local.toml"), text).expect("settings");
        Settings { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("local.toml")
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn driver(&self, args: &[&str]) -> Output {
        Command::new(DRIVER)
            .arg("--config")
            .arg(self.path())
            .args(args)
            .output()
            .expect("driver runs")
    }
}

pub fn run_job(settings: &Settings, job_yaml: &str) -> Output {
    let job = settings.dir.path().join("job.yml");
    std::fs::write(&job, job_yaml).expect("job file");
    Command::new(drover())
        .arg("run-job")
        .arg(&job)
        .arg("--driver")
        .arg(DRIVER)
        .args(["--driver-arg", "--config", "--driver-arg"])
        .arg(settings.path())
        .output()
        .expect("drover runs")
}

/// A number for `sleep` that no other test or process uses: a job's processes are found by it.
pub fn unique_sleep() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Fixed widths, so no marker is a prefix of another.
    format!("300.{:07}{n:03}", std::process::id())
}

/// The processes whose command line holds `needle`, once they are gone or after `bound`.
pub fn processes_left(needle: &str, bound: Duration) -> Vec<String> {
    let deadline = Instant::now() + bound;
    loop {
        let left = processes_with(needle);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(needle)
        {
            found.push(pid);
        }
    }
    found
}
