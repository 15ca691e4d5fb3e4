//! A driver's state directory on the runner host: one lock for the decisions that must not
//! race, and files replaced whole so a killed driver never leaves one half written.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{Error, Result, ResultExt};

/// How long a driver waits for another's [`StateLock`]: it is held for a few backend calls.
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// The driver's lock on its state directory (`<dir>/lock`, flock), held while a stage makes a
/// decision two jobs must not make at once (which cache disk, which ready VM or instance) and
/// while gc looks, so gc never sees a resource half made. Released on drop; the kernel
/// releases it when a killed driver's process ends.
#[derive(Debug)]
pub struct StateLock {
    _held: nix::fcntl::Flock<std::fs::File>,
}

impl StateLock {
    /// Takes the lock of `state_dir` (made if missing), waiting up to a minute for another
    /// driver process to release it.
    pub async fn acquire(state_dir: &Path) -> Result<StateLock> {
        std::fs::create_dir_all(state_dir)
            .or_system(format_args!("cannot create {}", state_dir.display()))?;
        let path = state_dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .or_system(format_args!("cannot open {}", path.display()))?;
        let started = Instant::now();
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(StateLock { _held: lock }),
                Err((back, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < LOCK_TIMEOUT => {
                    file = back;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err((_, errno)) => {
                    return Err(Error::system(format!(
                        "cannot lock {} within {} s: {errno} (another driver process holds it)",
                        path.display(),
                        LOCK_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }
}

/// Replaces `path` with `bytes`: written to a temporary file beside it, synced, then renamed
/// over it, so a reader (or a driver killed midway) sees the old content or the new, never a
/// mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().or_system(format_args!("cannot write {}", path.display()))
}
