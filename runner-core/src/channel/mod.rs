//! The stage channel: how a run stage reaches the job environment, written once for every
//! driver.
//!
//! A run stage (§1.4) must hand the runner's script to the environment, stream its output into
//! the job log byte for byte as it comes, return the script's exit status (§4.4), stop the
//! script's processes on cancel (§6.3), and end within its bound when the environment breaks.
//! Each backend reaches its environment differently, so a driver gives the core a
//! [`Transport`]; the core does everything else in [`run_stage`]: the protocol with the agent
//! in the environment ([`AGENT`]), the reading of what comes back (`wire`), the timeouts, the
//! cancel, and restarting an agent that died.
//!
//! # The protocol
//!
//! Every stage gets a fresh random nonce. The transport delivers the script and the nonce to
//! the environment, where the core's `sh` agent starts the script in a session of its own and
//! writes, on both the stage's stdout and stderr, a start line naming the script's process
//! group, then the script's bytes, then an exit line with its status. So every transport only
//! has to carry a script in and two byte streams out; the start line tells a slow agent from
//! a dead one (no start line within [`START_TIMEOUT`] fails the stage), the process group is
//! what a cancel signals (TERM, then KILL after [`crate::KILL_GRACE`]), and the exit lines say
//! that everything the script wrote has arrived, even if a background child still holds the
//! streams. A stream that ends without its exit line (the job killed the agent's waiter) fails
//! the stage once the script's processes are gone.
//!
//! # Transports
//!
//! - [`SharedDir`]: for a container whose engine shares this host's file system (podman,
//!   Docker, LXD with a local socket). A host directory, owned by the driver's user and
//!   mounted **read-only** into the environment, holds FIFOs the driver makes; a long-lived
//!   agent reads its orders from one of them and writes each stage's output into two others,
//!   so a stage costs no backend call at all. See its docs for why the job cannot use this
//!   directory against the host.
//! - [`PerStageExec`]: for anything that can run a command with an input and give back its
//!   output (a backend's exec API, an SSH channel): each stage is one command, `agent stage`.
//!   A backend provides this with one method, [`Exec::exec`]; the shared directory uses the
//!   same method to start its agent.
//! - A transport of a VM driver fits [`Transport`] as it is: over SSH it is a
//!   [`PerStageExec`] whose [`Exec`] opens a channel on the job's connection (one connection
//!   per job, a channel per stage; cancel is an `agent signal` on another channel); over
//!   virtio-serial (drover-libvirt's) it is a transport whose `deliver` writes
//!   `run NONCE SHELL AGENTLEN SCRIPTLEN`, [`AGENT`] and the script to a control port read by an agent in the guest, and whose output is the two ports the
//!   agent writes the stage's streams to. Such ports outlive a stage: what a late writer of an
//!   earlier stage leaves in them comes before the start line, and is discarded (bounded).
//!
//! # What the job can do to it
//!
//! Everything that comes back is job-controlled: the reader bounds every line it parses, and
//! passes the script's bytes on without collecting them, in linear time. A job can forge its
//! own exit line or break its own channel (kill the agent, steal its orders, flood its FIFOs);
//! that ends its own stage, with a system failure that says so, within [`START_TIMEOUT`], the
//! end of the script, or the cancel grace. A stage that never started tells the transport
//! ([`Transport::unanswered`]): the shared directory then hands the job's later stages to an
//! exec, so that a job still reading the agent's orders loses one stage, not every one left.
//! It cannot make the driver touch anything else.

mod agent;
mod exec;
mod shared_dir;
mod wire;

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream as FuturesStream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use agent::{AGENT, AGENT_NAME, launch_argv, serve_argv, signal_argv, stage_argv};
pub use exec::{Exec, PerStageExec};
pub use shared_dir::{ChannelDir, SharedDir};
use wire::{Tag, Wire};

use crate::{Error, KILL_GRACE, Result, Stream, progress, write_all};

/// Where environments mount the channel directory of a [`SharedDir`].
pub const MOUNT: &str = "/drover-io";

/// How long a delivered stage may take to send its start line: the agent forks a subshell and
/// a session leader, so this is only reached when the agent is gone or the job broke it.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a (re)started agent may take to listen.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the second stream may stay silent, after the first one's exit line, before the
/// stage is taken as broken (both exit lines are written one after the other).
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// A piece of a stage's output.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Which stream of the stage it is from.
    pub stream: Stream,
    /// The bytes.
    pub bytes: Bytes,
}

