//! The one thing a backend must give the channel: running a command in the job environment.

use bytes::Bytes;
use futures_util::StreamExt;

use super::{Delivery, Output, StopSignal, Transport, signal_argv, stage_argv};
use crate::{Error, Result};

/// How long an order to the environment (an `agent signal`, starting an agent) may take.
const ORDER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A backend's way to run a command in the job environment: an exec API, an SSH channel.
#[allow(async_fn_in_trait)] // driven by the core's single-threaded runtime
pub trait Exec {
    /// What to call the environment in messages, e.g. `container drover-ci-p1-j2`.
    fn describe(&self) -> String;

    /// Starts `argv` in the environment with `stdin` as its whole input (then EOF), and
    /// returns its stdout and stderr as they come, ending when the command's output ends.
    async fn exec(&self, argv: &[String], stdin: Bytes) -> Result<Output<'_>>;
}

/// Runs `argv` and waits, bounded, for its output to end, discarding it: for orders whose
/// effect is all that matters.
pub(crate) async fn order(exec: &impl Exec, argv: &[String]) -> Result<()> {
    let run = async {
        let mut output = exec.exec(argv, Bytes::new()).await?;
        while let Some(chunk) = output.next().await {
            chunk.map_err(|err| Error::system(format!("{}: {err}", exec.describe())))?;
        }
        Ok(())
    };
    tokio::time::timeout(ORDER_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            Err(Error::system(format!(
                "{} did not finish a command within {} s",
                exec.describe(),
                ORDER_TIMEOUT.as_secs()
            )))
        })
}

/// A transport that runs each stage as one command (`agent stage`), with the script on its
/// input: where no directory can be shared with the environment (a remote daemon, a VM).
pub struct PerStageExec<'a, E> {
    exec: &'a E,
    shell: String,
}

impl<'a, E: Exec> PerStageExec<'a, E> {
    /// Stages of `exec`'s environment, their scripts run by `shell` (§7).
    pub fn new(exec: &'a E, shell: &str) -> PerStageExec<'a, E> {
        PerStageExec {
            exec,
            shell: shell.to_owned(),
        }
    }
}

impl<E: Exec> Transport for PerStageExec<'_, E> {
    fn describe(&self) -> String {
        self.exec.describe()
    }

    /// There is no agent to wait for: each stage starts its own.
    fn listening(&self) -> bool {
        true
    }

    async fn launch(&self) -> Result<()> {
        Ok(())
    }

    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<Output<'_>> {
        self.exec
            .exec(
                &stage_argv(delivery.nonce, &self.shell),
                Bytes::copy_from_slice(delivery.script),
            )
            .await
    }

    async fn signal(&self, pgid: u32, signal: StopSignal) -> Result<()> {
        order(self.exec, &signal_argv(signal.name(), pgid)).await
    }
}
