//! Run stages without an exec per stage.
//!
//! podman's exec costs about 90 ms (conmon plus `runc exec`) before the script does anything,
//! measured in `benches/stages.rs`. So the job's containers run a small dispatcher as PID 1
//! instead of a bare keep-alive: a stage uploads its script with the archive API into the
//! dispatcher's queue directory and reads the output from an attach to the container. The
//! dispatcher runs one script at a time with the job's shell and ends its output on both
//! streams with a sentinel line holding a random nonce and the script's exit status, which the
//! driver removes from what it passes on. An attach and an upload cost a few milliseconds.
//!
//! Only stdout and stderr are attached: podman closes a container's stdin when an attach that
//! held it goes away, which would end the dispatcher.
//!
//! When the engine shares this host's file system (podman, or dockerd on the same host), the
//! output takes a shorter way: the driver makes two FIFOs in a host directory mounted at
//! `/drover-io`, and the dispatcher points the script's stdout and stderr at them, so bytes go
//! from the script to the driver without passing through the engine (which otherwise costs a
//! fifth of the throughput: two copies and a frame each 8 KiB in the API service). The
//! sentinel still comes through the attach. Where the FIFOs are not there (a remote engine),
//! the dispatcher writes to its own stdout and stderr and everything comes through the attach.

use std::borrow::Cow;
use std::path::Path;

use bollard::container::LogOutput;
use drover_core::fifo::{FIFO_CHUNK, Fifo, FifoAccess, read_some};
use drover_core::{Error, Result, Stream, write_all};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

/// Where the job's host FIFO directory is mounted in its containers.
pub const IO_DIR: &str = "/drover-io";

/// Where scripts are queued inside the container (`/tmp` is writable for any user).
pub const QUEUE: &str = "/tmp/drover-stages";

/// PID 1 of the job's containers: `$1` is the shell for the scripts. It polls its queue 100
/// times a second with bash's `read -t` on a FIFO, which forks nothing; without bash or
/// mkfifo it falls back to `sleep 0.05`. A stage directory holds `script`, then `ready`: the
/// archive is unpacked in order, so `ready` means the script is whole. TERM (the engine
/// stopping the container) ends it; `kill -1` from a cancel does not reach PID 1.
pub const DISPATCHER: &str = r#"q=/tmp/drover-stages
mkdir -p "$q" || exit 1
trap 'exit 0' TERM
if mkfifo "$q/.wake" 2>/dev/null; then exec 3<>"$q/.wake"; fi
while :; do
  for ready in "$q"/*/ready; do
    [ -e "$ready" ] || continue
    stage=${ready%/ready}
    nonce=${stage##*/}
    io=/drover-io/$nonce
    if [ -p "$io.out" ] && [ -p "$io.err" ]; then
      "$1" "$stage/script" </dev/null >"$io.out" 2>"$io.err"
    else
      "$1" "$stage/script" </dev/null
    fi
    status=$?
    rm -rf "$stage"
    printf '\n%s %s\n' "$nonce" "$status"
    printf '\n%s %s\n' "$nonce" "$status" >&2
  done
  read -t 0.01 -u 3 2>/dev/null
  [ $? -gt 128 ] || sleep 0.05
done"#;

/// Starts the dispatcher with bash when the image has it (for `read -t`), else with `sh`.
pub const LAUNCHER: &str = r#"if command -v bash >/dev/null 2>&1; then exec bash -c "$1" drover-dispatcher "$2"; else exec sh -c "$1" drover-dispatcher "$2"; fi"#;

/// Runs `script` with the dispatcher of `container` and returns its exit status, streaming
/// its output. `fifo_dir` is the host side of the container's `/drover-io`, when it has one.
/// On cancel every process but PID 1 is stopped, which ends the script; its sentinel still
/// arrives.
pub async fn run(
    engine: &Engine,
    container: &str,
    script: &[u8],
    fifo_dir: Option<&Path>,
    cancel: &CancellationToken,
) -> Result<i32> {
    let nonce = format!("drover-{:016x}", fastrand::u64(..));
    // Any user the image runs as must be able to write them; the directory is private.
    let fifo = |suffix: &str| -> Result<Option<Fifo>> {
        fifo_dir
            .map(|dir| Fifo::create(dir.join(format!("{nonce}.{suffix}")), FifoAccess::Anyone))
            .transpose()
    };
    let (mut out_fifo, mut err_fifo) = (fifo("out")?, fifo("err")?);
    // Attach first, so no output is missed.
    let mut output = engine.attach_output(container).await?;
    engine
        .upload(container, QUEUE, &stage_archive(&nonce, script)?)
        .await?;
    let mut stdout = Sentinel::new(&nonce);
    let mut stderr = Sentinel::new(&nonce);
    let mut stopping = false;
    let (mut out_buf, mut err_buf) = (vec![0u8; FIFO_CHUNK], vec![0u8; FIFO_CHUNK]);
    while stdout.status.is_none() || stderr.status.is_none() {
        tokio::select! {
            frame = output.next() => match frame {
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    let _ = write_all(Stream::Stdout, &stdout.feed(&message));
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    let _ = write_all(Stream::Stderr, &stderr.feed(&message));
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(err)) => return Err(Error::system(format!("output of {container}: {err}"))),
                None => return Err(Error::system(format!(
                    "container {container} stopped while running the script; was it removed or out of memory?"
                ))),
            },
            read = read_some(out_fifo.as_mut(), &mut out_buf) => {
                let _ = write_all(Stream::Stdout, &out_buf[..read]);
            }
            read = read_some(err_fifo.as_mut(), &mut err_buf) => {
                let _ = write_all(Stream::Stderr, &err_buf[..read]);
            }
            () = cancel.cancelled(), if !stopping => {
                stopping = true;
                engine.stop_processes(container).await;
            }
        }
    }
    // The script has exited: what it wrote is in the FIFOs' buffers already.
    for (fifo, stream) in [(&out_fifo, Stream::Stdout), (&err_fifo, Stream::Stderr)] {
        if let Some(fifo) = fifo {
            fifo.drain(stream, &mut out_buf);
        }
    }
    stdout
        .status
        .ok_or_else(|| Error::system("no exit status from the dispatcher"))
}

