//! One driver invocation, started and stopped the way GitLab Runner's `helpers/process` does
//! (contract §1.1, §6.1).

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::task::JoinHandle;

/// Receives a stream's bytes as they arrive.
pub(crate) type Sink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What to start.
pub(crate) struct Invocation {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// Added to the harness's own environment in order; a later duplicate wins, as with Go's
    /// `exec` (§1.1).
    pub env: Vec<(String, String)>,
    pub stdout: Sink,
    pub stderr: Sink,
}

/// The two waits of the kill sequence (§6.1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KillTimeouts {
    pub graceful: Duration,
    pub force: Duration,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallExit {
    /// It exited with this status.
    Code(i32),
    /// It was killed by this signal (Go reports exit code -1).
    Signal(i32),
    /// It could not be started (`failed to start command: ...`).
    StartFailed(String),
    /// SIGKILL did not get it reaped within force_kill_timeout, or a process that inherited
    /// its pipes kept them open: the runner gives up on it ("likely process is dormant").
    NotReaped,
}

impl CallExit {
    /// Go's text for the exit (`exit status N`, `signal: killed`).
    pub fn go_text(&self) -> String {
        match self {
            CallExit::Code(code) => format!("exit status {code}"),
            CallExit::Signal(sig) => match Signal::try_from(*sig) {
                Ok(Signal::SIGKILL) => "signal: killed".into(),
                Ok(Signal::SIGTERM) => "signal: terminated".into(),
                Ok(other) => format!("signal: {}", other.as_str()),
                Err(_) => format!("signal: {sig}"),
            },
            CallExit::StartFailed(err) => format!("failed to start command: {err}"),
            CallExit::NotReaped => "process not reaped after SIGKILL".into(),
        }
    }

    /// The exit code the runner sees: Go's `ExitCode()` is -1 for a signal.
    pub fn code(&self) -> i32 {
        match self {
            CallExit::Code(code) => *code,
            _ => -1,
        }
    }
}

/// The end of an invocation.
pub(crate) struct Ended<C> {
    pub exit: CallExit,
    pub pid: Option<u32>,
    /// Why the kill sequence ran, if it did.
    pub killed_by: Option<C>,
    pub duration: Duration,
}

/// Starts `inv` in a new process group with stdin from `/dev/null`, streams both pipes into
/// their sinks concurrently, and waits until the process exited **and** both pipes reached
/// EOF, as Go's `cmd.Wait` does (§6.1, §10 item 4). When `kill` resolves first, the group gets
/// SIGTERM, then after `timeouts.graceful` SIGKILL, then after `timeouts.force` the wait is
/// abandoned.
pub(crate) async fn run<C>(
    inv: Invocation,
    on_start: impl FnOnce(u32),
    kill: impl Future<Output = C>,
    timeouts: KillTimeouts,
) -> Ended<C> {
    let started = Instant::now();
    let mut command = Command::new(&inv.program);
    command
        .args(&inv.args)
        .current_dir(&inv.cwd)
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return Ended {
                exit: CallExit::StartFailed(err.to_string()),
                pid: None,
                killed_by: None,
                duration: started.elapsed(),
            };
        }
    };
    let pid = child.id();
    if let Some(pid) = pid {
        on_start(pid);
    }
    let pumps: Vec<JoinHandle<()>> = [
        child.stdout.take().map(|out| pump(out, inv.stdout.clone())),
        child.stderr.take().map(|err| pump(err, inv.stderr.clone())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let aborts: Vec<_> = pumps.iter().map(JoinHandle::abort_handle).collect();
    let completion = async move {
        let status = child.wait().await;
        for pump in pumps {
            let _ = pump.await;
        }
        match status {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                match (status.code(), status.signal()) {
                    (Some(code), _) => CallExit::Code(code),
                    (None, Some(sig)) => CallExit::Signal(sig),
                    (None, None) => CallExit::Code(-1),
                }
            }
            Err(err) => CallExit::StartFailed(err.to_string()),
        }
    };
    tokio::pin!(completion);
    let mut killed_by = None;
    let exit = tokio::select! {
        exit = &mut completion => exit,
        cause = kill => {
            killed_by = Some(cause);
            let group = pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw);
            // The runner goes straight to SIGKILL when SIGTERM cannot be sent (§6.1).
            let term_sent = group.is_some_and(|g| killpg(g, Signal::SIGTERM).is_ok());
            let graceful = if term_sent { timeouts.graceful } else { Duration::ZERO };
            match tokio::time::timeout(graceful, &mut completion).await {
                Ok(exit) => exit,
                Err(_) => {
                    if let Some(g) = group {
                        let _ = killpg(g, Signal::SIGKILL);
                    }
                    match tokio::time::timeout(timeouts.force, &mut completion).await {
                        Ok(exit) => exit,
                        Err(_) => {
                            for abort in &aborts {
                                abort.abort();
                            }
                            CallExit::NotReaped
                        }
                    }
                }
            }
        }
    };
    Ended {
        exit,
        pid,
        killed_by,
        duration: started.elapsed(),
    }
}

fn pump(mut reader: impl AsyncReadExt + Unpin + Send + 'static, sink: Sink) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => sink(&buf[..n]),
            }
        }
    })
}
