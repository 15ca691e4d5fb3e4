//! SSH into a job environment (a cloud instance, a VM): the stage channel's transport for
//! environments that only offer SSH.
//!
//! Every stage is a process of its own (§1.4), and a fresh SSH connection per stage costs a
//! key exchange and an authentication each time. So prepare opens **one** OpenSSH connection
//! per environment, a control master ([`Ssh::connect`]), and every later stage process opens a
//! channel on it through its control socket ([`Exec`] for [`Ssh`]), speaking OpenSSH's
//! multiplexing protocol itself: a stage costs less than `ssh host true` over the open
//! connection, as it starts no `ssh` client at all. The master runs in a session of its own
//! with its stdio away from the runner's pipes (§10 item 4), so it outlives the stage that
//! started it and never holds a stage open; cleanup ends it ([`Ssh::close`]). When it is gone
//! (the runner host restarted, the connection dropped), the next stage connects again.
//!
//! The host key is pinned on first contact: each environment has a known-hosts file of its
//! own, written when prepare first connects, under a name of the driver's (the instance id,
//! never an address that may be reused), and every later connection must present the same
//! key or fails. The client reads no configuration but the operator's own file when one is
//! given, so nothing on the runner host changes what the driver connects to.
//!
//! Keys: [`make_key`] makes an ed25519 key pair (per environment, or per launch of several);
//! its public half goes to the environment by whatever the backend offers (cloud user data),
//! and the private half stays on the runner host, readable by the driver's user only.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

use crate::channel::{Chunk, Exec, Output};
use crate::{Error, Result, ResultExt, Stream};

/// How long one attempt to connect may take (TCP and the SSH handshake).
const CONNECT_TIMEOUT_SECS: u64 = 10;

/// Keepalives on the master: a connection that stops answering for this long (3 × 5 s) is
/// taken as dropped, so a vanished environment fails a stage in seconds, not at the job timeout.
const ALIVE_INTERVAL_SECS: u64 = 5;
const ALIVE_COUNT: u64 = 3;

/// How much of the master's log an error quotes.
const LOG_TAIL: usize = 400;

/// Where an environment's SSH server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The user to log in as.
    pub user: String,
    /// Its address or DNS name.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// A jump host (`[user@]host[:port]`, OpenSSH's `ProxyJump`), checked against the
    /// operator's own known hosts.
    pub jump: Option<String>,
}

