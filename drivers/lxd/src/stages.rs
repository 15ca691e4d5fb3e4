//! Run stages without an LXD exec each.
//!
//! An exec through LXD's API (an operation, four websockets, `forkexec` in the instance) costs
//! tens of milliseconds before the script does anything, about what `lxc exec` costs, which is
//! what GitLab's documented LXD driver pays per stage (measured in `benches/stages.rs`). When
//! the daemon shares this host's file system (a local socket) and the instance is a container,
//! prepare attaches a private host directory at `/drover-io` and starts a small dispatcher in
//! the instance once. A stage is then only file-system work on the host:
//!
//! 1. the driver writes `<nonce>.sh` and makes the FIFOs `<nonce>.out`, `.err` and `.status`;
//! 2. it writes the nonce into the FIFO `wake`, which the dispatcher reads;
//! 3. the dispatcher runs the script in a session of its own with its stdout and stderr on the
//!    two FIFOs (so the bytes reach the job log with no daemon in between), records its process
//!    group in `<nonce>.pid`, waits, and writes the exit status into `<nonce>.status`.
//!
//! Only a cancel uses the API: an exec that stops the script's process group (§6.3). Where the
//! dispatcher cannot see the directory (a VM's disk device does not carry FIFOs, a remote
//! daemon), every stage falls back to an exec (see `Lxd::exec_streaming`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_core::fifo::{FIFO_CHUNK, Fifo, FifoAccess};
use drover_core::{Error, Result, Stream, progress, write_all};
use nix::unistd::{Gid, Uid};
use tokio_util::sync::CancellationToken;

use crate::api::Lxd;

/// Where the job's stage directory is attached inside the instance.
pub const IO_DIR: &str = "/drover-io";

/// The dispatcher, run by `sh` with the job's shell as `$1`. It holds `wake` open read-write
/// (so it never sees EOF, and the driver can tell it is alive: opening `wake` for writing
/// without blocking fails when nobody reads it); the scripts do not inherit it, or a script
/// would keep it looking alive after it died. `setsid` makes the script a process group of
/// its own, which a cancel stops as a whole.
const DISPATCHER: &str = r#"io=/drover-io
exec 3<>"$io/wake"
while read -r nonce <&3; do
  stage=$io/$nonce
  setsid "$1" "$stage.sh" </dev/null >"$stage.out" 2>"$stage.err" 3<&- &
  echo $! >"$stage.pid"
  wait $!
  echo $? >"$stage.status"
  rm -f "$stage.sh" "$stage.pid"
done"#;

/// Starts the dispatcher detached from the exec that launches it ($0: the dispatcher, $1: shell).
const LAUNCHER: &str = r#"setsid sh -c "$0" drover-dispatcher "$1" </dev/null >/dev/null 2>&1 &"#;

/// How long prepare waits for a new dispatcher to open `wake`.
const DISPATCHER_START: Duration = Duration::from_secs(5);

/// How often a running stage checks that the dispatcher is still there.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);

/// The host side of one instance's `/drover-io`.
pub struct StageDir {
    dir: PathBuf,
}

impl StageDir {
    /// The directory of instance `name` under the driver's state directory.
    pub fn new(state_dir: &Path, name: &str) -> StageDir {
        StageDir {
            dir: state_dir.join("io").join(name),
        }
    }

    /// The host path, the source of the instance's disk device.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes the directory empty and private (0700), before the instance is created: LXD
    /// refuses to start an instance whose disk device has no source.
    pub fn create(&self) -> Result<()> {
        self.remove();
        std::fs::create_dir_all(self.dir.parent().unwrap_or(&self.dir))
            .and_then(|()| std::fs::DirBuilder::new().mode(0o700).create(&self.dir))
            .map_err(|err| Error::system(format!("cannot create {}: {err}", self.dir.display())))
    }

    /// Removes the directory and everything in it; one that is gone is fine.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Hands the directory to `owner` (the instance's root on the host), makes `wake` and
    /// starts the dispatcher. On failure (mostly: the instance does not see the directory) the
    /// directory is removed, so stages use an exec each.
    pub async fn start(&self, lxd: &Lxd, name: &str, shell: &str, owner: (u32, u32)) -> Result<()> {
        let started = self.try_start(lxd, name, shell, owner).await;
        if started.is_err() {
            self.remove();
        }
        started
    }

