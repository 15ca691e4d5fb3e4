//! LXD's (and Incus's) REST API, over the local unix socket or over HTTPS to a remote daemon
//! (see `tls`): JSON requests through reqwest, background operations waited for, and exec
//! output through the operation's websockets. Errors name the endpoint or the call and say what
//! to fix; daemon errors (5xx) are transient.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use drover_core::channel::{Chunk, Output};
use drover_core::{Error, Result, Stream};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;

use crate::tls;

/// Sockets tried, in order, when the operator names none: Debian's LXD, the snap's, Incus's.
pub const DEFAULT_SOCKETS: &[&str] = &[
    "/var/lib/lxd/unix.socket",
    "/var/snap/lxd/common/lxd/unix.socket",
    "/var/lib/incus/unix.socket",
];

/// How long the daemon may take to open an exec's websockets (it gives up after about 5 s).
const WEBSOCKET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Seconds a background operation (create, start, stop, delete) may take.
const OPERATION_TIMEOUT_SECS: u64 = 120;

/// The port of `https://` endpoints that name none (LXD's default).
const DEFAULT_HTTPS_PORT: u16 = 8443;

/// A failed API call: the status LXD gave it (the HTTP-like `error_code` of a refused
/// request, or the `status_code` of a failed background operation) and its message. Callers
/// decide by the status, never by the text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("LXD {call}: {message} ({status})")]
pub struct ApiError {
    /// What was called, e.g. `DELETE /1.0/instances/x`.
    pub call: String,
    /// The status.
    pub status: u64,
    /// LXD's message.
    pub message: String,
}

impl ApiError {
    /// The object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status == 404
    }

    /// The name is taken.
    pub fn is_conflict(&self) -> bool {
        self.status == 409
    }
}

impl From<ApiError> for Error {
    fn from(err: ApiError) -> Error {
        // The daemon's own trouble may pass; a refused request will not.
        if err.status >= 500 {
            Error::transient(err)
        } else {
            Error::system(err)
        }
    }
}

/// The result of an API call: an [`ApiError`] the caller can look at, or any other failure
/// (the daemon unreachable, an unreadable answer).
pub type ApiResult<T> = std::result::Result<T, Failure>;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// LXD answered with an error.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Anything else.
    #[error("{0}")]
    Other(Error),
}

