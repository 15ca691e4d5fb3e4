//! The shared directory: stages through FIFOs in a host directory the environment sees
//! read-only.
//!
//! # Why the job cannot use it against the host
//!
//! The driver runs as root on the host and the job controls everything inside its
//! environment, so the directory is built so that the host side never meets anything the job
//! made:
//!
//! - the directory belongs to the driver's user, mode 0711, below a parent of mode 0700, and
//!   the environment gets it **read-only** (a `:ro` bind mount, a `readonly` LXD disk device).
//!   The job can neither create, rename, remove nor replace an entry in it, so no entry can
//!   become a symlink to a host file, and another host user cannot even list it;
//! - everything in it is made by the driver: `wake` when the directory is made, before the
//!   environment starts, and each stage's script and FIFOs just before the stage. A FIFO on a
//!   read-only mount can still be opened for writing, which is all the agent needs;
//! - all the same, nothing is opened by path: the driver holds the directory open and opens
//!   entries relative to it with `O_NOFOLLOW`, checks with `fstat` that what it opened is the
//!   FIFO it expects, sets modes through the open descriptor, and refuses a
//!   directory that is not its own or that others may write to. Writes to `wake` never block
//!   (`O_NONBLOCK`): a full or unread FIFO is an error, not a hang;
//! - what comes back through the FIFOs is only ever read by the bounded `wire` reader.
//!
//! The FIFOs are mode 0666 and the scripts 0644, for any user of the environment (which users
//! an image has, and which host ids an unprivileged container's users map to, is not the
//! driver's to know); nobody outside the environment can reach them through the directories.
//!
//! What the job can reach is its own stage's files: it may read its own script (its own
//! secrets), write into its own output, or send the agent orders. Each of those only breaks
//! its own stage (see the module docs of `channel`).

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, mkdirat};
use nix::unistd::{UnlinkatFlags, mkfifoat, unlinkat};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::unix::pipe;
use tokio_util::io::ReaderStream;

use super::exec::order;
use super::{Chunk, Delivery, Exec, Output, StopSignal, Transport, launch_argv, signal_argv};
use crate::{Error, Result, Stream, progress};

/// The FIFO the agent takes its orders from.
const WAKE: &str = "wake";

/// Bytes a stage's FIFO holds (the most an unprivileged process may ask for, by default).
const PIPE_SIZE: i32 = 1 << 20;

/// Bytes read from a FIFO at a time.
const CHUNK: usize = 256 * 1024;

/// The host side of a channel directory, held open.
#[derive(Debug)]
pub struct ChannelDir {
    path: PathBuf,
    dir: OwnedFd,
}

fn failed(path: &Path, what: &str, err: impl std::fmt::Display) -> Error {
    Error::system(format!(
        "channel directory {}: {what}: {err}",
        path.display()
    ))
}

