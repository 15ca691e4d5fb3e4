//! The `drover` binary as a user calls it. (Being an integration test of this package, it also
//! makes `cargo test --workspace` build the binary the drivers' tests run.)

use std::process::Command;

const DROVER: &str = env!("CARGO_BIN_EXE_drover");

#[test]
fn version_names_the_program() {
    let output = Command::new(DROVER)
        .arg("--version")
        .output()
        .expect("drover runs");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("drover {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_driver_that_does_not_exist_is_one_line_and_exit_code_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let job = dir.path().join("job.yml");
    std::fs::write(&job, "x:\n  script: [echo never]\n").expect("job");
    let output = Command::new(DROVER)
        .arg("run-job")
        .arg(&job)
        .args(["--driver", "/nonexistent/drover-driver"])
        .output()
        .expect("drover runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/drover-driver"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("never"));
}