/// A stage's output as the transport receives it: both streams, interleaved as they come,
/// ending when neither can bring more.
pub type Output<'a> = Pin<Box<dyn FuturesStream<Item = io::Result<Chunk>> + 'a>>;

/// A signal for a stage's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// Ask the script to stop (its trap exits 1 from runner 19.1; before, with the stopped
    /// command's status, §4.3).
    Term,
    /// Stop it.
    Kill,
}

impl StopSignal {
    /// The name the agent takes.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "TERM",
            StopSignal::Kill => "KILL",
        }
    }
}

/// One stage for the agent.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    /// Names the stage's files and lines: lowercase hex.
    pub nonce: &'a str,
    /// The runner's script (§1.4).
    pub script: &'a [u8],
}

/// How the stage channel reaches one job environment (see the module docs).
#[allow(async_fn_in_trait)] // driven by `run_stage` on the core's single-threaded runtime
pub trait Transport {
    /// What to call the environment in messages, e.g. `container drover-ci-p1-j2`.
    fn describe(&self) -> String;

    /// Whether an agent is there to take a stage; `false` makes [`run_stage`] call
    /// [`Transport::launch`] first. Cheap: called before every stage.
    fn listening(&self) -> bool;

    /// Starts the environment's agent. Returns once it is started, not once it listens.
    async fn launch(&self) -> Result<()>;

    /// Hands the stage to the agent and returns its output.
    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<Output<'_>>;

    /// Sends `signal` to the stage's process group `pgid` in the environment.
    async fn signal(&self, pgid: u32, signal: StopSignal) -> Result<()>;

    /// Called when a delivered stage never started (no start line within [`START_TIMEOUT`]):
    /// something in the environment takes the agent's orders or holds the agent up. A
    /// transport that has another way in for the job's later stages switches to it here, so
    /// that only this stage is lost; by default nothing changes.
    fn unanswered(&self) {}
}

