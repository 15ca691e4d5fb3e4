//! The channel against its agent run on this host, under each `sh` an image may have: the
//! "environment" is a process tree here, and the exec a local `sh`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use super::*;

/// Runs commands on this host with `PATH` first searching `bin` (where `sh` may be busybox).
struct LocalExec {
    path: String,
}

impl LocalExec {
    fn new(bin: Option<&Path>) -> LocalExec {
        let system = std::env::var("PATH").unwrap_or_default();
        LocalExec {
            path: match bin {
                Some(bin) => format!("{}:{system}", bin.display()),
                None => system,
            },
        }
    }
}

impl Exec for LocalExec {
    fn describe(&self) -> String {
        "the test host".into()
    }

    async fn exec(&self, argv: &[String], stdin: Bytes) -> Result<Output<'_>> {
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("PATH", &self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .spawn()
            .map_err(|err| Error::system(err.to_string()))?;
        let mut input = child.stdin.take().expect("stdin");
        input
            .write_all(&stdin)
            .await
            .map_err(|err| Error::system(err.to_string()))?;
        drop(input);
        let out = ReaderStream::new(child.stdout.take().expect("stdout")).map(|bytes| {
            bytes.map(|bytes| Chunk {
                stream: Stream::Stdout,
                bytes,
            })
        });
        let err = ReaderStream::new(child.stderr.take().expect("stderr")).map(|bytes| {
            bytes.map(|bytes| Chunk {
                stream: Stream::Stderr,
                bytes,
            })
        });
        // The child is reaped by tokio's orphan handling once it exits.
        drop(child);
        Ok(Box::pin(futures_util::stream::select(out, err)))
    }
}

/// The `sh`s to run the agent under: the system's (dash on Debian), bash, and busybox's ash
/// when a busybox binary is at hand (tests/setup caches one).
fn shells(tmp: &Path) -> Vec<(String, Option<PathBuf>)> {
    let mut shells = vec![("system sh".to_owned(), None)];
    let bash_bin = tmp.join("bash-bin");
    std::fs::create_dir_all(&bash_bin).expect("dir");
    std::os::unix::fs::symlink("/bin/bash", bash_bin.join("sh")).expect("symlink");
    shells.push(("bash".into(), Some(bash_bin)));
    let busybox = std::env::var_os("DROVER_TEST_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/drover/busybox"));
    if busybox.is_file() {
        let bin = tmp.join("busybox-bin");
        std::fs::create_dir_all(&bin).expect("dir");
        for applet in ["sh", "setsid", "cat", "rm", "sleep", "kill"] {
            std::os::unix::fs::symlink(&busybox, bin.join(applet)).expect("symlink");
        }
        shells.push(("busybox".into(), Some(bin)));
    } else {
        eprintln!(
            "note: no busybox at {} (tests/setup/podman.sh leaves one): the agent is tested under dash and bash only",
            busybox.display()
        );
    }
    shells
}

async fn run_captured(
    transport: &impl Transport,
    script: &str,
    cancel: &CancellationToken,
) -> Result<i32> {
    run_stage(transport, script.as_bytes(), cancel).await
}

fn alive(pattern: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn gone_within(pattern: &str, bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while alive(pattern) {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// A channel directory at `path` for an agent on this host, which sees the directory at
/// its host path (its "mount"). The agent serving it is stopped when this goes.
struct TestChannel {
    path: PathBuf,
    mount: String,
}

impl TestChannel {
    fn create(path: PathBuf) -> (TestChannel, ChannelDir) {
        let dir = ChannelDir::create(&path).expect("channel dir");
        let mount = path.to_string_lossy().into_owned();
        (TestChannel { path, mount }, dir)
    }

    /// The command line of the agent serving this directory, as `pgrep -f` matches it.
    fn agent(&self) -> String {
        format!("{AGENT_NAME} serve {}", self.mount)
    }

    fn stop_agent(&self) {
        let _ = std::process::Command::new("pkill")
            .args(["-f", &self.agent()])
            .status();
    }
}

impl Drop for TestChannel {
    fn drop(&mut self) {
        self.stop_agent();
    }
}

#[tokio::test]
async fn stages_through_the_shared_directory_under_every_sh() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, bin) in shells(tmp.path()) {
        let exec = LocalExec::new(bin.as_deref());
        let (channel, dir) =
            TestChannel::create(tmp.path().join(format!("private-{name}")).join("io"));
        let transport = SharedDir::new(dir, &channel.mount, "bash", &exec);
        assert!(!transport.listening(), "{name}: no agent yet");
        start_agent(&transport).await.expect("agent");
        let cancel = CancellationToken::new();

        let status = run_captured(
            &transport,
            "printf 'out\\377'; printf err >&2; exit 3",
            &cancel,
        )
        .await
        .expect("stage");
        assert_eq!(status, 3, "{name}");

        // A cancel stops the script's whole group, and the status still comes.
        let marker = format!("sleep 3{}", fastrand::u32(1000..9999));
        let cancel = CancellationToken::new();
        let script = format!("{marker} & {marker}");
        let stage = run_captured(&transport, &script, &cancel);
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        };
        let (status, ()) = tokio::join!(stage, canceller);
        assert!(status.is_ok(), "{name}: {status:?}");
        assert!(
            gone_within(&marker, Duration::from_secs(5)).await,
            "{name}: the script's processes outlived the cancel"
        );

        // An agent killed between stages is started again by the next stage.
        channel.stop_agent();
        assert!(gone_within(&channel.agent(), Duration::from_secs(5)).await);
        let status = run_captured(&transport, "exit 0", &CancellationToken::new())
            .await
            .expect("stage after a restart");
        assert_eq!(status, 0, "{name}");

        // Nothing of the stages is left in the directory.
        let mut entries: Vec<String> = std::fs::read_dir(&channel.path)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(entries, ["wake"], "{name}");
    }
}

