//! Run stages through the core's stage channel (`drover_core::channel`).
//!
//! podman's exec costs about 90 ms (conmon plus `runc exec`) before the script does anything,
//! so every container of a job runs the core's stage agent as its PID 1, with a channel
//! directory of its own mounted read-only at `/drover-io`: a stage is then FIFO work on the
//! host, with no API call at all. Where the engine does not see this host's directory (an
//! engine in a VM, a forwarded socket), the agent finds no `wake` there and only keeps the
//! container alive; prepare notices and removes the directory, and each stage is an exec.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use drover_core::Result;
use drover_core::channel::{self, ChannelDir, Exec, MOUNT, Output};

use crate::engine::Engine;

/// One container of the job, reached through the engine's exec API.
pub struct ContainerExec<'a> {
    /// The engine.
    pub engine: &'a Engine,
    /// The container's name.
    pub container: String,
}

impl Exec for ContainerExec<'_> {
    fn describe(&self) -> String {
        format!("container {}", self.container)
    }

    async fn exec(&self, argv: &[String], stdin: Bytes) -> Result<Output<'_>> {
        let (_, output) = self.engine.exec(&self.container, argv, stdin).await?;
        Ok(output)
    }
}

/// The host side of one container's channel directory (`<job dir>/io-<role>`).
pub fn channel_path(job_dir: &Path, role: &str) -> PathBuf {
    job_dir.join(format!("io-{role}"))
}

/// Makes a container's channel directory; returns its bind mount, read-only (see
/// `ChannelDir` for why that matters).
pub fn create_channel(path: &Path) -> Result<String> {
    let dir = ChannelDir::create(path)?;
    Ok(format!("{}:{MOUNT}:ro", dir.path().display()))
}

/// The container's entrypoint: the stage agent serving its channel directory.
pub fn entrypoint(shell: &str) -> Vec<String> {
    channel::serve_argv(MOUNT, shell)
}
