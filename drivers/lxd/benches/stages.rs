//! drover-lxd against `benches/lxd-baseline/driver.sh`, a bash driver doing what GitLab's
//! documented LXD example driver does (`lxc launch` and a bounded wait for `lxc exec -- true`,
//! `lxc exec <instance> -- /bin/bash < script`, `lxc delete -f`), in the same run on the same
//! image: job start, per-run-stage overhead, output throughput and peak RSS (see
//! `drover_test_support::bench`).
//!
//! Needs the LXD daemon on /var/lib/lxd/unix.socket and the image alias `drover-test/debian`
//! (tests/setup/lxd.sh). Launches take seconds each, so the rounds are few. Every instance made
//! is deleted, also on failure. `cargo bench -p drover-lxd --bench stages`.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use drover_test_support::bench::{Backend, ReadyStart, Rounds, Side};

/// The job `image:` drover-lxd maps to [`ALIAS`].
const IMAGE: &str = "debian:bookworm";
/// The LXD image alias both drivers launch.
const ALIAS: &str = "drover-test/debian";
const SOCKET: &str = "/var/lib/lxd/unix.socket";
/// drover-lxd's `runner_name`, part of its instance names.
const RUNNER: &str = "bench";

fn main() -> ExitCode {
    drover_test_support::bench::main(|| {
        assert!(
            Path::new(SOCKET).exists(),
            "no LXD socket at {SOCKET}: run tests/setup/lxd.sh"
        );
        Backend {
            driver: "drover-lxd",
            drover: env!("CARGO_BIN_EXE_drover-lxd"),
            baseline: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../benches/lxd-baseline/driver.sh"),
            baseline_name: "benches/lxd-baseline/driver.sh",
            version: format!("LXD {}", lxd_version()),
            exec_client: "lxc exec",
            daemon: "the LXD daemon",
            settings: |state| settings(state, 0),
            ready_start: Some(ReadyStart {
                settings: |state| settings(state, 1),
                wait: |_| spare_made(),
                // A spare LXD is still creating refuses deletion: retried, bounded.
                remove: |_| {
                    for _ in 0..240 {
                        let left = spares();
                        if left.is_empty() {
                            return;
                        }
                        left.iter().for_each(|spare| delete(spare));
                        std::thread::sleep(std::time::Duration::from_millis(500));
                    }
                },
            }),
            force_remove: |side, id| {
                let name = match side {
                    Side::Baseline => format!("baseline-lxd-job-{id}"),
                    Side::Drover => format!("drover-{RUNNER}-p1-j{id}"),
                };
                delete(&name);
            },
            // The cache is a directory in the state dir, which goes with the bench's temp dir.
            remove_kept: || {},
            rounds: Rounds {
                start: 5,
                stage_warmup: 5,
                stage: 30,
                output: 3,
            },
        }
    })
}

/// drover-lxd's settings, keeping `idle_count` instances ready.
fn settings(state: &Path, idle_count: usize) -> String {
    format!(
        "runner_name = {RUNNER:?}\n[driver]\nstate_dir = {state:?}\nidle_count = {idle_count}\n[driver.images]\n{IMAGE:?} = {ALIAS:?}\n[policy]\ndefault_image = {IMAGE:?}\n"
    )
}

/// The ready instances ("spares") of the bench's runner.
fn spares() -> Vec<String> {
    let output = Command::new("lxc")
        .args(["list", "--format", "csv", "-c", "n"])
        .arg(format!("user.drover.runner={RUNNER}"))
        .stdin(Stdio::null())
        .output()
        .expect("lxc list");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|name| name.contains("-spare-"))
        .map(str::to_owned)
        .collect()
}

/// Waits up to 120 s until a spare exists that no LXD operation works on any more.
fn spare_made() -> bool {
    (0..240).any(|_| {
        let operations = Command::new("lxc")
            .args(["query", "/1.0/operations?recursion=1"])
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let made = spares()
            .iter()
            .any(|spare| !operations.contains(&format!("/1.0/instances/{spare}\"")));
        if !made {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        made
    })
}

fn delete(instance: &str) {
    let _ = Command::new("lxc")
        .args(["delete", "-f", instance])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn lxd_version() -> String {
    Command::new("lxc")
        .args(["query", "/1.0"])
        .output()
        .ok()
        .and_then(|output| serde_json::from_slice::<serde_json::Value>(&output.stdout).ok())
        .and_then(|info| {
            info["environment"]["server_version"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}
