//! Run stages through the core's stage channel (`drover_core::channel`).
//!
//! An exec through LXD's API (an operation, four websockets, `forkexec` in the instance) costs
//! tens of milliseconds before the script does anything, about what `lxc exec` costs, which is
//! what GitLab's documented LXD driver pays per stage (measured in `benches/stages.rs`). When
//! the daemon shares this host's file system (a local socket) and the instance is a container,
//! prepare attaches a channel directory read-only at `/drover-io` and starts the core's stage
//! agent in the instance once: a stage is then FIFO work on the host, and a stage's driver
//! process does not even connect to LXD. Where the instance cannot see the directory (a VM's
//! disk device does not carry FIFOs, a remote daemon), every stage is an exec.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use drover_core::channel::{Exec, Output};
use drover_core::{Error, Result};

use crate::api::Lxd;

/// One instance, reached through LXD's exec API; the client is made on first use, so a stage
/// that goes through the channel directory never makes one.
pub struct InstanceExec<'a> {
    name: String,
    connect: &'a dyn Fn() -> Result<Lxd>,
    client: OnceCell<Lxd>,
}

impl<'a> InstanceExec<'a> {
    /// Instance `name` of the daemon `connect` reaches.
    pub fn new(name: &str, connect: &'a dyn Fn() -> Result<Lxd>) -> InstanceExec<'a> {
        InstanceExec {
            name: name.to_owned(),
            connect,
            client: OnceCell::new(),
        }
    }

    /// The same, with a client already made.
    pub fn with_client(
        name: &str,
        lxd: &Lxd,
        connect: &'a dyn Fn() -> Result<Lxd>,
    ) -> InstanceExec<'a> {
        let exec = InstanceExec::new(name, connect);
        let _ = exec.client.set(lxd.clone());
        exec
    }

    fn client(&self) -> Result<&Lxd> {
        if self.client.get().is_none() {
            let _ = self.client.set((self.connect)()?);
        }
        self.client
            .get()
            .ok_or_else(|| Error::system("no LXD client"))
    }
}

impl Exec for InstanceExec<'_> {
    fn describe(&self) -> String {
        format!("instance {}", self.name)
    }

    async fn exec(&self, argv: &[String], stdin: Bytes) -> Result<Output<'_>> {
        self.client()?.exec(&self.name, argv, stdin).await
    }
}

/// The host side of instance `name`'s channel directory.
pub fn channel_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("io").join(name)
}
