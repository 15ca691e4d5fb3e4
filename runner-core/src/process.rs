//! Local child processes: each in its own process group, its output streamed into the job log
//! byte for byte, stopped on cancellation, and never left holding the runner's pipes.
//!
//! Why a group of its own (§6.1): the runner signals the driver's group, but a driver must also
//! be able to signal *its* children as a whole (a `bash` and everything it started) without
//! signalling itself, and remove whatever they leave behind when the stage ends.
//!
//! Why pipes rather than inherited stdio (§6.1, §10 item 4): the runner's `cmd.Wait` waits until
//! every holder of the driver's stdout and stderr has closed them. A child that inherited them
//! and left a daemon behind would keep the stage open until the exec timeout. Here children
//! only ever hold pipes to the driver, which copies from them; the runner's pipes close when
//! the driver exits, whatever the children do.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::log::{Stream, sink_file};
use crate::{Error, Result};

/// How long a child group has between SIGTERM and SIGKILL once the stage is cancelled.
pub const KILL_GRACE: Duration = Duration::from_secs(1);

/// How long output may keep arriving after the child exited and its group was killed, before
/// the copy is abandoned (the role Go's `WaitDelay` plays; only a process that left the group
/// with `setsid` can still hold the pipe then).
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// Variables a job's own processes may inherit from the driver's environment. Everything else
/// (operator settings, `CUSTOM_ENV_*`, `job_env`, cloud credentials) stays with the driver: the
/// runner's scripts export the job's variables themselves (§4.3).
const INHERITED: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME"];

/// A `PATH` for jobs when the driver's own is missing (systemd can start the runner with a
/// minimal environment, §3.3).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static LIVE_GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// A command whose output goes to the job log.
#[derive(Debug)]
pub struct JobCommand {
    command: Command,
    program: String,
    around_spawn: Option<AroundSpawn>,
}

/// What [`JobCommand::around_spawn`] runs in the driver on either side of the spawn.
struct AroundSpawn {
    enter: Box<dyn FnMut() -> io::Result<()> + Send>,
    leave: Box<dyn FnMut() -> io::Result<()> + Send>,
}

impl fmt::Debug for AroundSpawn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AroundSpawn")
    }
}

impl JobCommand {
    /// A command that inherits the driver's whole environment: for the driver's own tools
    /// (a backend CLI, a hook the operator configured).
    pub fn new(program: impl AsRef<OsStr>) -> JobCommand {
        let program = program.as_ref();
        JobCommand {
            command: Command::new(program),
            program: program.to_string_lossy().into_owned(),
            around_spawn: None,
        }
    }

