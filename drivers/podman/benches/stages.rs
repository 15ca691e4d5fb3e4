//! drover-podman against `benches/podman-baseline/driver.sh`, a bash driver doing what the
//! widely copied podman scripts do (`podman run -d`, `podman exec -i <ctr> bash < script`,
//! `podman rm -f`), in the same run on the same image: job start, per-run-stage overhead,
//! output throughput and peak RSS (see `drover_test_support::bench`).
//!
//! Needs the podman API service on /run/podman/podman.sock and the image
//! `localhost/drover-test/debian:bookworm` (tests/setup/podman.sh). Every container made is
//! removed, also on failure. `cargo bench -p drover-podman --bench stages`.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use drover_test_support::bench::{Backend, Rounds, Side};

const IMAGE: &str = "localhost/drover-test/debian:bookworm";
const SOCKET: &str = "/run/podman/podman.sock";

fn main() -> ExitCode {
    drover_test_support::bench::main(|| {
        assert!(
            Path::new(SOCKET).exists(),
            "no podman API socket at {SOCKET}: run tests/setup/podman.sh"
        );
        Backend {
            driver: "drover-podman",
            drover: env!("CARGO_BIN_EXE_drover-podman"),
            baseline: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../benches/podman-baseline/driver.sh"),
            baseline_name: "benches/podman-baseline/driver.sh",
            version: format!("podman {}", podman_version()),
            exec_client: "podman exec",
            daemon: "the API service",
            settings: |state| {
                format!(
                    "runner_name = \"bench\"\n[driver]\nsocket = {SOCKET:?}\nnetwork_mode = \"none\"\npull_policy = \"never\"\nstate_dir = {state:?}\n[policy]\ndefault_image = {IMAGE:?}\n"
                )
            },
            // The baseline's container ignores the stop signal: without `-t 0` its removal
            // waits 10 s. drover-podman's own cleanup removes its jobs.
            force_remove: |side, id| {
                if side == Side::Baseline {
                    let _ = Command::new("podman")
                        .args(["rm", "-f", "-t", "0"])
                        .arg(format!("baseline-project-1-job-{id}"))
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            },
            // The cache is a directory in the state dir, which goes with the bench's temp dir.
            remove_kept: || {},
            ready_start: None,
            rounds: Rounds {
                start: 11,
                stage_warmup: 5,
                stage: 50,
                output: 5,
            },
        }
    })
}

fn podman_version() -> String {
    Command::new("podman")
        .args(["version", "--format", "{{.Client.Version}}"])
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}
