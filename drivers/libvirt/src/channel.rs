//! The stage channel's transport to a VM: three virtio-serial ports, served on the host by
//! QEMU as unix sockets, and `drover-guest-agent` on the guest's end (see
//! `guest/drover-guest-agent` for its side of the protocol).
//!
//! Why virtio-serial and not SSH: it needs no network in the guest (a job may have none, or
//! break its own), no key, no sshd and no host-key trust, and nothing in the guest can reach the
//! sockets except through the three ports: the guest writes bytes, the driver reads them,
//! bounded. A round trip costs a few milliseconds instead of an SSH handshake per connection.
//!
//! Per stage the driver connects all three sockets, writes `run NONCE SHELL AGENTLEN SCRIPTLEN`
//! and then the core's stage agent and the script on the control port, and reads the stage's
//! streams from the other two. The guest's writes block while no host end is connected (the
//! guest kernel waits for the port to open), so nothing the stage writes is lost between
//! stages; what a late writer of an earlier stage left comes before this stage's start line and
//! the core discards it. The control port also brings `gone NONCE` when the job killed the
//! stage's waiter, which ends the stage at once.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use drover_core::channel::{AGENT, Chunk, Delivery, Output, StopSignal, Transport};
use drover_core::{Error, Result, Stream};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

/// How much of a stream is read at a time.
const READ_SIZE: usize = 64 * 1024;

/// The longest control line the driver reads; longer ones are the job's noise and skipped.
const MAX_LINE: usize = 256;

/// How long connecting to a port's socket may take: QEMU accepts at once, so this only bounds
/// a QEMU that hangs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The host sockets of a VM's ports, as prepare found them in the running domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sockets {
    /// Orders and replies.
    pub ctl: PathBuf,
    /// The stages' stdout.
    pub out: PathBuf,
    /// The stages' stderr.
    pub err: PathBuf,
}

/// The transport of one job's VM.
pub struct Serial {
    vm: String,
    sockets: Sockets,
    shell: String,
    /// The control port's write half while a stage runs, for signals.
    ctl: Mutex<Option<OwnedWriteHalf>>,
}

impl Serial {
    /// The transport to VM `vm` through `sockets`, running scripts with `shell`.
    pub fn new(vm: &str, sockets: Sockets, shell: &str) -> Serial {
        Serial {
            vm: vm.to_owned(),
            sockets,
            shell: shell.to_owned(),
            ctl: Mutex::new(None),
        }
    }

    async fn connect(&self, path: &PathBuf) -> Result<UnixStream> {
        let what = || format!("the stage channel of VM {} ({})", self.vm, path.display());
        match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(err)) => Err(Error::system(format!("{}: {err}", what()))),
            Err(_) => Err(Error::system(format!(
                "{}: QEMU did not accept within {} s",
                what(),
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Asks the guest agent `hello NONCE` and waits for its answer, for at most `timeout`.
    /// `Ok(false)`: no answer yet (the guest still boots).
    pub async fn hello(&self, nonce: &str, timeout: Duration) -> Result<bool> {
        let stream = self.connect(&self.sockets.ctl).await?;
        let (read, mut write) = stream.into_split();
        let mut lines = Lines::new(read);
        let answer = async {
            write
                .write_all(format!("hello {nonce}\n").as_bytes())
                .await?;
            let want = format!("hello {nonce}");
            while let Some(line) = lines.next().await? {
                if line == want.as_bytes() {
                    return Ok(true);
                }
            }
            Ok::<_, io::Error>(false)
        };
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(answered)) => Ok(answered),
            Ok(Err(err)) => Err(Error::system(format!(
                "the stage channel of VM {}: {err}",
                self.vm
            ))),
            Err(_) => Ok(false),
        }
    }
}

impl Transport for Serial {
    fn describe(&self) -> String {
        format!("VM {}", self.vm)
    }

    /// The guest's init keeps the agent running, and a stage waits for it: a stage delivered
    /// while the agent restarts is read once it is back.
    fn listening(&self) -> bool {
        true
    }

    async fn launch(&self) -> Result<()> {
        Ok(())
    }

