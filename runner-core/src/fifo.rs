//! Named pipes on the host that a job environment sharing this host's file system (a container,
//! through a bind mount or disk device) writes a stage's output into, so the bytes reach the
//! driver without a hop through the backend's API. Drivers use them for their fast stage path.

use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::{Error, Result, Stream, write_all};

/// Bytes read from a FIFO at a time (a pipe holds 64 KiB).
pub const FIFO_CHUNK: usize = 64 * 1024;

/// Who may open a FIFO from inside the job environment.
#[derive(Debug, Clone, Copy)]
pub enum FifoAccess {
    /// Any user (mode 0666), for a directory that is private already.
    Anyone,
    /// Only this host user and group (mode 0600), e.g. the host uid of an unprivileged
    /// container's root.
    Owner(u32, u32),
}

/// A FIFO at a host path, open for reading, removed when dropped.
pub struct Fifo {
    path: PathBuf,
    receiver: pipe::Receiver,
}

impl Fifo {
    /// Makes the FIFO at `path` and opens it read-write: opening never waits for the writer,
    /// and reads never see EOF before the writer has opened its end.
    pub fn create(path: PathBuf, access: FifoAccess) -> Result<Fifo> {
        let fail = |path: &Path, err: &dyn std::fmt::Display| {
            Error::system(format!("FIFO {}: {err}", path.display()))
        };
        nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600))
            .map_err(|err| fail(&path, &err))?;
        let receiver = match pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&path)
        {
            Ok(receiver) => receiver,
            Err(err) => {
                let _ = std::fs::remove_file(&path);
                return Err(fail(&path, &err));
            }
        };
        // From here on the file is removed on every error (dropping `fifo`).
        let fifo = Fifo { path, receiver };
        let fail = |err: &dyn std::fmt::Display| fail(&fifo.path, err);
        // Through the open descriptor, never the path: whoever may write in the directory
        // (the job) could swap the path for a symlink to a host file meanwhile.
        match access {
            FifoAccess::Anyone => {
                nix::sys::stat::fchmod(&fifo.receiver, Mode::from_bits_truncate(0o666))
                    .map_err(|err| fail(&err))?;
            }
            FifoAccess::Owner(uid, gid) => {
                nix::unistd::fchown(
                    &fifo.receiver,
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(gid)),
                )
                .map_err(|err| fail(&err))?;
            }
        }
        Ok(fifo)
    }

    /// The FIFO's host path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for bytes; never completes without one (a failed read ends nothing: the caller's
    /// own end-of-stage signal decides when the stage is over).
    pub async fn read(&mut self, buf: &mut [u8]) -> usize {
        match self.receiver.read(buf).await {
            Ok(read) if read > 0 => read,
            _ => std::future::pending().await,
        }
    }

    /// Passes on to `stream` what is in the FIFO now, without waiting for more.
    pub fn drain(&self, stream: Stream, buf: &mut [u8]) {
        while let Ok(read) = self.receiver.try_read(buf) {
            if read == 0 {
                break;
            }
            let _ = write_all(stream, &buf[..read]);
        }
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits for bytes in `fifo` when there is one; never completes otherwise.
pub async fn read_some(fifo: Option<&mut Fifo>, buf: &mut [u8]) -> usize {
    match fifo {
        Some(fifo) => fifo.read(buf).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[tokio::test]
    async fn bytes_written_by_another_opener_are_read_and_the_file_goes_with_the_fifo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        let mut fifo = Fifo::create(path.clone(), FifoAccess::Anyone).expect("fifo");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("stat").permissions(),
        );
        assert_eq!(mode & 0o777, 0o666);
        // Opening for writing does not block: the driver holds the read end already.
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open for writing");
        writer.write_all(b"hello").expect("write");
        let mut buf = [0u8; 16];
        let read = fifo.read(&mut buf).await;
        assert_eq!(&buf[..read], b"hello");
        drop(fifo);
        assert!(!path.exists(), "the FIFO is removed when dropped");
    }
}