impl ChannelDir {
    /// Makes `path` afresh, removing what an earlier attempt left: an empty directory of the
    /// driver's user, mode 0711, below a parent made private (0700), holding `wake`.
    pub fn create(path: &Path) -> Result<ChannelDir> {
        let parent = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|err| failed(path, "cannot create", err))?;
        std::fs::set_permissions(parent, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|err| failed(path, "cannot make its parent private", err))?;
        ChannelDir::remove(path);
        let name = path
            .file_name()
            .ok_or_else(|| failed(path, "invalid", "no file name"))?;
        let parent_fd = open_dir(parent).map_err(|err| failed(path, "cannot open", err))?;
        mkdirat(&parent_fd, name, Mode::from_bits_truncate(0o700))
            .map_err(|err| failed(path, "cannot create", err))?;
        let dir = open_dir(path).map_err(|err| failed(path, "cannot open", err))?;
        fchmod(&dir, Mode::from_bits_truncate(0o711))
            .map_err(|err| failed(path, "cannot set its mode", err))?;
        let channel = ChannelDir {
            path: path.to_owned(),
            dir,
        };
        drop(channel.make_fifo(WAKE)?);
        Ok(channel)
    }

    /// Opens the directory that prepare made; `None` when there is none (stages then take
    /// another way). A directory the driver's user does not own, or that others may write to,
    /// is refused.
    pub fn open(path: &Path) -> Result<Option<ChannelDir>> {
        let dir = match open_dir(path) {
            Ok(dir) => dir,
            Err(Errno::ENOENT) => return Ok(None),
            Err(err) => return Err(failed(path, "cannot open", err)),
        };
        let stat = fstat(&dir).map_err(|err| failed(path, "cannot stat", err))?;
        if stat.st_uid != nix::unistd::geteuid().as_raw() || stat.st_mode & 0o022 != 0 {
            return Err(failed(
                path,
                "refused",
                "it is not the driver's own, or others may write to it",
            ));
        }
        Ok(Some(ChannelDir {
            path: path.to_owned(),
            dir,
        }))
    }

    /// Removes the directory at `path` and everything in it; one that is gone is fine. It
    /// never follows a symlink (`std::fs::remove_dir_all`).
    pub fn remove(path: &Path) {
        let _ = std::fs::remove_dir_all(path);
    }

    /// The host path, the source of the environment's mount.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the FIFO `name` for the environment and returns its read end.
    fn make_fifo(&self, name: &str) -> Result<OwnedFd> {
        let fail = |err: &dyn std::fmt::Display| failed(&self.path, name, err);
        mkfifoat(&self.dir, name, Mode::from_bits_truncate(0o600)).map_err(|err| fail(&err))?;
        let fifo = openat(
            &self.dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| fail(&err))?;
        fifo_stat(&fifo).map_err(|err| fail(&err))?;
        // A larger pipe lets the script write on while the driver passes the last bytes on:
        // fewer wake-ups on both sides. The default (64 KiB) works too.
        let _ = nix::fcntl::fcntl(&fifo, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        // Any user of the environment: which users an image has, and which host ids an
        // unprivileged container's users map to, is not the driver's to know. The directory
        // keeps everyone else out.
        fchmod(&fifo, Mode::from_bits_truncate(0o666)).map_err(|err| fail(&err))?;
        Ok(fifo)
    }

    /// Writes the stage's script, new (never an entry that is there already).
    fn write_script(&self, name: &str, script: &[u8]) -> Result<()> {
        let fail = |err: &dyn std::fmt::Display| failed(&self.path, name, err);
        let fd = openat(
            &self.dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|err| fail(&err))?;
        // It holds the job's secrets (§1.4): readable in the environment, and nowhere else
        // (see `make_fifo`).
        fchmod(&fd, Mode::from_bits_truncate(0o644)).map_err(|err| fail(&err))?;
        std::fs::File::from(fd)
            .write_all(script)
            .map_err(|err| fail(&err))
    }

    /// `wake` open for writing, or `None` when no agent reads it.
    pub(super) fn wake(&self) -> Result<Option<OwnedFd>> {
        match openat(
            &self.dir,
            WAKE,
            OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                fifo_stat(&fd).map_err(|err| failed(&self.path, WAKE, err))?;
                Ok(Some(fd))
            }
            Err(Errno::ENXIO) => Ok(None),
            Err(err) => Err(failed(&self.path, WAKE, err)),
        }
    }

    /// Sends the agent one order; `false` when no agent reads `wake`.
    async fn send(&self, order: &str) -> Result<bool> {
        let Some(wake) = self.wake()? else {
            return Ok(false);
        };
        let mut wake = std::fs::File::from(wake);
        let line = format!("\n{order}\n");
        // The leading newline ends whatever line a job left unfinished in the FIFO, so that
        // the agent drops that line, not this order. One write of a short line to a pipe is
        // atomic; it only waits when the job filled the pipe, and then boundedly.
        for _ in 0..100 {
            match wake.write(line.as_bytes()) {
                Ok(written) if written == line.len() => return Ok(true),
                Ok(_) => break,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(err) => return Err(failed(&self.path, WAKE, err)),
            }
        }
        Err(failed(
            &self.path,
            WAKE,
            "the stage agent does not take its orders (something in the job filled its FIFO)",
        ))
    }

    fn unlink(&self, name: &str) {
        let _ = unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir);
    }
}

fn open_dir(path: &Path) -> nix::Result<OwnedFd> {
    openat(
        nix::fcntl::AT_FDCWD,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Checks that the descriptor is a FIFO with one name, as the driver made it.
fn fifo_stat(fd: &impl AsFd) -> std::result::Result<(), String> {
    let stat = fstat(fd).map_err(|err| err.to_string())?;
    let is_fifo = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO;
    if !is_fifo || stat.st_nlink != 1 {
        return Err("not the FIFO the driver made".into());
    }
    Ok(())
}

/// A stage's files, removed when the stage's output is dropped.
struct StageFiles<'a> {
    dir: &'a ChannelDir,
    names: [String; 4],
}

impl Drop for StageFiles<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            self.dir.unlink(name);
        }
    }
}

/// A FIFO's read end that also holds a write end until the first bytes arrive, so that it
/// reads EOF only once the environment has opened it and every writer there has closed it.
struct FifoReader {
    receiver: pipe::Receiver,
    placeholder: Option<pipe::Sender>,
}

impl FifoReader {
    fn new(read_end: OwnedFd, dir: &ChannelDir, name: &str) -> Result<FifoReader> {
        let fail = |err: &dyn std::fmt::Display| failed(&dir.path, name, err);
        let receiver = pipe::Receiver::from_owned_fd(read_end).map_err(|err| fail(&err))?;
        let placeholder = openat(
            &dir.dir,
            name,
            OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| fail(&err))?;
        fifo_stat(&placeholder).map_err(|err| fail(&err))?;
        let placeholder = pipe::Sender::from_owned_fd(placeholder).map_err(|err| fail(&err))?;
        Ok(FifoReader {
            receiver,
            placeholder: Some(placeholder),
        })
    }
}