#[tokio::test]
async fn a_stage_whose_agent_waiter_is_killed_fails_at_once_and_its_script_is_stopped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exec = LocalExec::new(None);
    let (channel, dir) = TestChannel::create(tmp.path().join("private").join("io"));
    let transport = SharedDir::new(dir, &channel.mount, "bash", &exec);
    start_agent(&transport).await.expect("agent");
    // The script kills its parent, the stage's waiter: no exit line can come any more, and the
    // driver must not wait for the script to say so.
    let marker = format!("sleep 5{}", fastrand::u32(1000..9999));
    let started = tokio::time::Instant::now();
    let err = run_captured(
        &transport,
        &format!("kill -9 $PPID; {marker}"),
        &CancellationToken::new(),
    )
    .await
    .expect_err("no exit status");
    assert!(err.to_string().contains("waiter was killed"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it waited for the script"
    );
    assert!(
        gone_within(&marker, Duration::from_secs(5)).await,
        "the script outlived its failed stage"
    );
}

#[tokio::test]
async fn a_line_the_job_left_unfinished_in_wake_does_not_swallow_the_next_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exec = LocalExec::new(None);
    let (channel, dir) = TestChannel::create(tmp.path().join("private").join("io"));
    let transport = SharedDir::new(dir, &channel.mount, "bash", &exec);
    start_agent(&transport).await.expect("agent");
    let mut wake = std::fs::OpenOptions::new()
        .write(true)
        .open(channel.path.join("wake"))
        .expect("wake");
    std::io::Write::write_all(&mut wake, b"run 0123 and no newline").expect("junk");
    drop(wake);
    let status = run_captured(&transport, "exit 4", &CancellationToken::new()).await;
    assert_eq!(status.expect("the stage ran"), 4);
}

#[tokio::test]
async fn a_job_that_takes_the_agents_orders_loses_one_stage_and_the_next_runs_as_an_exec() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exec = LocalExec::new(None);
    let (channel, dir) = TestChannel::create(tmp.path().join("private").join("io"));
    // The job's process reads `wake` in the agent's place (holding it open as the agent
    // does, so that it never sees an end): every order goes to it.
    let _thief = Killed(
        std::process::Command::new("sh")
            .args(["-c", "exec 3<>\"$0\"; exec cat <&3 >/dev/null"])
            .arg(channel.path.join("wake"))
            .stderr(Stdio::null())
            .spawn()
            .expect("cat"),
    );
    let transport = SharedDir::new(dir, &channel.mount, "bash", &exec);
    wait_listening(&transport, LISTEN_TIMEOUT)
        .await
        .expect("the thief reads");
    // Nothing answers: the clock may run ahead to the start timeout.
    tokio::time::pause();
    let err = run_captured(&transport, "echo never", &CancellationToken::new())
        .await
        .expect_err("the order was taken");
    tokio::time::resume();
    assert!(
        err.to_string()
            .contains("did not start the script within 30 s"),
        "{err}"
    );
    assert!(
        !channel.path.exists(),
        "the channel directory is still there"
    );
    let status = run_in(
        &exec,
        &channel.path,
        "bash",
        b"echo through an exec; exit 3\n",
        &CancellationToken::new(),
    )
    .await
    .expect("the next stage runs");
    assert_eq!(status, 3);
}

/// A child killed when the test ends, also when it fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn stages_as_one_exec_each_under_every_sh() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, bin) in shells(tmp.path()) {
        let exec = LocalExec::new(bin.as_deref());
        let transport = PerStageExec::new(&exec, "bash");
        let status = run_captured(&transport, "echo hello; exit 7", &CancellationToken::new())
            .await
            .expect("stage");
        assert_eq!(status, 7, "{name}");
        let marker = format!("sleep 4{}", fastrand::u32(1000..9999));
        let cancel = CancellationToken::new();
        let stage = run_captured(&transport, &marker, &cancel);
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        };
        let (status, ()) = tokio::join!(stage, canceller);
        assert!(status.is_ok(), "{name}: {status:?}");
        assert!(gone_within(&marker, Duration::from_secs(5)).await, "{name}");
    }
}

#[test]
fn a_directory_others_may_write_to_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("private").join("io");
    drop(ChannelDir::create(&path).expect("channel dir"));
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let err = ChannelDir::open(&path).expect_err("refused");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(
        ChannelDir::open(&tmp.path().join("none"))
            .expect("absent is fine")
            .is_none()
    );
}

#[test]
fn a_swapped_entry_is_never_followed() {
    // As if the environment could write the directory (it cannot: it is mounted read-only):
    // `wake` replaced by a symlink to a host file is refused, not written through.
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("private").join("io");
    let dir = ChannelDir::create(&path).expect("channel dir");
    let target = tmp.path().join("host-file");
    std::fs::write(&target, "precious\n").expect("target");
    std::fs::remove_file(path.join("wake")).expect("rm");
    std::os::unix::fs::symlink(&target, path.join("wake")).expect("symlink");
    assert!(dir.wake().is_err());
    assert!(!SharedDir::new(dir, "/x", "bash", &LocalExec::new(None)).listening());
    assert_eq!(
        std::fs::read_to_string(&target).expect("target"),
        "precious\n"
    );
}
