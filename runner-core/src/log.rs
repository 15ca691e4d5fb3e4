//! The job log: what a driver writes to its stdout and stderr, which the runner streams into
//! the job's trace as it arrives (§1.3, §1.4).
//!
//! Rust's `std::io::Stdout` is line-buffered (§10 item 5), so bytes without a newline would
//! wait, and a SIGKILL would lose them. Everything here writes straight to file descriptors 1
//! and 2, unbuffered, byte for byte.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Mutex, OnceLock};

/// One of the driver's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// File descriptor 1.
    Stdout,
    /// File descriptor 2.
    Stderr,
}

struct Sinks {
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
}

fn sinks() -> &'static Sinks {
    static SINKS: OnceLock<Sinks> = OnceLock::new();
    SINKS.get_or_init(|| Sinks {
        stdout: Mutex::new(
            io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(File::from),
        ),
        stderr: Mutex::new(
            io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(File::from),
        ),
    })
}

/// Writes `bytes` to the stream at once, unbuffered. Concurrent writers never interleave
/// within one call.
pub fn write_all(stream: Stream, bytes: &[u8]) -> io::Result<()> {
    let sinks = sinks();
    let sink = match stream {
        Stream::Stdout => &sinks.stdout,
        Stream::Stderr => &sinks.stderr,
    };
    let mut guard = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match guard.as_mut() {
        Some(file) => file.write_all(bytes),
        None => Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "stream is closed",
        )),
    }
}

/// A duplicate of the stream's file descriptor, for copying a child's output with
/// `io::copy` (which splices pipe to pipe on Linux, without a userspace buffer).
pub(crate) fn sink_file(stream: Stream) -> io::Result<File> {
    let sinks = sinks();
    let sink = match stream {
        Stream::Stdout => &sinks.stdout,
        Stream::Stderr => &sinks.stderr,
    };
    let guard = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    guard
        .as_ref()
        .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream is closed"))?
        .try_clone()
}

/// Writes one progress line to stderr, which the runner shows in the job log for every stage
/// but cleanup (§1.3, §1.5). No timestamp: runners from 18.7 add their own (§1.4). Failures to write are ignored, since the log
/// is the only place to report them.
pub fn progress(message: fmt::Arguments<'_>) {
    let _ = write_all(Stream::Stderr, format!("{message}\n").as_bytes());
}

/// Writes the one-line error the job log ends with, in the runner's own `ERROR:` style.
pub(crate) fn error_line(driver: &str, message: &dyn fmt::Display) {
    progress(format_args!("ERROR: {driver}: {message}"));
}