impl AsyncRead for FifoReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.receiver).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.placeholder = None;
        }
        polled
    }
}

/// A transport through a [`ChannelDir`] mounted in the environment, with its `serve` agent.
pub struct SharedDir<'a, E> {
    dir: ChannelDir,
    mount: String,
    shell: String,
    exec: &'a E,
}

impl<'a, E: Exec> SharedDir<'a, E> {
    /// The channel of `dir`, mounted at `mount` in `exec`'s environment, its scripts run by
    /// `shell` (§7). `exec` starts the agent where the environment's entrypoint did not.
    pub fn new(dir: ChannelDir, mount: &str, shell: &str, exec: &'a E) -> SharedDir<'a, E> {
        SharedDir {
            dir,
            mount: mount.to_owned(),
            shell: shell.to_owned(),
            exec,
        }
    }

    /// The host path of the channel directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl<E: Exec> Transport for SharedDir<'_, E> {
    fn describe(&self) -> String {
        self.exec.describe()
    }

    fn listening(&self) -> bool {
        matches!(self.dir.wake(), Ok(Some(_)))
    }

    async fn launch(&self) -> Result<()> {
        order(self.exec, &launch_argv(&self.mount, &self.shell)).await
    }

    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<Output<'_>> {
        let nonce = delivery.nonce;
        let files = StageFiles {
            dir: &self.dir,
            names: ["sh", "out", "err", "alive"].map(|suffix| format!("{nonce}.{suffix}")),
        };
        let [script, out, err, alive] = &files.names;
        let out = FifoReader::new(self.dir.make_fifo(out)?, &self.dir, out)?;
        let err = FifoReader::new(self.dir.make_fifo(err)?, &self.dir, err)?;
        let alive = FifoReader::new(self.dir.make_fifo(alive)?, &self.dir, alive)?;
        self.dir.write_script(script, delivery.script)?;
        if !self.dir.send(&format!("run {nonce}")).await? {
            return Err(Error::system(format!(
                "the stage agent in {} stopped listening",
                self.describe()
            )));
        }
        let chunks = |reader: FifoReader, stream: Stream| {
            ReaderStream::with_capacity(reader, CHUNK)
                .map(move |bytes| bytes.map(|bytes| Chunk { stream, bytes }))
        };
        let output =
            futures_util::stream::select(chunks(out, Stream::Stdout), chunks(err, Stream::Stderr));
        Ok(Box::pin(WithFiles {
            output,
            alive: Some(alive),
            _files: files,
        }))
    }

    /// The job reads the agent's orders itself (or stopped the agent without killing it):
    /// each later stage of the job runs as an exec instead, which the job cannot intercept.
    /// The directory goes; a late agent cannot act on an order whose FIFOs are gone, as it
    /// cannot make them again in its read-only mount.
    fn unanswered(&self) {
        progress!(
            "The stage channel of {} does not answer; the job's later stages each run as an exec",
            self.describe()
        );
        ChannelDir::remove(self.path());
    }

    /// Through the agent; through an exec when the agent is gone (the script may outlive it).
    async fn signal(&self, pgid: u32, signal: StopSignal) -> Result<()> {
        if self
            .dir
            .send(&format!("signal {} {pgid}", signal.name()))
            .await?
        {
            return Ok(());
        }
        order(self.exec, &signal_argv(signal.name(), pgid)).await
    }
}

/// The output, the stage's `alive` FIFO, and the stage's files that go with them.
struct WithFiles<'a, S> {
    output: S,
    /// Held open by the agent's waiter only; its end means the waiter is gone.
    alive: Option<FifoReader>,
    _files: StageFiles<'a>,
}

impl<S: futures_util::Stream<Item = io::Result<Chunk>> + Unpin> futures_util::Stream
    for WithFiles<'_, S>
{
    type Item = io::Result<Chunk>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // The output first: what the waiter wrote before it went is in the FIFOs already.
        match self.output.poll_next_unpin(cx) {
            Poll::Pending => {}
            Poll::Ready(Some(chunk)) => {
                // Bytes on the output mean the waiter had opened `alive` already.
                if let Some(alive) = &mut self.alive {
                    alive.placeholder = None;
                }
                return Poll::Ready(Some(chunk));
            }
            Poll::Ready(None) => return Poll::Ready(None),
        }
        let Some(alive) = &mut self.alive else {
            return Poll::Pending;
        };
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(alive).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            // Nobody writes to it: a byte is the job's, and ignored.
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(result) => {
                self.alive = None;
                let err = result
                    .err()
                    .unwrap_or_else(|| io::Error::other("the stage agent's waiter was killed"));
                Poll::Ready(Some(Err(err)))
            }
        }
    }
}