    async fn deliver(&self, delivery: &Delivery<'_>) -> Result<Output<'_>> {
        // The output ports first: the stage's start line must find them connected.
        let out = self.connect(&self.sockets.out).await?;
        let err = self.connect(&self.sockets.err).await?;
        let (ctl_read, mut ctl_write) = self.connect(&self.sockets.ctl).await?.into_split();
        let order = format!(
            "run {} {} {} {}\n",
            delivery.nonce,
            self.shell,
            AGENT.len(),
            delivery.script.len()
        );
        let written = async {
            ctl_write.write_all(order.as_bytes()).await?;
            ctl_write.write_all(AGENT.as_bytes()).await?;
            ctl_write.write_all(delivery.script).await
        };
        written
            .await
            .map_err(|e| Error::system(format!("cannot hand the stage to VM {}: {e}", self.vm)))?;
        *self.ctl.lock().await = Some(ctl_write);
        let gone = format!("gone {}", delivery.nonce).into_bytes();
        let state = Follow {
            out: Some(out),
            err: Some(err),
            ctl: Some(Lines::new(ctl_read)),
            gone,
            out_buf: BytesMut::new(),
            err_buf: BytesMut::new(),
        };
        Ok(Box::pin(futures_util::stream::unfold(state, Follow::next)))
    }

    async fn signal(&self, pgid: u32, signal: StopSignal) -> Result<()> {
        let mut ctl = self.ctl.lock().await;
        let Some(ctl) = ctl.as_mut() else {
            return Err(Error::system(format!(
                "no stage runs in VM {} to signal",
                self.vm
            )));
        };
        ctl.write_all(format!("signal {} {pgid}\n", signal.name()).as_bytes())
            .await
            .map_err(|e| Error::system(format!("cannot signal VM {}: {e}", self.vm)))
    }
}

/// The state of a stage's output: what is still open.
struct Follow {
    out: Option<UnixStream>,
    err: Option<UnixStream>,
    ctl: Option<Lines>,
    gone: Vec<u8>,
    out_buf: BytesMut,
    err_buf: BytesMut,
}

impl Follow {
    async fn next(mut self) -> Option<(io::Result<Chunk>, Follow)> {
        loop {
            for buf in [&mut self.out_buf, &mut self.err_buf] {
                buf.reserve(READ_SIZE);
            }
            if self.out.is_none() && self.err.is_none() {
                return None;
            }
            tokio::select! {
                read = read_into(&mut self.out, &mut self.out_buf), if self.out.is_some() => {
                    match read {
                        Ok(0) => self.out = None,
                        Ok(_) => return Some((Ok(chunk(Stream::Stdout, self.out_buf.split().freeze())), self)),
                        Err(err) => return Some((Err(err), self)),
                    }
                }
                read = read_into(&mut self.err, &mut self.err_buf), if self.err.is_some() => {
                    match read {
                        Ok(0) => self.err = None,
                        Ok(_) => return Some((Ok(chunk(Stream::Stderr, self.err_buf.split().freeze())), self)),
                        Err(err) => return Some((Err(err), self)),
                    }
                }
                line = next_line(&mut self.ctl), if self.ctl.is_some() => {
                    match line {
                        // The job killed the stage's waiter: no exit line can come.
                        Ok(Some(line)) if line == self.gone => return None,
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => self.ctl = None,
                    }
                }
            }
        }
    }
}

fn chunk(stream: Stream, bytes: Bytes) -> Chunk {
    Chunk { stream, bytes }
}

async fn read_into(stream: &mut Option<UnixStream>, buf: &mut BytesMut) -> io::Result<usize> {
    match stream {
        Some(stream) => stream.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

async fn next_line(lines: &mut Option<Lines>) -> io::Result<Option<Vec<u8>>> {
    match lines {
        Some(lines) => lines.next().await,
        None => std::future::pending().await,
    }
}

/// Lines of the control port, each at most [`MAX_LINE`] bytes; longer ones are skipped.
struct Lines {
    read: OwnedReadHalf,
    buf: Vec<u8>,
    skipping: bool,
}

impl Lines {
    fn new(read: OwnedReadHalf) -> Lines {
        Lines {
            read,
            buf: Vec::new(),
            skipping: false,
        }
    }

    /// The next line without its newline; `None` at the end. Cancel safe: what was read stays
    /// in the buffer.
    async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).take(end).collect();
                if std::mem::take(&mut self.skipping) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.buf.len() > MAX_LINE {
                self.buf.clear();
                self.skipping = true;
            }
            let mut chunk = [0u8; 512];
            let read = self.read.read(&mut chunk).await?;
            if read == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..read]);
        }
    }
}