    /// A command for the job's own processes: an empty environment but for `PATH`, the locale and the user name, so
    /// no operator secret reaches the job.
    pub fn for_job(program: impl AsRef<OsStr>) -> JobCommand {
        let mut command = JobCommand::new(program);
        command.command.env_clear();
        for key in INHERITED {
            if let Some(value) = std::env::var_os(key) {
                command.command.env(key, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            command.command.env("PATH", DEFAULT_PATH);
        }
        command
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut JobCommand {
        self.command.arg(arg);
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut JobCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    /// Sets a variable.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut JobCommand {
        self.command.env(key, value);
        self
    }

    /// Sets the working directory.
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut JobCommand {
        self.command.current_dir(dir);
        self
    }

    /// Runs `enter` in the driver just before the process is started and `leave` right after
    /// it, also when the start failed. The process inherits at fork whatever `enter` did to the
    /// driver, and so does everything it starts: moving the driver into a cgroup, for example,
    /// puts the process there before it runs a single instruction, where moving the process
    /// after the spawn would race with its first fork. The spawn between the two is one
    /// synchronous call, and no thread of the core starts a process meanwhile. An error from
    /// `enter` fails the command before it starts; one from `leave` kills what was started
    /// and fails it.
    pub fn around_spawn(
        &mut self,
        enter: impl FnMut() -> io::Result<()> + Send + 'static,
        leave: impl FnMut() -> io::Result<()> + Send + 'static,
    ) -> &mut JobCommand {
        self.around_spawn = Some(AroundSpawn {
            enter: Box::new(enter),
            leave: Box::new(leave),
        });
        self
    }

    /// Runs the command to its end, copying its stdout and stderr to the driver's as they
    /// arrive. When `cancel` fires, its group gets SIGTERM, then SIGKILL after
    /// [`KILL_GRACE`]. When it ends, whatever it left in its group is killed. Returns its exit
    /// status; a child killed by a signal reports `128 + signal`, as a shell would.
    pub async fn stream(&mut self, cancel: &CancellationToken) -> Result<i32> {
        self.command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn()?;
        let group = LiveGroup::register(&child)?;
        let copies = [
            copy_to_log(
                child
                    .stdout
                    .take()
                    .map(|pipe| pipe.into_owned_fd().map(File::from)),
                Stream::Stdout,
            )?,
            copy_to_log(
                child
                    .stderr
                    .take()
                    .map(|pipe| pipe.into_owned_fd().map(File::from)),
                Stream::Stderr,
            )?,
        ];
        let status = wait_or_stop(&mut child, &group, cancel).await;
        // Whatever the child started in its group goes with it.
        group.signal(Signal::SIGKILL);
        let drained = tokio::time::Instant::now() + DRAIN_LIMIT;
        for copy in copies.into_iter().flatten() {
            let _ = tokio::time::timeout_at(drained, copy).await;
        }
        drop(group);
        let status =
            status.map_err(|err| Error::system(format!("waiting for {}: {err}", self.program)))?;
        Ok(exit_code(status))
    }

    fn spawn(&mut self) -> Result<Child> {
        let cannot_start = |err| Error::system(format!("cannot start {}: {err}", self.program));
        let Some(around) = &mut self.around_spawn else {
            return self.command.spawn().map_err(cannot_start);
        };
        (around.enter)().map_err(cannot_start)?;
        let spawned = self.command.spawn();
        if let Err(err) = (around.leave)() {
            if let Some(pid) = spawned
                .as_ref()
                .ok()
                .and_then(Child::id)
                .and_then(|id| i32::try_from(id).ok())
            {
                // Its whole group (`process_group(0)`): what it may have started already goes too.
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            return Err(cannot_start(err));
        }
        spawned.map_err(cannot_start)
    }
}

async fn wait_or_stop(
    child: &mut Child,
    group: &LiveGroup,
    cancel: &CancellationToken,
) -> io::Result<ExitStatus> {
    tokio::select! {
        status = child.wait() => return status,
        () = cancel.cancelled() => group.signal(Signal::SIGTERM),
    }
    match tokio::time::timeout(KILL_GRACE, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            group.signal(Signal::SIGKILL);
            child.wait().await
        }
    }
}

/// Copies a child's pipe to the driver's stream on a thread of its own, so a slow reader of
/// one stream never holds up the other. `io::copy` between two pipes splices in the kernel.
fn copy_to_log(
    source: Option<io::Result<File>>,
    stream: Stream,
) -> Result<Option<oneshot::Receiver<()>>> {
    let Some(source) = source else {
        return Ok(None);
    };
    let mut source = source.map_err(|err| Error::system(format!("child output pipe: {err}")))?;
    let mut sink = sink_file(stream).map_err(|err| Error::system(format!("job log: {err}")))?;
    let (done, finished) = oneshot::channel();
    thread::Builder::new()
        .name("drover-log-copy".into())
        .spawn(move || {
            // A closed job log (the runner went away) ends the copy; nothing else to tell.
            let _ = io::copy(&mut source, &mut sink);
            let _ = done.send(());
        })
        .map_err(|err| Error::system(format!("cannot start output copy: {err}")))?;
    Ok(Some(finished))
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1)
}

/// A child's process group, remembered until dropped so [`kill_live_groups`] can reach it when
/// the driver must exit early.
pub(crate) struct LiveGroup(Pid);

impl LiveGroup {
    pub(crate) fn register(child: &Child) -> Result<LiveGroup> {
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| Error::system("child exited before it could be tracked"))?;
        LIVE_GROUPS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(pid);
        Ok(LiveGroup(Pid::from_raw(pid)))
    }

    fn signal(&self, signal: Signal) {
        // ESRCH: the group is already gone, which is what we want.
        let _ = killpg(self.0, signal);
    }
}

impl Drop for LiveGroup {
    fn drop(&mut self) {
        LIVE_GROUPS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.0.as_raw());
    }
}

/// SIGKILLs every child group still running. The core calls this before the driver exits, so
/// a stage that gave up on a child (cancel grace exceeded, panic) leaves nothing behind.
pub(crate) fn kill_live_groups() {
    let groups = LIVE_GROUPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    for pgid in groups {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}
