//! LXD's (and Incus's) REST API, over the local unix socket or over HTTPS to a remote daemon
//! (see `tls`): JSON requests through reqwest, background operations waited for, and exec
//! output through the operation's websockets. Errors name the endpoint or the call and say what
//! to fix; daemon errors (5xx) are transient.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_core::{Error, Result, Stream, write_all};
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::tls;

/// Sockets tried, in order, when the operator names none: Debian's LXD, the snap's, Incus's.
pub const DEFAULT_SOCKETS: &[&str] = &[
    "/var/lib/lxd/unix.socket",
    "/var/snap/lxd/common/lxd/unix.socket",
    "/var/lib/incus/unix.socket",
];

/// Seconds a background operation (create, start, stop, delete) may take.
const OPERATION_TIMEOUT_SECS: u64 = 120;

/// The port of `https://` endpoints that name none (LXD's default).
const DEFAULT_HTTPS_PORT: u16 = 8443;

/// A client of one LXD daemon.
#[derive(Clone)]
pub struct Lxd {
    http: reqwest::Client,
    transport: Transport,
    /// The socket or URL, for messages.
    pub endpoint: String,
}

/// How requests and websockets reach the daemon.
#[derive(Clone)]
enum Transport {
    Unix(PathBuf),
    Https {
        host: String,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
    },
}

/// A remote daemon: its `https://` URL and the client's credentials (see `tls`).
pub struct Remote<'a> {
    /// `https://host[:port]`.
    pub url: &'a str,
    /// PEM certificate the daemon trusts (`lxc config trust add`).
    pub client_cert: &'a Path,
    /// Its PEM private key.
    pub client_key: &'a Path,
    /// SHA-256 fingerprint of the daemon's certificate.
    pub server_fingerprint: &'a str,
}

impl Lxd {
    /// A client for the daemon at `remote` over HTTPS.
    pub fn connect_https(remote: &Remote<'_>) -> Result<Lxd> {
        let url = reqwest::Url::parse(remote.url)
            .ok()
            .filter(|url| url.scheme() == "https" && url.host_str().is_some())
            .ok_or_else(|| {
                Error::system(format!(
                    "url {:?} is not an https://host[:port] URL of an LXD daemon",
                    remote.url
                ))
            })?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let port = url.port().unwrap_or(DEFAULT_HTTPS_PORT);
        let tls = tls::client_config(
            remote.client_cert,
            remote.client_key,
            remote.server_fingerprint,
        )?;
        let endpoint = format!("https://{host}:{port}");
        let http = client_builder()
            .tls_backend_preconfigured((*tls).clone())
            .build()
            .map_err(|err| Error::system(format!("LXD client for {endpoint}: {err}")))?;
        Ok(Lxd {
            http,
            transport: Transport::Https { host, port, tls },
            endpoint,
        })
    }

    /// Whether the daemon shares this host's file system (a local socket).
    pub fn is_local(&self) -> bool {
        matches!(self.transport, Transport::Unix(_))
    }

    fn base(&self) -> &str {
        match self.transport {
            Transport::Unix(_) => "http://lxd",
            Transport::Https { .. } => &self.endpoint,
        }
    }

    /// A client for `socket`, or the first default socket that exists.
    pub fn connect(socket: Option<&Path>) -> Result<Lxd> {
        let socket = match socket {
            Some(path) => path.to_owned(),
            None => DEFAULT_SOCKETS
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .ok_or_else(|| {
                    Error::system(format!(
                        "no LXD or Incus socket found (tried {}); start the daemon or set [driver] socket",
                        DEFAULT_SOCKETS.join(", ")
                    ))
                })?,
        };
        let endpoint = socket.display().to_string();
        if !socket.exists() {
            return Err(Error::system(format!(
                "the LXD socket {endpoint} does not exist; start lxd (or incus) or fix [driver] socket"
            )));
        }
        let http = client_builder()
            .unix_socket(socket.clone())
            .build()
            .map_err(|err| Error::system(format!("LXD client for {endpoint}: {err}")))?;
        Ok(Lxd {
            http,
            transport: Transport::Unix(socket),
            endpoint,
        })
    }