    async fn try_start(&self, lxd: &Lxd, name: &str, shell: &str, owner: (u32, u32)) -> Result<()> {
        let (uid, gid) = (Some(Uid::from_raw(owner.0)), Some(Gid::from_raw(owner.1)));
        let wake = self.dir.join("wake");
        let fail = |err: &dyn std::fmt::Display| Error::system(err.to_string());
        // `wake` first, while the directory is still root's alone: nothing can be swapped in.
        nix::unistd::mkfifo(&wake, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|err| fail(&err))?;
        nix::unistd::chown(&wake, uid, gid).map_err(|err| fail(&err))?;
        nix::unistd::chown(&self.dir, uid, gid).map_err(|err| fail(&err))?;
        self.launch(lxd, name, shell).await
    }

    /// Starts a dispatcher in the instance and waits, bounded, until it reads `wake`.
    async fn launch(&self, lxd: &Lxd, name: &str, shell: &str) -> Result<()> {
        lxd.exec_quiet(name, &["sh", "-c", LAUNCHER, DISPATCHER, shell])
            .await?;
        let deadline = Instant::now() + DISPATCHER_START;
        while !self.dispatcher_alive() {
            if Instant::now() > deadline {
                return Err(Error::system("the dispatcher did not start"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// The stage path of a running instance, when prepare set it up.
    pub fn ready(&self) -> bool {
        self.dir.join("wake").exists()
    }

    /// Whether a dispatcher holds `wake` open for reading.
    fn dispatcher_alive(&self) -> bool {
        self.open_wake().is_ok()
    }

    fn open_wake(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(self.dir.join("wake"))
    }

    /// Runs `script` with the dispatcher of instance `name` and returns its exit status,
    /// streaming its output. On cancel an exec stops the script's process group (TERM, then
    /// KILL after a second); the dispatcher then reports the status as for any other end.
    pub async fn run(
        &self,
        lxd: &Lxd,
        name: &str,
        script: &[u8],
        shell: &str,
        cancel: &CancellationToken,
    ) -> Result<i32> {
        let nonce = format!("{:016x}", fastrand::u64(..));
        let owner = self.owner()?;
        let stage = self.dir.join(&nonce);
        let with_suffix = |suffix: &str| PathBuf::from(format!("{}.{suffix}", stage.display()));
        let mut out = Fifo::create(with_suffix("out"), owner)?;
        let mut err = Fifo::create(with_suffix("err"), owner)?;
        let mut status = Fifo::create(with_suffix("status"), owner)?;
        let script_path = with_suffix("sh");
        self.write_script(&script_path, script, owner)?;
        // A dispatcher that an earlier stage of the job killed is started again.
        if self.wake(&nonce).is_err() {
            progress!("The stage dispatcher in instance {name} was gone; starting it again");
            let woken = self.launch(lxd, name, shell).await.and_then(|()| {
                self.wake(&nonce)
                    .map_err(|err| Error::system(err.to_string()))
            });
            if let Err(err) = woken {
                let _ = std::fs::remove_file(&script_path);
                return Err(Error::system(format!(
                    "the stage dispatcher in instance {name} is not running and did not start again: {err}"
                )));
            }
        }
        let (mut out_buf, mut err_buf) = (vec![0u8; FIFO_CHUNK], vec![0u8; FIFO_CHUNK]);
        let mut status_buf = Vec::new();
        let mut status_chunk = [0u8; 64];
        let mut liveness = tokio::time::interval(LIVENESS_INTERVAL);
        let mut stopping = false;
        while !status_buf.contains(&b'\n') {
            tokio::select! {
                read = out.read(&mut out_buf) => {
                    let _ = write_all(Stream::Stdout, &out_buf[..read]);
                }
                read = err.read(&mut err_buf) => {
                    let _ = write_all(Stream::Stderr, &err_buf[..read]);
                }
                read = status.read(&mut status_chunk) => {
                    status_buf.extend_from_slice(&status_chunk[..read]);
                }
                () = cancel.cancelled(), if !stopping => {
                    stopping = true;
                    let stop = stop_command(&nonce);
                    let (lxd, name, shell) = (lxd.clone(), name.to_owned(), shell.to_owned());
                    // Concurrently: the output keeps flowing while the group is stopped.
                    tokio::spawn(async move {
                        let _ = lxd.exec_quiet(&name, &[&shell, "-c", &stop]).await;
                    });
                }
                _ = liveness.tick() => {
                    if !self.dispatcher_alive() {
                        return Err(Error::system(format!(
                            "the stage dispatcher in instance {name} stopped before the script ended; was the instance stopped or out of memory?"
                        )));
                    }
                }
            }
        }
        // The script has exited: what it wrote is in the FIFOs' buffers already.
        out.drain(Stream::Stdout, &mut out_buf);
        err.drain(Stream::Stderr, &mut out_buf);
        let text = String::from_utf8_lossy(&status_buf);
        text.trim().parse().map_err(|_| {
            Error::system(format!(
                "the stage dispatcher in instance {name} reported {text:?}, not an exit status"
            ))
        })
    }

    /// The owner of the directory, whom the instance's root is on the host.
    fn owner(&self) -> Result<FifoAccess> {
        let metadata = std::fs::metadata(&self.dir)
            .map_err(|err| Error::system(format!("{}: {err}", self.dir.display())))?;
        Ok(FifoAccess::Owner(
            std::os::unix::fs::MetadataExt::uid(&metadata),
            std::os::unix::fs::MetadataExt::gid(&metadata),
        ))
    }

    /// Writes the script readable by the instance's root only: it holds the job's secrets.
    fn write_script(&self, path: &Path, script: &[u8], owner: FifoAccess) -> Result<()> {
        let fail = |err: &dyn std::fmt::Display| {
            Error::system(format!(
                "cannot write the script to {}: {err}",
                path.display()
            ))
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|err| fail(&err))?;
        // `create_new` does not follow a symlink the job may have put there, and the owner is
        // set through the descriptor, not the path, for the same reason.
        if let FifoAccess::Owner(uid, gid) = owner {
            nix::unistd::fchown(&file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(|err| fail(&err))?;
        }
        file.write_all(script).map_err(|err| fail(&err))?;
        Ok(())
    }

    /// Hands `nonce` to the dispatcher; fails when none is reading.
    fn wake(&self, nonce: &str) -> std::io::Result<()> {
        // One write of a few bytes to a pipe is atomic: the dispatcher reads the whole line.
        self.open_wake()?.write_all(format!("{nonce}\n").as_bytes())
    }
}

/// The command that stops stage `nonce`'s process group: TERM, then KILL after a second. The
/// dispatcher writes the group into `<nonce>.pid` just after starting the script; a cancel
/// that comes sooner waits for it, bounded. Run by the job's shell, not `sh`: dash's `kill`
/// takes no process group (`kill -TERM -- -5` is "Illegal number").
fn stop_command(nonce: &str) -> String {
    format!(
        "p={IO_DIR}/{nonce}.pid; for i in 1 2 3 4 5 6 7 8 9 10; do [ -s $p ] && break; sleep 0.1; done; \
         g=$(cat $p 2>/dev/null) || exit 0; kill -TERM -- -$g 2>/dev/null; sleep 1; kill -KILL -- -$g 2>/dev/null; true"
    )
}

/// The host uid and gid of an instance's root, from its `volatile.idmap.current` (LXD's
/// JSON list of ranges); a privileged container has none and is root itself.
pub fn root_owner(instance: &serde_json::Value) -> (u32, u32) {
    let map = instance["config"]["volatile.idmap.current"]
        .as_str()
        .and_then(|text| serde_json::from_str::<Vec<serde_json::Value>>(text).ok())
        .unwrap_or_default();
    let host_id_of_root = |uid: bool| {
        map.iter()
            .find(|range| range[if uid { "Isuid" } else { "Isgid" }] == true && range["Nsid"] == 0)
            .and_then(|range| range["Hostid"].as_u64())
            .and_then(|id| u32::try_from(id).ok())
            .unwrap_or(0)
    };
    (host_id_of_root(true), host_id_of_root(false))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_root_of_an_unprivileged_container_is_its_mapped_host_id() {
        let map = r#"[{"Isuid":true,"Isgid":false,"Hostid":100000,"Nsid":0,"Maprange":65536},{"Isuid":false,"Isgid":true,"Hostid":200000,"Nsid":0,"Maprange":65536}]"#;
        let instance = json!({"config": {"volatile.idmap.current": map}});
        assert_eq!(root_owner(&instance), (100_000, 200_000));
    }

    #[test]
    fn a_privileged_container_has_no_map_and_its_root_is_root() {
        assert_eq!(
            root_owner(&json!({"config": {"volatile.idmap.current": "[]"}})),
            (0, 0)
        );
        assert_eq!(root_owner(&json!({"config": {}})), (0, 0));
    }
}