/// Makes an ed25519 key pair at `dir/id_ed25519` (the directory made, private to the driver's
/// user) and returns its public key line, for the environment's `authorized_keys`.
pub async fn make_key(dir: &Path) -> Result<String> {
    make_private_dir(dir)?;
    let key = dir.join("id_ed25519");
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "drover"])
        .arg("-f")
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .await
        .or_system("cannot run ssh-keygen (is openssh-client installed?)")?;
    if !output.status.success() {
        return Err(Error::system(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .or_system(format_args!("cannot read {}.pub", key.display()))?;
    Ok(public.trim().to_owned())
}

fn make_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .or_system(format_args!("cannot create {}", dir.display()))
}

/// One environment's SSH connection (see the module docs). Its files live in one directory:
/// the key from [`make_key`], the pinned host key, the control socket and the master's log.
#[derive(Debug, Clone)]
pub struct Ssh {
    dir: PathBuf,
    key: PathBuf,
    name: String,
    target: SshTarget,
    config: Option<PathBuf>,
    describe: String,
}

impl Ssh {
    /// The connection to `target` for the environment `name` (its host key is pinned under
    /// this name), with its files in `dir` and the private key at `key` (from [`make_key`]);
    /// `config` is the operator's OpenSSH client configuration, if any. `describe` names it
    /// in messages (`instance i-0abc`).
    pub fn new(
        dir: &Path,
        key: &Path,
        name: &str,
        target: SshTarget,
        config: Option<&Path>,
        describe: String,
    ) -> Ssh {
        Ssh {
            dir: dir.to_owned(),
            key: key.to_owned(),
            name: name.to_owned(),
            target,
            config: config.map(Path::to_owned),
            describe,
        }
    }

    /// Where the environment's SSH server is.
    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control")
    }

    fn master_log(&self) -> PathBuf {
        self.dir.join("master.log")
    }

    /// Whether the host key has been pinned (the environment was reached once).
    pub fn pinned(&self) -> bool {
        std::fs::metadata(self.dir.join("known_hosts")).is_ok_and(|meta| meta.len() > 0)
    }

    /// The options of every `ssh` the driver runs for this environment.
    fn options(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut option = |text: String| {
            args.push("-o".into());
            args.push(text.into());
        };
        let file = |name: &str| self.dir.join(name).display().to_string();
        option("BatchMode=yes".into());
        option("IdentitiesOnly=yes".into());
        option(format!("IdentityFile={}", self.key.display()));
        option(format!("UserKnownHostsFile={}", file("known_hosts")));
        option("GlobalKnownHostsFile=/dev/null".into());
        option(format!("HostKeyAlias={}", self.name));
        // Pinned on first contact; a changed key afterwards fails the connection.
        option("StrictHostKeyChecking=accept-new".into());
        option(format!("ControlPath={}", self.control().display()));
        option(format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}"));
        option(format!("ServerAliveInterval={ALIVE_INTERVAL_SECS}"));
        option(format!("ServerAliveCountMax={ALIVE_COUNT}"));
        option("LogLevel=ERROR".into());
        option(format!("User={}", self.target.user));
        option(format!("Port={}", self.target.port));
        if let Some(jump) = &self.target.jump {
            option(format!("ProxyJump={jump}"));
        }
        let mut all: Vec<OsString> = vec!["-F".into()];
        all.push(
            self.config
                .as_deref()
                .unwrap_or(Path::new("/dev/null"))
                .into(),
        );
        all.extend(args);
        all
    }

    /// Whether a master connection is up: something listens on its control socket. A master
    /// that was killed, or the runner host's restart, leaves a socket file nobody listens on.
    pub fn connected(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.control()).is_ok()
    }

    /// Opens the master connection, trying again until `deadline` while the environment does
    /// not answer yet or refuses the key (it is still booting, its key not yet installed).
    /// A host key other than the pinned one fails at once.
    pub async fn connect(&self, deadline: Instant, cancel: &CancellationToken) -> Result<()> {
        make_private_dir(&self.dir)?;
        let mut pause = Duration::from_millis(200);
        loop {
            let last = match self.try_connect(deadline).await? {
                None => return Ok(()),
                Some(last) => last,
            };
            if last.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
                || last.contains("Host key verification failed")
            {
                return Err(self.refused_host_key(&last));
            }
            if Instant::now() + pause >= deadline || cancel.is_cancelled() {
                let why = if last.is_empty() { "no answer" } else { &last };
                return Err(Error::system(format!(
                    "cannot reach {} over SSH at {}:{}: {why}",
                    self.describe, self.target.host, self.target.port
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = cancel.cancelled() => {}
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// The error for a host key the client refused. The environment's own key is taken on
    /// first contact, so a refusal is either of a key other than the pinned one (the client
    /// names the environment by its alias then) or of the jump host's, which only the
    /// operator's known hosts vouch for.
    fn refused_host_key(&self, said: &str) -> Error {
        match &self.target.jump {
            Some(jump) if !said.contains(&self.name) => Error::system(format!(
                "the jump host {jump} presented a host key the operator's known hosts do not hold (add it there, or to the file named in the ssh_config setting); ssh said: {said}"
            )),
            _ => Error::system(format!(
                "{} presented another host key than on first contact (pinned in {}); refusing to connect",
                self.describe,
                self.dir.join("known_hosts").display()
            )),
        }
    }

    /// One attempt: `None` once connected, else what the client said.
    async fn try_connect(&self, deadline: Instant) -> Result<Option<String>> {
        // A stale socket would keep the new master from listening.
        let _ = std::fs::remove_file(self.control());
        let log = std::fs::File::create(self.master_log()).or_system(format_args!(
            "cannot create {}",
            self.master_log().display()
        ))?;
        // `-f`: the client forks once authenticated and the parent exits, so its status says
        // whether the master is up. The master keeps only the log file: no pipe of ours.
        let mut child = Command::new("ssh")
            .args(self.options())
            .args([
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=no",
                "-f",
                "-N",
            ])
            .arg(&self.target.host)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .or_system("cannot run ssh (is openssh-client installed?)")?;
        let bound = Instant::now() + Duration::from_secs(CONNECT_TIMEOUT_SECS * 3);
        let status = tokio::time::timeout_at(bound.min(deadline), child.wait()).await;
        let log = std::fs::read(self.master_log()).unwrap_or_default();
        let text = String::from_utf8_lossy(&log[log.len().saturating_sub(LOG_TAIL)..])
            .trim()
            .replace('\n', "; ");
        match status {
            Ok(Ok(status)) if status.success() => Ok(None),
            Ok(Ok(_)) => Ok(Some(text)),
            Ok(Err(err)) => Err(Error::system(format!("waiting for ssh: {err}"))),
            Err(_) => Ok(Some(format!("no SSH handshake within the bound ({text})"))),
        }
    }

    /// Makes sure a master is up, connecting again (to the pinned host key) when it is gone.
    pub async fn ensure(&self, within: Duration, cancel: &CancellationToken) -> Result<()> {
        if self.connected() {
            return Ok(());
        }
        self.connect(Instant::now() + within, cancel)
            .await
            .map_err(|err| {
                err.context(format_args!("the connection to {} was lost", self.describe))
            })
    }

    /// Ends the master connection (nothing to do when there is none).
    pub async fn close(&self) {
        if !self.connected() {
            return;
        }
        let exit = Command::new("ssh")
            .args(self.options())
            .args(["-O", "exit"])
            .arg(&self.target.host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(10), exit).await;
        let _ = std::fs::remove_file(self.control());
    }
}

/// Quotes `arg` for the remote user's shell, which is what runs an SSH command line.
fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

impl Exec for Ssh {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    /// Opens a session on the master through its control socket, speaking OpenSSH's
    /// multiplexing protocol in-process: a stage then costs no `ssh` client of its own, only
    /// the channel (the master gets the ends of three pipes, the remote command's stdio).
    async fn exec(&self, argv: &[String], stdin: Bytes) -> Result<Output<'_>> {
        use openssh_mux_client::{Connection, NonZeroByteSlice, NonZeroByteVec, Session};
        use std::borrow::Cow;
        use std::os::fd::{AsRawFd, OwnedFd};
        use tokio::net::unix::pipe;

        let command = argv
            .iter()
            .map(|arg| quote(arg))
            .collect::<Vec<_>>()
            .join(" ");
        let lost = |what: &dyn std::fmt::Display| {
            Error::system(format!(
                "cannot open a session on the SSH connection to {}: {what}",
                self.describe
            ))
        };
        // (read end, write end), neither inherited by a program the driver starts.
        let pipes = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|err| lost(&format_args!("no pipe: {err}")))
        };
        let (remote_in, local_in) = pipes()?;
        let (local_out, remote_out) = pipes()?;
        let (local_err, remote_err) = pipes()?;
        let session = Session::builder()
            .term(Cow::Borrowed(
                NonZeroByteSlice::new(b"").expect("no NUL in an empty string"),
            ))
            .cmd(Cow::Owned(NonZeroByteVec::from_bytes_remove_nul(
                command.into_bytes(),
            )))
            .build();
        let open = async {
            Connection::connect(self.control())
                .await?
                .open_new_session(
                    &session,
                    &[
                        remote_in.as_raw_fd(),
                        remote_out.as_raw_fd(),
                        remote_err.as_raw_fd(),
                    ],
                )
                .await
        };
        let established = tokio::time::timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS), open)
            .await
            .map_err(|_| lost(&"the master did not answer"))?
            .map_err(|err| lost(&err))?;
        // The master holds its own copies now: the output ends when the remote command's does.
        drop((remote_in, remote_out, remote_err));
        let pipe_error = |err: std::io::Error| lost(&format_args!("pipe: {err}"));
        let mut input = pipe::Sender::from_owned_fd(local_in).map_err(pipe_error)?;
        let receiver = |end: OwnedFd| pipe::Receiver::from_owned_fd(end).map_err(pipe_error);
        let (stdout, stderr) = (receiver(local_out)?, receiver(local_err)?);
        // The input is written while the output is read: a script larger than a pipe's
        // buffer must not wait for an output nobody reads yet.
        let feed = async move {
            let _ = input.write_all(&stdin).await;
            let _ = input.shutdown().await;
        };
        let outputs = futures_util::stream::select(
            ReaderStream::new(stdout).map(|bytes| {
                bytes.map(|bytes| Chunk {
                    stream: Stream::Stdout,
                    bytes,
                })
            }),
            ReaderStream::new(stderr).map(|bytes| {
                bytes.map(|bytes| Chunk {
                    stream: Stream::Stderr,
                    bytes,
                })
            }),
        );
        let fed = futures_util::stream::once(feed).filter_map(|()| async { None });
        // The session lives as long as its connection to the master: it is held until the
        // output has ended, then its exit message is read.
        let ended = futures_util::stream::once(async move {
            let _ = established.wait().await;
        })
        .filter_map(|()| async { None });
        Ok(Box::pin(
            futures_util::stream::select(fed, outputs).chain(ended),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting_survives_the_remote_shell() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
