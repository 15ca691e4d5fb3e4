//! drover-lxd against `benches/lxd-baseline/driver.sh`, a bash driver doing what GitLab's
//! documented LXD example driver does (`lxc launch` and a bounded wait for `lxc exec -- true`,
//! `lxc exec <instance> -- /bin/bash < script`, `lxc delete -f`), in the same run on the same
//! image: job start, per-run-stage overhead, output throughput and peak RSS (see
//! `drover_harness::bench`).
//!
//! Needs the LXD daemon on /var/lib/lxd/unix.socket and the image alias `drover-test/debian`
//! (tests/setup/lxd.sh). Launches take seconds each, so the rounds are few. Every instance made
//! is deleted, also on failure. `cargo bench -p drover-lxd --bench stages`.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use drover_harness::bench::{Backend, Rounds, Side};

/// The job `image:` drover-lxd maps to [`ALIAS`].
const IMAGE: &str = "debian:bookworm";
/// The LXD image alias both drivers launch.
const ALIAS: &str = "drover-test/debian";
const SOCKET: &str = "/var/lib/lxd/unix.socket";
/// drover-lxd's `runner_name`, part of its instance names.
const RUNNER: &str = "bench";

fn main() -> ExitCode {
    drover_harness::bench::main(|| {
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
            settings: |state| {
                format!(
                    "runner_name = {RUNNER:?}\n[driver]\nstate_dir = {state:?}\n[driver.images]\n{IMAGE:?} = {ALIAS:?}\n[policy]\ndefault_image = {IMAGE:?}\n"
                )
            },
            force_remove: |side, id| {
                let name = match side {
                    Side::Baseline => format!("baseline-lxd-job-{id}"),
                    Side::Drover => format!("drover-{RUNNER}-p1-j{id}"),
                };
                let _ = Command::new("lxc")
                    .args(["delete", "-f", &name])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            },
            rounds: Rounds {
                start: 5,
                stage_warmup: 5,
                stage: 30,
                output: 3,
            },
        }
    })
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