    /// One API call; returns the response's `metadata`, or for a background operation the
    /// operation's path in `operation`.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base()));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|err| self.unreachable(&err))?;
        let status = response.status();
        let value: Value = response.json().await.map_err(|err| {
            Error::system(format!("LXD {method} {path}: unreadable answer: {err}"))
        })?;
        if value["type"] == "error" || !status.is_success() {
            let message = value["error"].as_str().unwrap_or("unknown error");
            let code = value["error_code"]
                .as_u64()
                .unwrap_or(u64::from(status.as_u16()));
            let err = format!("LXD {method} {path}: {message} ({code})");
            return Err(if code >= 500 {
                Error::transient(err)
            } else {
                Error::system(err)
            });
        }
        Ok(value)
    }

    fn unreachable(&self, err: &reqwest::Error) -> Error {
        // reqwest's own message ("error sending request") hides the cause, e.g. the TLS one.
        let mut message = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        let hint = match self.transport {
            Transport::Unix(_) => "is the daemon running (`lxd --group root` or the service)?",
            Transport::Https { .. } => {
                "is the daemon listening there (core.https_address), does it trust client_cert (`lxc config trust add`), and is server_fingerprint its certificate's?"
            }
        };
        Error::system(format!(
            "cannot reach LXD at {}: {message}; {hint}",
            self.endpoint
        ))
    }

    /// Waits for a background operation and returns its metadata; fails with its error.
    async fn wait(&self, answer: &Value) -> Result<Value> {
        // Synchronous answers (e.g. creating a custom volume) carry an empty operation.
        let Some(operation) = answer["operation"].as_str().filter(|op| !op.is_empty()) else {
            return Ok(answer["metadata"].clone());
        };
        let done = self
            .call(
                Method::GET,
                &format!("{operation}/wait?timeout={OPERATION_TIMEOUT_SECS}"),
                None,
            )
            .await?;
        let metadata = done["metadata"].clone();
        if metadata["status_code"].as_u64() != Some(200) {
            return Err(Error::system(format!(
                "LXD operation {}: {}",
                metadata["description"].as_str().unwrap_or(operation),
                metadata["err"].as_str().unwrap_or("failed")
            )));
        }
        Ok(metadata)
    }

    /// Checks the daemon answers; returns its name and version, e.g. `lxd 5.0.2`.
    pub async fn describe(&self) -> Result<String> {
        let info = self.call(Method::GET, "/1.0", None).await?;
        // An untrusted client is answered too, with next to nothing; every later call would
        // fail with a bare "not authorized".
        if info["metadata"]["auth"] == "untrusted" {
            return Err(Error::system(format!(
                "the LXD daemon at {} does not trust client_cert; on the server, `lxc config trust add` it",
                self.endpoint
            )));
        }
        let environment = &info["metadata"]["environment"];
        Ok(format!(
            "{} {}",
            environment["server"].as_str().unwrap_or("lxd"),
            environment["server_version"].as_str().unwrap_or("")
        ))
    }

    /// The full fingerprint of `image`, an alias or a fingerprint (or its unique start);
    /// None when the daemon has no such image.
    pub async fn image_fingerprint(&self, image: &str) -> Result<Option<String>> {
        if let Ok(alias) = self.get(&format!("/1.0/images/aliases/{image}")).await {
            return Ok(alias["target"].as_str().map(str::to_owned));
        }
        match self.get(&format!("/1.0/images/{image}")).await {
            Ok(found) => Ok(found["fingerprint"].as_str().map(str::to_owned)),
            Err(err) if err.to_string().contains("(404)") => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The instances a running operation works on (being created, started, deleted...).
    pub async fn busy_instances(&self) -> Result<Vec<String>> {
        let operations = self.get("/1.0/operations?recursion=1").await?;
        Ok(operations["running"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|operation| {
                operation["resources"]["instances"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|url| {
                let path = url.as_str()?.split('?').next()?;
                Some(path.strip_prefix("/1.0/instances/")?.to_owned())
            })
            .collect())
    }

    /// Renames a stopped instance; fails when it is busy or the new name is taken, so of two
    /// callers renaming the same instance exactly one succeeds.
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<()> {
        let body = json!({"name": new_name});
        self.call_and_wait(Method::POST, &format!("/1.0/instances/{name}"), Some(&body))
            .await
            .map(|_| ())
    }

    /// Replaces an instance's writable configuration (`PUT /1.0/instances/{name}`).
    pub async fn update(&self, name: &str, body: &Value) -> Result<()> {
        self.call_and_wait(Method::PUT, &format!("/1.0/instances/{name}"), Some(body))
            .await
            .map(|_| ())
    }

    /// Starts creating an instance from `body` and returns without waiting: the daemon
    /// finishes the operation on its own after this process has exited.
    pub async fn create_in_background(&self, body: &Value) -> Result<()> {
        self.call(Method::POST, "/1.0/instances", Some(body))
            .await
            .map(|_| ())
    }

    /// Starts deleting a stopped instance and returns without waiting.
    pub async fn delete_in_background(&self, name: &str) -> Result<()> {
        self.call(Method::DELETE, &format!("/1.0/instances/{name}"), None)
            .await
            .map(|_| ())
    }

    /// Makes the custom storage volume `name` in `pool` unless it exists.
    pub async fn ensure_volume(&self, pool: &str, name: &str) -> Result<()> {
        let path = format!("/1.0/storage-pools/{pool}/volumes/custom/{name}");
        if self.get(&path).await.is_ok() {
            return Ok(());
        }
        let body = json!({"name": name, "type": "custom", "content_type": "filesystem"});
        let created = self
            .call(
                Method::POST,
                &format!("/1.0/storage-pools/{pool}/volumes"),
                Some(&body),
            )
            .await;
        match created {
            Ok(answer) => self.wait(&answer).await.map(|_| ()),
            // A job of the same project made it meanwhile.
            Err(err) if err.to_string().contains("already exists") => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// One call, and its background operation waited for; returns the operation's metadata.
    async fn call_and_wait(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let answer = self.call(method, path, body).await?;
        self.wait(&answer).await
    }

    /// Creates an instance (not started) from `body` (`POST /1.0/instances`).
    pub async fn create(&self, body: &Value) -> Result<()> {
        self.call_and_wait(Method::POST, "/1.0/instances", Some(body))
            .await
            .map(|_| ())
    }

    /// Starts or stops an instance.
    pub async fn set_state(&self, name: &str, action: &str) -> Result<()> {
        let body = json!({"action": action, "timeout": 30, "force": true});
        let path = format!("/1.0/instances/{name}/state");
        self.call_and_wait(Method::PUT, &path, Some(&body))
            .await
            .map(|_| ())
    }

    /// Stops and deletes an instance; one that is already gone is fine (cleanup runs more
    /// than once, §6.3). An instance still being created by an attempt that was cancelled
    /// (LXD finishes the create on its own) is waited for, bounded.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_secs(OPERATION_TIMEOUT_SECS);
        loop {
            match self.try_delete(name).await {
                Err(err)
                    if err.to_string().contains("is busy")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_delete(&self, name: &str) -> Result<()> {
        match self.instance(name).await {
            Err(err) if err.to_string().contains("(404)") => return Ok(()),
            Err(err) => return Err(err),
            Ok(instance) => {
                if instance["status"] != "Stopped" {
                    self.set_state(name, "stop").await?;
                }
            }
        }
        self.call_and_wait(Method::DELETE, &format!("/1.0/instances/{name}"), None)
            .await
            .map(|_| ())
    }

    /// The metadata of any object of the API, e.g. `/1.0/profiles/default`.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let answer = self.call(Method::GET, path, None).await?;
        Ok(answer["metadata"].clone())
    }

    /// One instance with its config and devices.
    pub async fn instance(&self, name: &str) -> Result<Value> {
        self.get(&format!("/1.0/instances/{name}")).await
    }

    /// Every instance with its config.
    pub async fn instances(&self) -> Result<Vec<Value>> {
        let instances = self.get("/1.0/instances?recursion=1").await?;
        Ok(instances.as_array().cloned().unwrap_or_default())
    }

    /// Writes `bytes` to `path` in the instance with `mode` (files API).
    pub async fn push_file(
        &self,
        name: &str,
        path: &str,
        bytes: Vec<u8>,
        mode: &str,
    ) -> Result<()> {
        let response = self
            .http
            .post(format!(
                "{}/1.0/instances/{name}/files?path={path}",
                self.base()
            ))
            .header("X-LXD-type", "file")
            .header("X-LXD-mode", mode)
            .header("X-LXD-uid", "0")
            .header("X-LXD-gid", "0")
            .header("X-LXD-write", "overwrite")
            .body(bytes)
            .send()
            .await
            .map_err(|err| self.unreachable(&err))?;
        if !response.status().is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(Error::system(format!(
                "cannot copy {path} into {name}: {}",
                text.trim()
            )));
        }
        Ok(())
    }

    /// Whether `path` exists in the instance.
    pub async fn file_exists(&self, name: &str, path: &str) -> Result<bool> {
        let response = self
            .http
            .get(format!(
                "{}/1.0/instances/{name}/files?path={path}",
                self.base()
            ))
            .send()
            .await
            .map_err(|err| self.unreachable(&err))?;
        Ok(response.status().is_success())
    }

    /// Runs `command` and returns its exit status, its output discarded.
    pub async fn exec_quiet(&self, name: &str, command: &[&str]) -> Result<i32> {
        let body = json!({"command": command, "wait-for-websocket": false, "interactive": false, "record-output": false});
        let path = format!("/1.0/instances/{name}/exec");
        let done = self.call_and_wait(Method::POST, &path, Some(&body)).await?;
        exit_status(&done)
    }

    /// Runs `command` with its stdout and stderr streamed to the driver's as they arrive, and
    /// returns its exit status. When `cancel` fires, `on_cancel` runs (a second exec that stops
    /// the command's process group): the runner's SIGTERM reaches only the driver (§6.3).
    pub async fn exec_streaming(
        &self,
        name: &str,
        command: &[&str],
        cancel: &CancellationToken,
        on_cancel: &[&str],
    ) -> Result<i32> {
        let body = json!({"command": command, "wait-for-websocket": true, "interactive": false});
        let answer = self
            .call(
                Method::POST,
                &format!("/1.0/instances/{name}/exec"),
                Some(&body),
            )
            .await?;
        let operation = answer["operation"]
            .as_str()
            .ok_or_else(|| Error::system("LXD exec started no operation"))?
            .to_owned();
        let fds = &answer["metadata"]["metadata"]["fds"];
        let secret = |fd: &str| -> Result<String> {
            fds[fd]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| Error::system(format!("LXD exec gave no secret for {fd}")))
        };
        // LXD waits about 5 s for every websocket, so all four connect at once.
        let [s0, s1, s2, sc] = [secret("0")?, secret("1")?, secret("2")?, secret("control")?];
        let (stdin, stdout, stderr, control) = tokio::try_join!(
            self.websocket(&operation, &s0),
            self.websocket(&operation, &s1),
            self.websocket(&operation, &s2),
            self.websocket(&operation, &sc),
        )?;
        // No input: EOF at once.
        let mut stdin = stdin;
        let _ = stdin.close(None).await;
        let copy = |mut socket: WebSocket, stream: Stream| async move {
            while let Some(Ok(message)) = socket.next().await {
                match message {
                    Message::Binary(bytes) => {
                        let _ = write_all(stream, &bytes);
                    }
                    Message::Text(text) => {
                        let _ = write_all(stream, text.as_bytes());
                    }
                    Message::Close(_) => break,
                    _ => {}
                }
            }
        };
        let output =
            futures_util::future::join(copy(stdout, Stream::Stdout), copy(stderr, Stream::Stderr));
        tokio::pin!(output);
        tokio::select! {
            _ = &mut output => {}
            () = cancel.cancelled() => {
                let _ = self.exec_quiet(name, on_cancel).await;
                output.await;
            }
        }
        drop(control);
        let done = self.wait(&json!({"operation": operation})).await?;
        exit_status(&done)
    }

    async fn websocket(&self, operation: &str, secret: &str) -> Result<WebSocket> {
        let unreachable = |err: std::io::Error| {
            Error::system(format!("cannot reach LXD at {}: {err}", self.endpoint))
        };
        let (stream, url): (Box<dyn Connection>, String) = match &self.transport {
            Transport::Unix(socket) => (
                Box::new(
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map_err(unreachable)?,
                ),
                format!("ws://lxd{operation}/websocket?secret={secret}"),
            ),
            Transport::Https { host, port, tls } => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(unreachable)?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|err| Error::system(format!("LXD host {host}: {err}")))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(unreachable)?;
                (
                    Box::new(stream),
                    format!("wss://{host}:{port}{operation}/websocket?secret={secret}"),
                )
            }
        };
        let (socket, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .map_err(|err| Error::system(format!("LXD exec websocket: {err}")))?;
        Ok(socket)
    }
}

/// reqwest's builder, with ring as the process's TLS crypto provider: reqwest is built
/// without one of its own (its default, aws-lc, needs cmake and a longer build) and panics on
/// `build()` without it, even for a unix socket.
fn client_builder() -> reqwest::ClientBuilder {
    // Err only when a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A byte stream to the daemon: a unix socket or a TLS connection.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

type WebSocket = tokio_tungstenite::WebSocketStream<Box<dyn Connection>>;

fn exit_status(operation: &Value) -> Result<i32> {
    operation["metadata"]["return"]
        .as_i64()
        .and_then(|code| i32::try_from(code).ok())
        .ok_or_else(|| Error::system("LXD reported no exit status for the exec"))
}