/// A tar holding `<nonce>/script` and then `<nonce>/ready`.
fn stage_archive(nonce: &str, script: &[u8]) -> Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    for (name, data) in [("script", script), ("ready", &b""[..])] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        // The script holds the job's secrets (§1.4): readable by its owner only.
        header.set_mode(0o600);
        header.set_cksum();
        archive
            .append_data(&mut header, format!("{nonce}/{name}"), data)
            .map_err(|err| Error::system(format!("cannot pack the script: {err}")))?;
    }
    archive
        .into_inner()
        .map_err(|err| Error::system(format!("cannot pack the script: {err}")))
}

/// Finds the dispatcher's `\n<nonce> <status>\n` in one stream and passes on everything
/// before it, byte for byte. Bytes that could be the start of the sentinel are held back until
/// the next frame shows they are not.
struct Sentinel {
    needle: Vec<u8>,
    held: Vec<u8>,
    tail: Option<Vec<u8>>,
    status: Option<i32>,
}

impl Sentinel {
    fn new(nonce: &str) -> Sentinel {
        Sentinel {
            needle: format!("\n{nonce} ").into_bytes(),
            held: Vec::new(),
            tail: None,
            status: None,
        }
    }

    /// Takes the next bytes of the stream; returns those that belong to the script. Without
    /// held bytes (nearly always) it borrows from `data` and copies nothing.
    fn feed<'a>(&mut self, data: &'a [u8]) -> Cow<'a, [u8]> {
        if self.status.is_some() {
            return Cow::Borrowed(&[]);
        }
        if let Some(tail) = &mut self.tail {
            tail.extend_from_slice(data);
            self.parse_tail();
            return Cow::Borrowed(&[]);
        }
        let joined: Cow<'a, [u8]> = if self.held.is_empty() {
            Cow::Borrowed(data)
        } else {
            let mut joined = std::mem::take(&mut self.held);
            joined.extend_from_slice(data);
            Cow::Owned(joined)
        };
        if let Some(at) = find(&joined, &self.needle) {
            self.tail = Some(joined[at + self.needle.len()..].to_vec());
            self.parse_tail();
            return prefix(joined, at);
        }
        let keep = longest_suffix_prefix(&joined, &self.needle);
        let pass = joined.len() - keep;
        self.held = joined[pass..].to_vec();
        prefix(joined, pass)
    }

    fn parse_tail(&mut self) {
        let Some(tail) = &self.tail else { return };
        if let Some(end) = tail.iter().position(|b| *b == b'\n') {
            // A malformed status cannot come from the dispatcher; treat it as a failure.
            self.status = Some(
                std::str::from_utf8(&tail[..end])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1),
            );
        }
    }
}

/// The first `len` bytes, borrowed when `bytes` is.
fn prefix(bytes: Cow<'_, [u8]>, len: usize) -> Cow<'_, [u8]> {
    match bytes {
        Cow::Borrowed(bytes) => Cow::Borrowed(&bytes[..len]),
        Cow::Owned(mut bytes) => {
            bytes.truncate(len);
            Cow::Owned(bytes)
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut from = 0;
    while let Some(offset) = haystack[from..].iter().position(|b| *b == first) {
        let at = from + offset;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The length of the longest end of `data` that is a proper start of `needle`.
fn longest_suffix_prefix(data: &[u8], needle: &[u8]) -> usize {
    (1..needle.len().min(data.len() + 1))
        .rev()
        .find(|&n| data.ends_with(&needle[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> (Vec<u8>, Option<i32>) {
        let mut sentinel = Sentinel::new("drover-00ff");
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&sentinel.feed(chunk));
        }
        (out, sentinel.status)
    }

    #[test]
    fn output_before_the_sentinel_passes_byte_exact() {
        let (out, status) = feed_all(&[b"hello\xff", b" world", b"\ndrover-00ff 3\n"]);
        assert_eq!(out, b"hello\xff world");
        assert_eq!(status, Some(3));
    }

    #[test]
    fn a_sentinel_split_across_frames_is_found() {
        let (out, status) = feed_all(&[b"line\n", b"\ndrov", b"er-00", b"ff 12", b"7\n"]);
        assert_eq!(out, b"line\n");
        assert_eq!(status, Some(127));
    }

    #[test]
    fn lookalikes_pass_through() {
        let (out, status) =
            feed_all(&[b"\ndrover-00fe 1\n\ndrover-", b"x\n", b"\ndrover-00ff 0\n"]);
        assert_eq!(out, b"\ndrover-00fe 1\n\ndrover-x\n");
        assert_eq!(status, Some(0));
    }

    #[test]
    fn nothing_is_held_forever_without_a_sentinel() {
        let mut sentinel = Sentinel::new("drover-00ff");
        assert_eq!(&*sentinel.feed(b"abc\n"), b"abc");
        assert_eq!(&*sentinel.feed(b"def"), b"\ndef");
        assert_eq!(sentinel.status, None);
    }

    #[test]
    fn the_archive_holds_the_script_before_the_ready_marker() {
        let bytes = stage_archive("drover-1", b"echo hi\n").expect("archive");
        let mut archive = tar::Archive::new(&bytes[..]);
        let names: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["drover-1/script", "drover-1/ready"]);
    }
}
