//! drover-lxd against a remote daemon: the same LXD, reached over HTTPS on 127.0.0.1:8443
//! (tests/setup/lxd.sh sets `core.https_address`), with a client certificate made and trusted
//! for the test and the server's certificate pinned by fingerprint. Stages then run with an exec
//! each (no shared file system) and the cache is a custom storage volume.

use std::path::Path;
use std::process::Command;

use super::{SOCKET, connected_setup, lxd};

const HTTPS_ADDRESS: &str = "127.0.0.1:8443";

/// A client certificate trusted by the daemon while this lives.
struct TrustedClient {
    dir: tempfile::TempDir,
    /// The client certificate's fingerprint, to remove the trust again.
    fingerprint: String,
}

impl TrustedClient {
    /// Makes a certificate (openssl) and trusts it (`lxc config trust add`); None, with one
    /// line saying why, when the daemon does not listen on [`HTTPS_ADDRESS`].
    fn new(test: &str) -> Option<TrustedClient> {
        let listening = Command::new("lxc")
            .args(["config", "get", "core.https_address"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == HTTPS_ADDRESS);
        let found = if listening {
            Ok(())
        } else {
            Err(format!(
                "LXD does not listen on {HTTPS_ADDRESS} (run tests/setup/lxd.sh as root)"
            ))
        };
        drover_test_support::require::backend("lxd", test, found)?;
        let client = TrustedClient::untrusted();
        run(Command::new("lxc")
            .args(["config", "trust", "add"])
            .arg(client.cert())
            .args(["--name", "drover-test"]));
        Some(client)
    }

    /// A certificate the daemon does not trust.
    fn untrusted() -> TrustedClient {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join("client.crt"), dir.path().join("client.key"));
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
            ])
            .args([
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=drover-test",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let fingerprint = fingerprint_of(&cert);
        TrustedClient { dir, fingerprint }
    }

    fn cert(&self) -> std::path::PathBuf {
        self.dir.path().join("client.crt")
    }

    /// `[driver]` lines for the daemon over HTTPS, pinning `server_fingerprint`.
    fn connection(&self, server_fingerprint: &str) -> String {
        format!(
            "url = \"https://{HTTPS_ADDRESS}\"\nclient_cert = {:?}\nclient_key = {:?}\nserver_fingerprint = {server_fingerprint:?}",
            self.cert(),
            self.dir.path().join("client.key")
        )
    }
}

impl Drop for TrustedClient {
    fn drop(&mut self) {
        let _ = Command::new("lxc")
            .args(["config", "trust", "remove", &self.fingerprint])
            .output();
    }
}

fn run(command: &mut Command) {
    let output = command.output().expect("command runs");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// SHA-256 of a PEM certificate's DER form, in hex.
fn fingerprint_of(cert: &Path) -> String {
    let output = Command::new("sh")
        .arg("-c")
        .arg("openssl x509 -in \"$0\" -outform der | sha256sum")
        .arg(cert)
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The daemon's certificate fingerprint, asked over the local socket.
fn server_fingerprint() -> String {
    let output = Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "5",
            "--unix-socket",
            SOCKET,
            "http://lxd/1.0",
        ])
        .output()
        .expect("curl");
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("LXD answers JSON");
    info["metadata"]["environment"]["certificate_fingerprint"]
        .as_str()
        .expect("the daemon has a certificate")
        .to_owned()
}

#[test]
fn over_https_jobs_run_with_exec_stages_and_leave_nothing_behind() {
    let test = "over_https_jobs_run_with_exec_stages_and_leave_nothing_behind";
    if !lxd(test) {
        return;
    }
    let Some(client) = TrustedClient::new(test) else {
        return;
    };
    let setup = connected_setup("https", &client.connection(&server_fingerprint()), "");
    let mut args = vec!["conformance"];
    for case in [
        "success",
        "script-exit-3",
        "after-script-after-failure",
        "cancel-during-script",
        "non-utf8-output",
    ]
    .into_iter()
    .chain(drover_harness::conformance::HOSTILE)
    {
        args.extend(["--case", case]);
    }
    let (ok, log) = setup.drover(&args);
    assert!(ok, "{log}");
    assert!(log.contains("8 passed, 0 failed"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
    // A remote daemon cannot see this host's files: no stage directory was made.
    assert!(
        !setup.dir.path().join("state/io").exists(),
        "a stage directory was made for a remote daemon"
    );
}

#[test]
fn over_https_the_cache_is_a_volume_that_outlives_the_instances() {
    let test = "over_https_the_cache_is_a_volume_that_outlives_the_instances";
    if !lxd(test) {
        return;
    }
    let Some(client) = TrustedClient::new(test) else {
        return;
    };
    let stand_in =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/harness/stand-in/gitlab-runner");
    let setup = connected_setup(
        "httpscache",
        &client.connection(&server_fingerprint()),
        &format!("gitlab_runner_binary = {stand_in:?}"),
    );
    let volume = format!("drover-{}-p42-cache", setup.runner);
    let yaml = "stages: [build, test]\n\
        build:\n  stage: build\n  script: [mkdir -p vendor, echo \"kept by job $CI_JOB_ID\" > vendor/deps.txt]\n  cache: {key: deps, paths: [vendor/]}\n\
        test:\n  stage: test\n  script: [cat vendor/deps.txt]\n  cache: {key: deps, paths: [vendor/]}\n";
    let (ok, log) = setup.run_job(yaml, &[]);
    let volumes = Command::new("lxc")
        .args([
            "storage", "volume", "list", "default", "--format", "csv", "-c", "n",
        ])
        .output()
        .expect("lxc storage volume list");
    let volumes = String::from_utf8_lossy(&volumes.stdout).into_owned();
    let _ = Command::new("lxc")
        .args(["storage", "volume", "delete", "default", &volume])
        .output();
    assert!(ok, "{log}");
    assert!(
        log.contains("kept by job"),
        "the cache was not restored: {log}"
    );
    assert!(
        !log.contains("Preparation failed"),
        "prepare had to be retried: {log}"
    );
    assert!(
        volumes.lines().any(|v| v == volume),
        "no volume {volume}: {volumes}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_wrong_server_fingerprint_or_an_untrusted_client_is_a_clear_system_failure() {
    let test = "a_wrong_server_fingerprint_or_an_untrusted_client_is_a_clear_system_failure";
    if !lxd(test) {
        return;
    }
    let Some(client) = TrustedClient::new(test) else {
        return;
    };
    let wrong = "ab".repeat(32);
    let setup = connected_setup("pinned", &client.connection(&wrong), "");
    let (ok, log) = setup.run_job("x:\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(
        log.contains(&format!(
            "the server's certificate has fingerprint {}, not the pinned server_fingerprint {wrong}",
            server_fingerprint()
        )),
        "{log}"
    );
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert!(!log.contains("never\n"), "{log}");

    let stranger = TrustedClient::untrusted();
    let setup = connected_setup("untrusted", &stranger.connection(&server_fingerprint()), "");
    let (ok, log) = setup.run_job("x:\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(log.contains("does not trust client_cert"), "{log}");
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}
