//! SIGTERM and SIGINT become a cancellation token (§6).
//!
//! The runner cancels a stage by sending SIGTERM to the driver's process group, and SIGKILL
//! after `graceful_kill_timeout` (§6.1). The core turns the first SIGTERM (or SIGINT, for a
//! person at a terminal) into a cancellation that the stage and every child it started
//! observe, instead of dying on the spot and leaving remote work running (§6.3).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// Installs the handlers and returns the token they cancel. Must run inside the runtime, and
/// as early as possible: a signal that arrives before this kills the driver outright.
pub(crate) fn install() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
        let mut stream = signal(kind)
            .map_err(|err| Error::system(format!("cannot install signal handler: {err}")))?;
        let token = token.clone();
        tokio::spawn(async move {
            if stream.recv().await.is_some() {
                token.cancel();
            }
        });
    }
    Ok(token)
}