/// Waits, bounded by `timeout`, until `transport` listens.
pub async fn wait_listening(transport: &impl Transport, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    while !transport.listening() {
        if Instant::now() >= deadline {
            return Err(Error::system(format!(
                "the stage agent in {} did not start within {} s",
                transport.describe(),
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts the agent and waits until it listens.
pub async fn start_agent(transport: &impl Transport) -> Result<()> {
    transport.launch().await?;
    wait_listening(transport, LISTEN_TIMEOUT).await
}

/// For prepare: makes sure an agent serves the channel directory at `dir` (mounted at
/// [`MOUNT`] in `exec`'s environment): started here when `launch`, else the one the
/// environment's entrypoint started is waited for. When none comes (the environment does not
/// see the directory: an engine in a VM, a VM's disk device), the directory is removed and the
/// job log says so: every stage then takes an exec ([`run_in`]).
pub async fn settle_agent(exec: &impl Exec, dir: &Path, shell: &str, launch: bool) -> Result<()> {
    let Some(channel) = ChannelDir::open(dir)? else {
        return Ok(());
    };
    let transport = SharedDir::new(channel, MOUNT, shell, exec);
    let listening = if launch {
        start_agent(&transport).await
    } else {
        wait_listening(&transport, LISTEN_TIMEOUT).await
    };
    if let Err(err) = listening {
        progress!(
            "No stage channel through {} ({err}); each stage runs as an exec",
            dir.display()
        );
        ChannelDir::remove(dir);
    }
    Ok(())
}

/// Runs `script` in `exec`'s environment, through the channel directory at `dir` when prepare
/// made one ([`settle_agent`]), else as an exec.
pub async fn run_in(
    exec: &impl Exec,
    dir: &Path,
    shell: &str,
    script: &[u8],
    cancel: &CancellationToken,
) -> Result<i32> {
    match ChannelDir::open(dir)? {
        Some(channel) => {
            run_stage(&SharedDir::new(channel, MOUNT, shell, exec), script, cancel).await
        }
        None => run_stage(&PerStageExec::new(exec, shell), script, cancel).await,
    }
}

/// A fresh nonce for a stage.
pub fn nonce() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// Runs `script` through `transport` and returns its exit status, its output streamed into the
/// job log as it comes (§1.4). On `cancel` the script's process group gets SIGTERM, then
/// SIGKILL after [`KILL_GRACE`]; the status that follows is returned as for any end (the
/// runner classifies a cancelled stage itself, §6.2).
pub async fn run_stage(
    transport: &impl Transport,
    script: &[u8],
    cancel: &CancellationToken,
) -> Result<i32> {
    if !transport.listening() {
        progress!(
            "The stage agent in {} was gone; starting it again",
            transport.describe()
        );
        start_agent(transport).await.map_err(|err| {
            err.context(format_args!(
                "the stage agent in {} is not running and did not start again",
                transport.describe()
            ))
        })?;
    }
    let nonce = nonce();
    let output = transport
        .deliver(&Delivery {
            nonce: &nonce,
            script,
        })
        .await?;
    let mut pgid = None;
    let result = follow(transport, output, &Tag::new(&nonce), cancel, &mut pgid).await;
    if let (Err(_), Some(group)) = (&result, pgid) {
        // The stage failed while its script may still run: it must not outlive the stage.
        let _ = transport.signal(group, StopSignal::Kill).await;
    }
    result
}

/// Reads the stage's output to its end; `pgid` is the script's process group once known.
async fn follow(
    transport: &impl Transport,
    mut output: Output<'_>,
    tag: &Tag,
    cancel: &CancellationToken,
    pgid: &mut Option<u32>,
) -> Result<i32> {
    let mut streams = [Wire::new(tag), Wire::new(tag)];
    let broken = |what: &dyn std::fmt::Display| {
        Error::system(format!(
            "the stage channel of {} broke: {what}; did the job interfere with it?",
            transport.describe()
        ))
    };
    let started = Instant::now();
    let mut cancelled_at: Option<Instant> = None;
    let mut killed = false;
    // When the first exit line came, and when the other stream last moved.
    let mut draining: Option<Instant> = None;
    let mut signals = FuturesUnordered::new();
    loop {
        let kill_at = cancelled_at
            .filter(|_| pgid.is_some() && !killed)
            .map(|at| at + KILL_GRACE);
        tokio::select! {
            chunk = output.next() => {
                let Some(chunk) = chunk else { break };
                let chunk = chunk.map_err(|err| broken(&err))?;
                let index = match chunk.stream { Stream::Stdout => 0, Stream::Stderr => 1 };
                let was_done = streams[index].is_done();
                let seen = streams[index]
                    .feed(&chunk.bytes, &mut |bytes| {
                        // A job log that cannot be written (the runner went away) is not the
                        // job's failure; the stage still ends with the script.
                        let _ = write_all(chunk.stream, bytes);
                    })
                    .map_err(|err| broken(&format_args!("its {}: {err}", stream_name(chunk.stream))))?;
                if pgid.is_none() {
                    if let Some(group) = seen.started {
                        *pgid = Some(group);
                        if cancelled_at.is_some() {
                            signals.push(transport.signal(group, StopSignal::Term).boxed_local());
                        }
                    }
                }
                if !was_done {
                    draining = draining.map(|_| Instant::now());
                }
                if streams.iter().all(Wire::is_done) {
                    break;
                }
                if streams.iter().any(Wire::is_done) && draining.is_none() {
                    draining = Some(Instant::now());
                }
            }
            () = tokio::time::sleep_until(started + START_TIMEOUT), if pgid.is_none() => {
                transport.unanswered();
                return Err(Error::system(format!(
                    "the stage agent in {} did not start the script within {} s; did the job interfere with its channel?",
                    transport.describe(),
                    START_TIMEOUT.as_secs()
                )));
            }
            () = tokio::time::sleep_until(draining.unwrap_or(started) + DRAIN_IDLE), if draining.is_some() => {
                return Err(broken(&"one output stream ended and the other did not"));
            }
            () = cancel.cancelled(), if cancelled_at.is_none() => {
                cancelled_at = Some(Instant::now());
                if let Some(group) = *pgid {
                    signals.push(transport.signal(group, StopSignal::Term).boxed_local());
                }
            }
            () = tokio::time::sleep_until(kill_at.unwrap_or(started)), if kill_at.is_some() => {
                killed = true;
                if let Some(group) = *pgid {
                    signals.push(transport.signal(group, StopSignal::Kill).boxed_local());
                }
            }
            Some(result) = signals.next(), if !signals.is_empty() => {
                if let Err(err) = result {
                    progress!("Could not stop the script: {err}");
                }
            }
        }
    }
    let [stdout, stderr] = streams.map(|wire| wire.seen());
    match stdout.exited.or(stderr.exited) {
        Some(status) => Ok(status),
        // Killed after a cancel: the script is gone, and the runner reports the cancel (§6.2).
        None if killed => Ok(128 + 9),
        None if pgid.is_none() => Err(broken(&"its output ended before the script started")),
        None => Err(broken(
            &"its output ended without the script's exit status (was the stage agent killed?)",
        )),
    }
}

fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

#[cfg(test)]
mod tests;