impl Failure {
    /// Whether LXD said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Failure::Api(err) if err.is_not_found())
    }

    /// Whether LXD said the name is taken.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Failure::Api(err) if err.is_conflict())
    }
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        match failure {
            Failure::Api(err) => err.into(),
            Failure::Other(err) => err,
        }
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Failure {
        Failure::Other(err)
    }
}

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
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> ApiResult<Value> {
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
            return Err(ApiError {
                call: format!("{method} {path}"),
                status: value["error_code"]
                    .as_u64()
                    .unwrap_or(u64::from(status.as_u16())),
                message: value["error"]
                    .as_str()
                    .unwrap_or("unknown error")
                    .to_owned(),
            }
            .into());
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
    async fn wait(&self, answer: &Value) -> ApiResult<Value> {
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
        match metadata["status_code"].as_u64() {
            Some(200) => Ok(metadata),
            status => Err(ApiError {
                call: format!(
                    "operation {}",
                    metadata["description"].as_str().unwrap_or(operation)
                ),
                status: status.unwrap_or(0),
                message: metadata["err"].as_str().unwrap_or("failed").to_owned(),
            }
            .into()),
        }
    }

    /// Checks the daemon answers; returns its name and version, e.g. `lxd 5.0.2`.
    pub async fn describe(&self) -> Result<String> {
        let info = self.get("/1.0").await?;
        // An untrusted client is answered too, with next to nothing; every later call would
        // fail with a bare "not authorized".
        if info["auth"] == "untrusted" {
            return Err(Error::system(format!(
                "the LXD daemon at {} does not trust client_cert; on the server, `lxc config trust add` it",
                self.endpoint
            )));
        }
        let environment = &info["environment"];
        Ok(format!(
            "{} {}",
            environment["server"].as_str().unwrap_or("lxd"),
            environment["server_version"].as_str().unwrap_or("")
        ))
    }

    /// The full fingerprint of `image`, an alias or a fingerprint (or its unique start);
    /// None when the daemon has no such image.
    pub async fn image_fingerprint(&self, image: &str) -> Result<Option<String>> {
        match self.get(&format!("/1.0/images/aliases/{image}")).await {
            Ok(alias) => return Ok(alias["target"].as_str().map(str::to_owned)),
            Err(err) if err.is_not_found() => {}
            Err(err) => return Err(err.into()),
        }
        match self.get(&format!("/1.0/images/{image}")).await {
            Ok(found) => Ok(found["fingerprint"].as_str().map(str::to_owned)),
            Err(err) if err.is_not_found() => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// The instances a running operation works on (being created, started, deleted...);
    /// commands running in an instance (execs) do not count.
    pub async fn busy_instances(&self) -> Result<Vec<String>> {
        let operations = self.get("/1.0/operations?recursion=1").await?;
        Ok(operations["running"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|operation| operation["metadata"]["command"].is_null())
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
            .map_err(Error::from)
    }

    /// Replaces an instance's writable configuration (`PUT /1.0/instances/{name}`).
    pub async fn update(&self, name: &str, body: &Value) -> Result<()> {
        self.call_and_wait(Method::PUT, &format!("/1.0/instances/{name}"), Some(body))
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Starts creating an instance from `body` and returns without waiting: the daemon
    /// finishes the operation on its own after this process has exited.
    pub async fn create_in_background(&self, body: &Value) -> Result<()> {
        self.call(Method::POST, "/1.0/instances", Some(body))
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Starts deleting a stopped instance and returns without waiting.
    pub async fn delete_in_background(&self, name: &str) -> Result<()> {
        self.call(Method::DELETE, &format!("/1.0/instances/{name}"), None)
            .await
            .map(|_| ())
            .map_err(Error::from)
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
            Ok(answer) => Ok(self.wait(&answer).await.map(|_| ())?),
            // A job of the same project made it meanwhile.
            Err(err) if err.is_conflict() => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// One call, and its background operation waited for; returns the operation's metadata.
    async fn call_and_wait(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> ApiResult<Value> {
        let answer = self.call(method, path, body).await?;
        self.wait(&answer).await
    }

    /// Creates an instance (not started) from `body` (`POST /1.0/instances`).
    pub async fn create(&self, body: &Value) -> Result<()> {
        self.call_and_wait(Method::POST, "/1.0/instances", Some(body))
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Starts or stops an instance.
    pub async fn set_state(&self, name: &str, action: &str) -> Result<()> {
        let body = json!({"action": action, "timeout": 30, "force": true});
        let path = format!("/1.0/instances/{name}/state");
        self.call_and_wait(Method::PUT, &path, Some(&body))
            .await
            .map(|_| ())
            .map_err(Error::from)
    }

    /// Stops and deletes an instance; one that is already gone is fine (cleanup runs more
    /// than once, §6.3). An instance still being created by an attempt that was cancelled
    /// (LXD finishes the create on its own) is waited for, bounded.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_secs(OPERATION_TIMEOUT_SECS);
        while self.busy_instances().await?.iter().any(|busy| busy == name) {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::system(format!(
                    "instance {name} stayed busy with another operation for {OPERATION_TIMEOUT_SECS} s"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        match self.instance(name).await {
            Err(err) if err.is_not_found() => return Ok(()),
            Err(err) => return Err(err.into()),
            Ok(instance) => {
                if instance["status"] != "Stopped" {
                    self.set_state(name, "stop").await?;
                }
            }
        }
        match self
            .call_and_wait(Method::DELETE, &format!("/1.0/instances/{name}"), None)
            .await
        {
            Err(err) if err.is_not_found() => Ok(()),
            other => Ok(other.map(|_| ())?),
        }
    }

    /// The metadata of any object of the API, e.g. `/1.0/profiles/default`.
    pub async fn get(&self, path: &str) -> ApiResult<Value> {
        let answer = self.call(Method::GET, path, None).await?;
        Ok(answer["metadata"].clone())
    }

    /// One instance with its config and devices.
    pub async fn instance(&self, name: &str) -> ApiResult<Value> {
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

    /// Starts `command` in instance `name` with `stdin` as its whole input, and returns its
    /// stdout and stderr as they come over the operation's websockets.
    pub async fn exec(
        &self,
        name: &str,
        command: &[String],
        stdin: Bytes,
    ) -> Result<Output<'static>> {
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
        let (mut input, stdout, stderr, control) = tokio::time::timeout(WEBSOCKET_TIMEOUT, async {
            tokio::try_join!(
                self.websocket(&operation, &s0),
                self.websocket(&operation, &s1),
                self.websocket(&operation, &s2),
                self.websocket(&operation, &sc),
            )
        })
        .await
        .map_err(|_| {
            Error::system(format!(
                "LXD at {} did not open the exec's websockets within {} s",
                self.endpoint,
                WEBSOCKET_TIMEOUT.as_secs()
            ))
        })??;
        if !stdin.is_empty() {
            input.send(Message::Binary(stdin)).await.map_err(|err| {
                Error::system(format!("cannot send the script to instance {name}: {err}"))
            })?;
        }
        // EOF on the command's stdin: it has all of it.
        let _ = input.close(None).await;
        // A websocket ends with a close frame, or, when the command exits at once, with the
        // daemon resetting it: either way there is no more output. A stream cut short is
        // still noticed, by the missing exit line of the stage (see `drover_core::channel`).
        let chunks = |socket: WebSocket, stream: Stream| {
            socket
                .take_while(|message| {
                    std::future::ready(matches!(message, Ok(message) if !message.is_close()))
                })
                .filter_map(move |message| {
                    std::future::ready(match message {
                        Ok(Message::Binary(bytes)) => Some(Ok(Chunk { stream, bytes })),
                        Ok(Message::Text(text)) => Some(Ok(Chunk {
                            stream,
                            bytes: Bytes::from(text.as_bytes().to_vec()),
                        })),
                        _ => None,
                    })
                })
        };
        let output = futures_util::stream::select(
            chunks(stdout, Stream::Stdout),
            chunks(stderr, Stream::Stderr),
        );
        // The control and input sockets stay open as long as the output is read.
        let keep = (control, input);
        Ok(Box::pin(output.map(move |chunk| {
            let _ = &keep;
            chunk
        })))
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
    // Every call is bounded, so nothing waits on a daemon that stopped answering; the
    // longest is the wait for an operation, which LXD itself ends after its timeout.
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(OPERATION_TIMEOUT_SECS + 30))
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
