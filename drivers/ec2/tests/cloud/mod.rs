//! Stand-ins for AWS in drover-ec2's tests and bench: CI has no AWS account.
//!
//! * [`Moto`]: a `moto_server` of its own (a local fake of the EC2 API) on a free loopback
//!   port, and SDK clients for it.
//! * [`Instances`]: what moto cannot do, boot the instances it launches. Each pending or
//!   running instance becomes an isolated environment on this host (own mount, PID, UTS and IPC
//!   namespaces, a tmpfs root with the host's /usr read-only) that runs its user data like
//!   cloud-init and then an sshd on 127.0.0.1, announced in the instance's `ssh-endpoint` tag.
//! * [`FaultProxy`]: what moto does not simulate: errors (throttling, capacity), lost answers
//!   and slow ones, injected per API action between the driver and moto.
//!
//! `tests/setup/ec2.sh` installs what they need; [`prerequisites`] says what is missing.
//! Included by integration tests as `mod cloud;` and by the bench with `#[path]`.

// Each test binary that includes this module uses only a part of it.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region, SharedHttpClient};
use aws_sdk_ec2::types::{Filter, InstanceAttributeName, Tag};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};

/// The command that installs everything here needs, for "missing" messages.
pub const SETUP: &str = "bash tests/setup/ec2.sh";
/// The region every client here uses (moto keeps one state per region).
pub const REGION: &str = "eu-west-1";
/// The tag [`Instances`] announces an instance's sshd in, as `127.0.0.1:PORT`: the driver under
/// test is configured with the address template `{tag:ssh-endpoint}`.
pub const SSH_ENDPOINT_TAG: &str = "ssh-endpoint";
/// Environment variable naming the `moto_server` to run, before the default places.
pub const MOTO_SERVER_ENV: &str = "DROVER_MOTO_SERVER";
/// Where `tests/setup/ec2.sh` installs `moto_server`.
const MOTO_SERVER_DEFAULT: &str = "/var/cache/drover/moto/bin/moto_server";
/// PATH for the processes started here: the test's own environment must not leak into them.
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long `moto_server` may take to answer (about 0.5 s here).
const MOTO_READY: Duration = Duration::from_secs(20);
/// How long an environment's sshd may take to accept connections once started (about 0.1 s
/// after the user data is done, here).
const SSHD_READY: Duration = Duration::from_secs(30);
/// How often [`Instances`] asks moto what is pending or running.
const POLL: Duration = Duration::from_millis(200);

/// `Ok` when everything here can run on this machine; else what is missing, ending with the
/// setup command. For `drover_test_support::require::backend("ec2", ...)`.
pub fn prerequisites() -> Result<(), String> {
    let mut missing = Vec::new();
    // The environments need real root: mounts, namespaces, chroot.
    if !std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        missing.push("root (instances are namespaces made with unshare)".to_owned());
    }
    if !Path::new("/usr/sbin/sshd").is_file() {
        missing.push("/usr/sbin/sshd".to_owned());
    }
    for tool in ["ssh", "ssh-keygen", "unshare", "setpriv"] {
        if on_path(tool).is_none() {
            missing.push(tool.to_owned());
        }
    }
    if let Err(why) = moto_server() {
        missing.push(why);
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the EC2 stand-ins lack {} (run `{SETUP}` as root)",
            missing.join(", ")
        ))
    }
}

/// The `moto_server` to run: `$DROVER_MOTO_SERVER`, else the setup script's, else PATH's.
fn moto_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(MOTO_SERVER_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{MOTO_SERVER_ENV}={} (no such file)",
                path.display()
            ))
        };
    }
    let default = Path::new(MOTO_SERVER_DEFAULT);
    if default.is_file() {
        return Ok(default.to_owned());
    }
    on_path("moto_server").ok_or_else(|| format!("moto_server ({MOTO_SERVER_DEFAULT} or on PATH)"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| file.is_file())
}

/// An EC2 client for the API at `endpoint` (moto or a [`FaultProxy`]): region [`REGION`],
/// static credentials `testing`/`testing`, plain HTTP through the SDK's own hyper client with
/// rustls/ring (the TLS stack the driver is built with), and `retry`.
pub fn ec2_client(endpoint: &str, retry: RetryConfig) -> Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "drover-tests",
        ))
        .endpoint_url(endpoint)
        .http_client(http_client())
        .retry_config(retry)
        .build();
    Client::from_conf(config)
}

fn http_client() -> SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// The environment that points an AWS SDK (the driver under test) at `endpoint` with the same
/// region and credentials as [`ec2_client`]. It also keeps the SDK from reading the user's AWS
/// files and from ever asking the instance metadata service (a non-loopback address) for
/// anything.
pub fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_REGION", REGION.to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_CONFIG_FILE", "/dev/null".to_owned()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]
}

/// A free TCP port on 127.0.0.1 (free when asked: whoever binds it next may lose a race, so
/// callers retry on a failed start).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not turn every later call into a
    // second, misleading panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The last `lines` lines of the file at `path` (for failure messages).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned());
    match text {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Moto

/// A `moto_server` of its own on a free loopback port, killed on drop. Its state (instances,
/// tags...) is its own, in region [`REGION`] for the clients made here.
pub struct Moto {
    port: u16,
    log: PathBuf,
    // What `subnet` and `ami` found: moto's defaults never change, and DescribeImages over
    // moto's thousand fake images takes about a second.
    subnet: OnceLock<String>,
    ami: OnceLock<String>,
    // Field order: the process is killed before its directory is removed.
    process: Kept,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts `moto_server -H 127.0.0.1 -p PORT` (see [`prerequisites`] for which one) with its
    /// output in a log file, and waits until it answers (at most 20 s).
    pub fn start() -> anyhow::Result<Moto> {
        let server = moto_server().map_err(|why| anyhow!("no {why} (run `{SETUP}` as root)"))?;
        let dir = tempfile::Builder::new().prefix("drover-moto-").tempdir()?;
        let log = dir.path().join("moto.log");
        let mut why = String::new();
        // A port found free can be taken before moto binds it: then moto exits, and another
        // port is tried.
        for _ in 0..3 {
            let port = free_port()?;
            let out = File::create(&log)?;
            let mut command = Command::new("setpriv");
            command
                .args(["--pdeathsig", "KILL"])
                .arg(&server)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out);
            let process = Kept::spawn(command, "moto")
                .with_context(|| format!("starting {}", server.display()))?;
            let deadline = Instant::now() + MOTO_READY;
            loop {
                if http_get_ok(port, "/moto-api/") {
                    return Ok(Moto {
                        port,
                        log,
                        subnet: OnceLock::new(),
                        ami: OnceLock::new(),
                        process,
                        _dir: dir,
                    });
                }
                if let Some(status) = process.exited() {
                    why = format!("moto_server exited ({status}) before answering on port {port}");
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "moto_server did not answer on 127.0.0.1:{port} within {} s; its log:\n{}",
                        MOTO_READY.as_secs(),
                        tail(&log, 30)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        bail!("{why}; its log:\n{}", tail(&log, 30))
    }

    /// Its URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An EC2 client for it, with the SDK's standard retries ([`ec2_client`]).
    pub fn client(&self) -> Client {
        ec2_client(&self.endpoint(), RetryConfig::standard())
    }

    /// The end of moto's log (requests, tracebacks), for failure messages.
    pub fn log(&self) -> String {
        tail(&self.log, 50)
    }

    /// A subnet moto has by default: the default VPC's subnet in the region's first zone
    /// (`eu-west-1a`), the same on every start.
    pub async fn subnet(&self) -> anyhow::Result<String> {
        if let Some(subnet) = self.subnet.get() {
            return Ok(subnet.clone());
        }
        let out = self
            .client()
            .describe_subnets()
            .filters(
                Filter::builder()
                    .name("default-for-az")
                    .values("true")
                    .build(),
            )
            .send()
            .await
            .context("DescribeSubnets")?;
        let mut subnets: Vec<(&str, &str)> = out
            .subnets()
            .iter()
            .filter_map(|s| Some((s.availability_zone()?, s.subnet_id()?)))
            .collect();
        subnets.sort();
        let (_, id) = subnets.first().context("moto has no default subnet")?;
        Ok(self.subnet.get_or_init(|| (*id).to_owned()).clone())
    }

    /// An AMI moto has by default: among its fake Amazon Linux 2023 x86_64 images, the one
    /// with the smallest id (moto's list is fixed for a version, so always the same one).
    pub async fn ami(&self) -> anyhow::Result<String> {
        if let Some(ami) = self.ami.get() {
            return Ok(ami.clone());
        }
        let out = self
            .client()
            .describe_images()
            .owners("amazon")
            .filters(
                Filter::builder()
                    .name("name")
                    .values("al2023-ami-2023*")
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("architecture")
                    .values("x86_64")
                    .build(),
            )
            .send()
            .await
            .context("DescribeImages")?;
        let mut ids: Vec<&str> = out.images().iter().filter_map(|i| i.image_id()).collect();
        ids.sort();
        let id = ids
            .first()
            .context("moto has no Amazon Linux 2023 x86_64 image")?;
        Ok(self.ami.get_or_init(|| (*id).to_owned()).clone())
    }
}

/// Whether `GET path` on 127.0.0.1:`port` answers 200 within a few seconds. Plain std: moto's
/// start is waited for without needing a runtime.
fn http_get_ok(port: u16, path: &str) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(3)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[8..12] == b" 200"
}

/// A child process owned by a thread of its own, killed when this is dropped.
///
/// Why a thread: the process is started with `setpriv --pdeathsig KILL`, so that it dies with
/// us even when the test binary is killed (a moto or an instance left running would outlive
/// every test run). The kernel sends that signal when the *thread* that started the process
/// ends, not the process; test threads end with their test, so a process shared by several
/// tests (a `static` moto) must be started by a thread that lives as long as it should.
struct Kept {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    exit: Arc<Mutex<Option<ExitStatus>>>,
}

impl Kept {
    fn spawn(mut command: Command, name: &str) -> std::io::Result<Kept> {
        let (stop, stopped) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel();
        let exit = Arc::new(Mutex::new(None));
        let thread = std::thread::Builder::new()
            .name(format!("cloud-{name}"))
            .spawn({
                let exit = exit.clone();
                move || {
                    let mut child = match command.spawn() {
                        Ok(child) => child,
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = started_tx.send(Ok(()));
                    // Until told to stop (or dropped): note when the process exits by itself.
                    while let Err(mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(Duration::from_millis(100))
                    {
                        if let Ok(Some(status)) = child.try_wait() {
                            *lock(&exit) = Some(status);
                        }
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                }
            })?;
        match started.recv() {
            Ok(Ok(())) => Ok(Kept {
                stop: Some(stop),
                thread: Some(thread),
                exit,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other("the keeper thread died")),
        }
    }

    /// How the process ended, once it has.
    fn exited(&self) -> Option<ExitStatus> {
        *lock(&self.exit)
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Instances

/// Boots the instances moto launches: while this lives, every instance that is pending or
/// running in moto becomes an environment on this host whose sshd listens on 127.0.0.1, and
/// every environment whose instance is no longer pending or running (terminated, shutting down,
/// stopped) is killed. Dropping this kills them all.
///
/// An environment: `unshare --mount --pid --fork --uts --ipc` (its own mount, PID, hostname
/// and IPC namespaces; the host's network, so that it listens on the host's loopback), rooted in
/// a tmpfs with the host's /usr (and /bin, /lib... as the same symlinks) read-only, a writable
/// copy of the host's /etc without its ssh host keys, empty /tmp /run /root /var /home, a fresh
/// /proc and a /dev of null, zero, full, random, urandom, tty and its own devpts (no block
/// device). Its hostname is the instance id.
///
/// Boot, as cloud-init would run a user-data script: the user data (DescribeInstanceAttribute
/// `userData`, base64-decoded) is run as root in /root, environment cleared but for PATH, HOME
/// and LANG, stdin /dev/null, output to the console, at most 120 s, when it starts with `#!`
/// (made executable and run, so its `#!` line picks the interpreter); anything else (cloud-config,
/// MIME, gzip) is ignored. Its exit status does not stop the boot. Then host keys are made
/// (ed25519) and sshd becomes the namespace's PID 1: `kill -9 -1` inside leaves it running, and
/// its death ends everything inside. Root may log in with a key only
/// (`PermitRootLogin prohibit-password`, `StrictModes no`, no PAM). Once sshd accepts
/// connections the instance is tagged [`SSH_ENDPOINT_TAG`] = `127.0.0.1:PORT`.
///
/// Unlike a real instance: the user data has finished before sshd listens (cloud-init may run
/// it after sshd is up, so a real driver can meet a refused key for a while); the root is a
/// fresh tmpfs at every boot, so an instance stopped and started again boots afresh, user data
/// included, on a new port (its tag is rewritten).
///
/// Give it a client for moto itself, not for a [`FaultProxy`]: its own calls must not meet
/// the faults meant for the driver.
pub struct Instances {
    shared: Arc<Mutex<Fleet>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What [`Instances`] knows, shared by its thread and its methods.
#[derive(Default)]
struct Fleet {
    boot_delay: Duration,
    /// Pending or running in moto's latest answer.
    current: HashSet<String>,
    /// Being booted (between being seen and sshd answering).
    booting: HashSet<String>,
    /// The environments alive (booting or up), by instance id.
    envs: HashMap<String, Env>,
    booted: Vec<String>,
    user_data: HashMap<String, Vec<u8>>,
    /// Instances whose environment failed to boot or died by itself: never booted again.
    failed: HashMap<String, String>,
}

/// One instance's environment: the `unshare` process (its child is the namespace's PID 1)
/// and its host-side directory (user data, console log, the root's mount point).
struct Env {
    process: Child,
    dir: tempfile::TempDir,
    port: u16,
    /// Announced in the tag: sshd accepts connections.
    up: bool,
}

impl Env {
    fn console(&self) -> String {
        tail(&self.dir.path().join("console.log"), 40)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // SIGKILL: unshare ignores SIGTERM while it waits. Its death sends SIGKILL to the
        // namespace's PID 1 (--kill-child), which ends everything inside; the mounts, made in
        // the namespace only, go with it. Then the directory is removed (TempDir).
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Instances {
    /// Starts watching moto through `client` (every 200 ms) on a thread of its own; works
    /// from any runtime, or none.
    pub fn start(client: Client) -> Instances {
        // A connection pool of its own: connections made on this thread's runtime must not be
        // handed to the caller's, or the other way round.
        let client = Client::from_conf(
            client
                .config()
                .to_builder()
                .http_client(http_client())
                .build(),
        );
        let shared = Arc::new(Mutex::new(Fleet::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        // A thread of its own, for the same reason as `Kept`: the environments are started with
        // `setpriv --pdeathsig KILL` by this thread, and die when it ends; a current-thread
        // runtime keeps every spawn on it.
        let thread = std::thread::Builder::new()
            .name("cloud-instances".to_owned())
            .spawn({
                let shared = shared.clone();
                move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime for the instances' thread");
                    runtime.block_on(watch(shared.clone(), client, stopped));
                    // Boots under way end with the runtime; every environment is registered in
                    // `envs` as soon as it is spawned, so none escapes this.
                    drop(runtime);
                    lock(&shared).envs.clear();
                }
            })
            .expect("spawning the instances' thread");
        Instances {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Delays the boot of instances seen from now on by `delay` (a real instance takes tens
    /// of seconds to boot; benches can mimic that). Default: none.
    pub fn set_boot_delay(&self, delay: Duration) {
        lock(&self.shared).boot_delay = delay;
    }

    /// Every instance whose environment was ever started, in order.
    pub fn booted(&self) -> Vec<String> {
        lock(&self.shared).booted.clone()
    }

    /// The instances whose environment is alive now (booting or up), sorted.
    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.shared).envs.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The user data an instance was booted with (decoded), once it has been read.
    pub fn user_data(&self, id: &str) -> Option<Vec<u8>> {
        lock(&self.shared).user_data.get(id).cloned()
    }

    /// `127.0.0.1:PORT` of an instance whose sshd is up and announced in its tag.
    pub fn endpoint(&self, id: &str) -> Option<String> {
        let fleet = lock(&self.shared);
        let env = fleet.envs.get(id).filter(|env| env.up)?;
        Some(format!("127.0.0.1:{}", env.port))
    }

    /// Why an instance's environment failed to boot, or died by itself (with the end of its
    /// console: user data output, sshd's log).
    pub fn boot_error(&self, id: &str) -> Option<String> {
        lock(&self.shared).failed.get(id).cloned()
    }

    /// The end of a live environment's console: the user data's output and sshd's log.
    pub fn console(&self, id: &str) -> Option<String> {
        lock(&self.shared).envs.get(id).map(Env::console)
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The watcher: boots what is new, kills what is gone, until `stopped`.
async fn watch(
    shared: Arc<Mutex<Fleet>>,
    client: Client,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = ticks.tick() => {}
        }
        let alive = match pending_or_running(&client).await {
            Ok(alive) => alive,
            Err(e) => {
                // Once per streak: moto dropped before this at the end of a test would
                // otherwise print a line every 200 ms.
                if !failing {
                    eprintln!("cloud: DescribeInstances failed (retrying every 200 ms): {e:#}");
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        let mut fleet = lock(&shared);
        fleet.current = alive;
        let gone: Vec<String> = fleet
            .envs
            .keys()
            .filter(|id| !fleet.current.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            fleet.envs.remove(&id);
            eprintln!("cloud: {id} is no longer pending or running: its environment is killed");
        }
        // An environment that was up and died by itself is a failure to report, not an
        // instance to boot again (that would hide it). One still booting is its boot's business.
        let died: Vec<(String, ExitStatus)> = fleet
            .envs
            .iter_mut()
            .filter(|(_, env)| env.up)
            .filter_map(|(id, env)| Some((id.clone(), env.process.try_wait().ok()??)))
            .collect();
        for (id, status) in died {
            if let Some(env) = fleet.envs.remove(&id) {
                let why = format!(
                    "its environment exited by itself ({status}); console:\n{}",
                    env.console()
                );
                eprintln!("cloud: {id}: {why}");
                fleet.failed.insert(id, why);
            }
        }
        let new: Vec<String> = fleet
            .current
            .iter()
            .filter(|id| {
                !fleet.envs.contains_key(*id)
                    && !fleet.booting.contains(*id)
                    && !fleet.failed.contains_key(*id)
            })
            .cloned()
            .collect();
        for id in new {
            fleet.booting.insert(id.clone());
            tokio::spawn(boot(shared.clone(), client.clone(), id));
        }
    }
}

/// The ids of the instances that are pending or running.
async fn pending_or_running(client: &Client) -> anyhow::Result<HashSet<String>> {
    Ok(live_instances(client, None).await?.into_keys().collect())
}

/// The pending or running instances (those tagged `tag` = value, when given), by id, with
/// their tags.
pub async fn live_instances(
    client: &Client,
    tag: Option<(&str, &str)>,
) -> anyhow::Result<std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>>
{
    let mut request = client.describe_instances().filters(
        Filter::builder()
            .name("instance-state-name")
            .values("pending")
            .values("running")
            .build(),
    );
    if let Some((key, value)) = tag {
        request = request.filters(
            Filter::builder()
                .name(format!("tag:{key}"))
                .values(value)
                .build(),
        );
    }
    let mut pages = request.into_paginator().send();
    let mut found = std::collections::BTreeMap::new();
    while let Some(page) = pages.next().await {
        for reservation in page?.reservations() {
            for instance in reservation.instances() {
                let tags = instance
                    .tags()
                    .iter()
                    .map(|t| {
                        (
                            t.key().unwrap_or("").to_owned(),
                            t.value().unwrap_or("").to_owned(),
                        )
                    })
                    .collect();
                found.insert(instance.instance_id().unwrap_or("").to_owned(), tags);
            }
        }
    }
    Ok(found)
}

/// Boots instance `id` (a task on the watcher's thread) and records how that went.
async fn boot(shared: Arc<Mutex<Fleet>>, client: Client, id: String) {
    let seen = Instant::now();
    let delay = lock(&shared).boot_delay;
    tokio::time::sleep(delay).await;
    let result = boot_environment(&shared, &client, &id).await;
    let mut fleet = lock(&shared);
    fleet.booting.remove(&id);
    match result {
        Ok(Some(port)) => eprintln!(
            "cloud: {id} is up on 127.0.0.1:{port}, {:.2} s after it was seen",
            seen.elapsed().as_secs_f64()
        ),
        // Terminated (or stopped) while booting: nothing to report.
        Ok(None) => {}
        Err(e) => {
            eprintln!("cloud: {id} did not boot: {e:#}");
            fleet.failed.insert(id, format!("{e:#}"));
        }
    }
}

/// Starts `id`'s environment, waits for its sshd and tags the instance: the port, or `None`
/// when the instance stopped being pending or running first.
async fn boot_environment(
    shared: &Mutex<Fleet>,
    client: &Client,
    id: &str,
) -> anyhow::Result<Option<u16>> {
    if !lock(shared).current.contains(id) {
        return Ok(None);
    }
    let user_data = read_user_data(client, id).await?;
    lock(shared)
        .user_data
        .insert(id.to_owned(), user_data.clone());
    let mut why = String::new();
    // A port found free can be taken before sshd binds it: then sshd exits, and the boot is
    // tried again on another port (which runs the user data again, in a fresh root).
    for _ in 0..3 {
        let port = free_port()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("drover-ec2-{id}-"))
            .tempdir()?;
        std::fs::write(dir.path().join("user-data"), &user_data)?;
        std::fs::create_dir(dir.path().join("root"))?;
        let process = spawn_environment(dir.path(), id, port)?;
        {
            let mut fleet = lock(shared);
            if !fleet.current.contains(id) {
                return Ok(None); // `process` is killed here, as it is dropped
            }
            if !fleet.booted.iter().any(|b| b == id) {
                fleet.booted.push(id.to_owned());
            }
            let env = Env {
                process,
                dir,
                port,
                up: false,
            };
            fleet.envs.insert(id.to_owned(), env);
        }
        match sshd_ready(shared, id, port).await {
            Ready::Up => {
                tag_endpoint(client, id, port).await?;
                if let Some(env) = lock(shared).envs.get_mut(id) {
                    env.up = true;
                }
                return Ok(Some(port));
            }
            Ready::Gone => return Ok(None),
            Ready::Exited(console) => why = format!("its environment exited; console:\n{console}"),
            Ready::Late(console) => bail!(
                "sshd did not accept connections on 127.0.0.1:{port} within {} s; console:\n{console}",
                SSHD_READY.as_secs()
            ),
        }
    }
    bail!("{why}")
}

/// The instance's user data, base64-decoded: what moto answers to DescribeInstanceAttribute
/// `userData` (nothing: empty). Retried: moto may be busy with a burst of launches.
async fn read_user_data(client: &Client, id: &str) -> anyhow::Result<Vec<u8>> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let answer = client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(InstanceAttributeName::UserData)
            .send()
            .await;
        match answer {
            Ok(out) => {
                let Some(encoded) = out.user_data().and_then(|v| v.value()) else {
                    return Ok(Vec::new());
                };
                return aws_smithy_types::base64::decode(encoded.trim())
                    .map_err(|e| anyhow!("the user data of {id} is not base64: {e}"));
            }
            Err(e) if attempt >= 3 => {
                return Err(e)
                    .with_context(|| format!("DescribeInstanceAttribute userData of {id}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn tag_endpoint(client: &Client, id: &str, port: u16) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let answer = client
            .create_tags()
            .resources(id)
            .tags(
                Tag::builder()
                    .key(SSH_ENDPOINT_TAG)
                    .value(format!("127.0.0.1:{port}"))
                    .build(),
            )
            .send()
            .await;
        match answer {
            Ok(_) => return Ok(()),
            Err(e) if attempt >= 3 => {
                return Err(e).with_context(|| format!("CreateTags {SSH_ENDPOINT_TAG} on {id}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

enum Ready {
    /// sshd accepts connections.
    Up,
    /// The environment was killed (its instance is no longer pending or running).
    Gone,
    /// The environment exited by itself (removed; its console's end).
    Exited(String),
    /// Neither within `SSHD_READY` (removed and killed; its console's end).
    Late(String),
}

async fn sshd_ready(shared: &Mutex<Fleet>, id: &str, port: u16) -> Ready {
    let deadline = Instant::now() + SSHD_READY;
    loop {
        {
            let mut fleet = lock(shared);
            let Some(env) = fleet.envs.get_mut(id).filter(|env| env.port == port) else {
                return Ready::Gone;
            };
            if let Ok(Some(_)) = env.process.try_wait() {
                let console = env.console();
                fleet.envs.remove(id);
                return Ready::Exited(console);
            }
            if Instant::now() > deadline {
                let console = env.console();
                fleet.envs.remove(id);
                return Ready::Late(console);
            }
        }
        let connect = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            return Ready::Up;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the environment of instance `id` whose host-side directory `dir` holds `user-data`
/// and the empty mount point `root`; its sshd will listen on 127.0.0.1:`port`. Output (the
/// boot's, the user data's, sshd's log) goes to `dir/console.log`.
fn spawn_environment(dir: &Path, id: &str, port: u16) -> std::io::Result<Child> {
    let console = File::create(dir.join("console.log"))?;
    Command::new("setpriv")
        // Dies with the thread that starts it (see `Kept`); unshare's --kill-child passes that
        // on to the namespace's PID 1, whose death ends everything inside.
        .args(["--pdeathsig", "KILL"])
        .args([
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--uts",
            "--ipc",
        ])
        .args(["--propagation", "private"])
        .args(["sh", "-c", BOOT, "boot"])
        .arg(dir)
        .args([id, &port.to_string(), INSIDE])
        .env_clear()
        .env("PATH", HOST_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
}

/// The environment's first stage: PID 1 of the new PID namespace, in its private mount
/// namespace, still seeing the host's files. Assembles the root and chroots into it, running
/// `INSIDE`. `set -e`: a step that fails ends the environment, and the boot reports the
/// console. Arguments: the host-side directory, the instance id, the port, `INSIDE`.
const BOOT: &str = r#"set -eu
dir=$1 id=$2 port=$3 inside=$4
r=$dir/root
echo "cloud: booting $id"
mount -t tmpfs -o mode=0755 tmpfs "$r"
mkdir "$r/usr" "$r/etc" "$r/proc" "$r/dev" "$r/sys" "$r/run" "$r/var" "$r/home" "$r/mnt" "$r/opt" "$r/srv"
mkdir -m 1777 "$r/tmp"
mkdir -m 0700 "$r/root"
# The host's programs, read-only. Merged /usr (Debian 12): /bin, /lib... are symlinks into usr,
# made the same here; a host where one is a real directory gets it bound read-only too.
mount --bind /usr "$r/usr"
mount -o remount,bind,ro "$r/usr"
for d in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$d" ]; then
        ln -s "$(readlink "/$d")" "$r/$d"
    elif [ -d "/$d" ]; then
        mkdir "$r/$d"
        mount --bind "/$d" "$r/$d"
        mount -o remount,bind,ro "$r/$d"
    fi
done
# A writable copy of the host's /etc, as an image would ship one, without the host's identity:
# no ssh host keys, its own hostname. Root's password field "*" (no password, not locked):
# sshd without PAM refuses even key logins to an account locked with "!".
cp -a /etc/. "$r/etc/"
rm -f "$r"/etc/ssh/ssh_host_*
echo "$id" >"$r/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$id" >"$r/etc/hosts"
if [ -f "$r/etc/shadow" ]; then sed -i 's/^root:[^:]*:/root:*:/' "$r/etc/shadow"; fi
mkdir -p "$r/var/tmp" "$r/var/log" "$r/var/cache" "$r/var/lib/cloud" "$r/run/lock" "$r/run/sshd"
chmod 1777 "$r/var/tmp"
ln -s /run "$r/var/run"
ln -s /run/lock "$r/var/lock"
# This namespace's processes only.
mount -t proc proc "$r/proc"
# Character devices a job needs, and a devpts of its own; no disk.
mount -t tmpfs -o mode=0755,size=1m tmpfs "$r/dev"
for n in null zero full random urandom tty; do
    : >"$r/dev/$n"
    mount --bind "/dev/$n" "$r/dev/$n"
done
mkdir "$r/dev/pts"
mkdir -m 1777 "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
ln -s /proc/self/fd "$r/dev/fd"
ln -s /proc/self/fd/0 "$r/dev/stdin"
ln -s /proc/self/fd/1 "$r/dev/stdout"
ln -s /proc/self/fd/2 "$r/dev/stderr"
cp "$dir/user-data" "$r/var/lib/cloud/user-data"
hostname "$id"
exec chroot "$r" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 /bin/sh -c "$inside" inside "$port"
"#;

/// The environment's second stage, inside its root: the user data, host keys, then sshd as
/// PID 1 (exec). Argument: the port.
const INSIDE: &str = r#"port=$1
ud=/var/lib/cloud/user-data
# cloud-init runs a user-data script (one starting with #!) as root, once, and boots on
# whatever it exits with; here it runs before sshd starts, bounded.
if [ "$(head -c 2 "$ud")" = '#!' ]; then
    chmod 0700 "$ud"
    echo "cloud: running the user data"
    rc=0
    (cd /root && timeout 120 "$ud") </dev/null || rc=$?
    echo "cloud: the user data exited $rc"
elif [ -s "$ud" ]; then
    echo "cloud: the user data does not start with #!: not run"
fi
# ed25519 only: an RSA key takes a third of a second or more of CPU per instance.
ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
cat >/etc/ssh/cloud_sshd_config <<EOF
ListenAddress 127.0.0.1
Port $port
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
MaxStartups 100
MaxSessions 100
Subsystem sftp internal-sftp
EOF
echo "cloud: starting sshd on 127.0.0.1:$port"
exec /usr/sbin/sshd -D -e -f /etc/ssh/cloud_sshd_config
"#;

// ---------------------------------------------------------------------------------------------
// FaultProxy

/// What a [`FaultProxy`] rule does to a request it matches.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answers with EC2's error document, HTTP `status`: the SDK's error then has this `code`
    /// and `message` (`aws_sdk_ec2::error::ProvideErrorMetadata`). Moto never sees the request:
    /// nothing happens. EC2 answers `InsufficientInstanceCapacity` with 500,
    /// `RequestLimitExceeded` with 503, client errors with 400.
    Error {
        /// The HTTP status.
        status: u16,
        /// The EC2 error code.
        code: String,
        /// The error message.
        message: String,
    },
    /// Forwards the request to moto, which carries it out (an instance is launched...), then
    /// closes the connection without answering: a lost response. The SDK sees a transport
    /// error with no code.
    DropResponse,
    /// Waits this long, then forwards as usual: a slow API (for client timeouts).
    Delay(Duration),
    /// Forwards at once, then holds the answer back this long: a caller killed meanwhile
    /// never learns what its call did.
    Hang(Duration),
}

impl Fault {
    /// [`Fault::Error`] from string slices.
    pub fn error(status: u16, code: &str, message: &str) -> Fault {
        Fault::Error {
            status,
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }
}

struct Rule {
    action: String,
    body_contains: Option<String>,
    left: usize,
    fault: Fault,
}

struct Proxy {
    upstream: String,
    http: reqwest::Client,
    rules: Mutex<Vec<Rule>>,
    calls: Mutex<Vec<String>>,
    requests: AtomicU64,
    /// Nanoseconds spent waiting for moto's answers, all requests together.
    upstream_nanos: AtomicU64,
}

/// An HTTP server on 127.0.0.1 between an EC2 client and moto: forwards every request and
/// returns moto's answer, except for requests that match a rule ([`fail`](Self::fail),
/// [`fail_when`](Self::fail_when)), which get that rule's [`Fault`]. Runs on the runtime it was
/// started from; stops on drop.
pub struct FaultProxy {
    port: u16,
    proxy: Arc<Proxy>,
    server: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts one in front of the EC2 API at `upstream` (`Moto::endpoint`).
    pub async fn start(upstream: &str) -> anyhow::Result<FaultProxy> {
        // Built with the rest of the workspace, reqwest leaves the choice of a TLS crypto
        // provider to the process (another member needs that); this one's is ring, as the
        // driver's. An error only says one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let proxy = Arc::new(Proxy {
            upstream: upstream.trim_end_matches('/').to_owned(),
            // No proxy from the environment: forwarding goes to moto on loopback, nowhere else.
            http: reqwest::Client::builder().no_proxy().build()?,
            rules: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            upstream_nanos: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(proxy.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("cloud: the fault proxy stopped: {e}");
            }
        });
        Ok(FaultProxy {
            port,
            proxy,
            server,
        })
    }

    /// Its URL, `http://127.0.0.1:PORT`: the endpoint to give the client under test.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An EC2 client for it with retries disabled, so that every call is one request and the
    /// rules' counts are exact.
    pub fn client(&self) -> Client {
        ec2_client(&self.endpoint(), RetryConfig::disabled())
    }

    /// The next `times` requests for EC2 action `action` (the `Action` form field, e.g.
    /// `RunInstances`) get `fault`. Rules apply in the order they were added; each request
    /// gets at most one fault.
    pub fn fail(&self, action: &str, times: usize, fault: Fault) {
        self.add(action, None, times, fault);
    }

    /// The same, for requests whose form body, decoded, contains `body_contains`: e.g.
    /// `InstanceType=m5.large`, or `InstanceMarketOptions.MarketType=spot` (the SDK's query
    /// form: members joined by dots, list items numbered from 1, e.g. `TagSpecification.1.`).
    pub fn fail_when(&self, action: &str, body_contains: &str, times: usize, fault: Fault) {
        self.add(action, Some(body_contains.to_owned()), times, fault);
    }

    fn add(&self, action: &str, body_contains: Option<String>, times: usize, fault: Fault) {
        lock(&self.proxy.rules).push(Rule {
            action: action.to_owned(),
            body_contains,
            left: times,
            fault,
        });
    }

    /// Drops every rule (faults not yet given are not given).
    pub fn clear(&self) {
        lock(&self.proxy.rules).clear();
    }

    /// The `Action` of every request received, in order, faulted or not (empty for a request
    /// without one).
    pub fn calls(&self) -> Vec<String> {
        lock(&self.proxy.calls).clone()
    }

    /// How long moto took to answer, all forwarded requests together: what a measurement of
    /// the client subtracts to leave its own time (and the proxy's loopback hop).
    pub fn upstream_time(&self) -> Duration {
        Duration::from_nanos(self.proxy.upstream_nanos.load(Ordering::Relaxed))
    }

    /// How many requests for `action` were received.
    pub fn count(&self, action: &str) -> usize {
        lock(&self.proxy.calls)
            .iter()
            .filter(|a| *a == action)
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Proxy {
    /// The fault for a request, from the first rule it matches (which then has one less).
    fn fault_for(&self, action: &str, form: &str) -> Option<Fault> {
        let mut rules = lock(&self.rules);
        let rule = rules.iter_mut().find(|rule| {
            rule.left > 0
                && rule.action == action
                && rule
                    .body_contains
                    .as_deref()
                    .is_none_or(|needle| form.contains(needle))
        })?;
        rule.left -= 1;
        Some(rule.fault.clone())
    }

    async fn forward(&self, parts: axum::http::request::Parts, body: Bytes) -> Response {
        let started = std::time::Instant::now();
        let answer = self.forward_timed(parts, body).await;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.upstream_nanos.fetch_add(nanos, Ordering::Relaxed);
        answer
    }

    async fn forward_timed(&self, parts: axum::http::request::Parts, body: Bytes) -> Response {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = self
            .http
            .request(parts.method.clone(), format!("{}{path}", self.upstream))
            .body(body);
        for (name, value) in &parts.headers {
            if !hop_by_hop(name) && name != HOST {
                request = request.header(name, value);
            }
        }
        let answer = match request.send().await {
            Ok(answer) => answer,
            Err(e) => return self.error(502, "FaultProxyUpstreamError", &e.to_string()),
        };
        let status = answer.status();
        let headers = answer.headers().clone();
        let body = match answer.bytes().await {
            Ok(body) => body,
            Err(e) => return self.error(502, "FaultProxyUpstreamError", &e.to_string()),
        };
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        for (name, value) in &headers {
            if !hop_by_hop(name) {
                response.headers_mut().append(name, value.clone());
            }
        }
        response
    }

    /// EC2's error document, the shape the SDK's `ec2_query` protocol parses (root `Response`,
    /// `Errors/Error/{Code,Message}`, then `RequestID`).
    fn error(&self, status: u16, code: &str, message: &str) -> Response {
        let request_id = format!(
            "fault-proxy-{}",
            self.requests.fetch_add(1, Ordering::Relaxed)
        );
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code>\
             <Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
            xml_escape(code),
            xml_escape(message),
            request_id
        );
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [
                (CONTENT_TYPE, "text/xml;charset=UTF-8".to_owned()),
                (HeaderName::from_static("x-amzn-requestid"), request_id),
            ],
            xml,
        )
            .into_response()
    }
}

/// Headers about one connection, not the message: never passed on.
fn hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == CONTENT_LENGTH
        || name.as_str() == "keep-alive"
}

async fn handle(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(e) => return proxy.error(400, "FaultProxyBadRequest", &e.to_string()),
    };
    let action = form_field(&body, "Action").unwrap_or_default();
    lock(&proxy.calls).push(action.clone());
    let fault = proxy.fault_for(&action, &form_decode(&body));
    match fault {
        Some(Fault::Error {
            status,
            code,
            message,
        }) => proxy.error(status, &code, &message),
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            proxy.forward(parts, body).await
        }
        Some(Fault::Hang(delay)) => {
            // Moto acts at once; the answer comes only after `delay` (a caller killed
            // meanwhile never learns what its call did).
            let answer = proxy.forward(parts, body).await;
            tokio::time::sleep(delay).await;
            answer
        }
        Some(Fault::DropResponse) => {
            // Moto's whole answer first: the side effect has happened when the client fails.
            drop(proxy.forward(parts, body).await);
            dropped()
        }
        None => proxy.forward(parts, body).await,
    }
}

/// A response whose body fails at once: hyper then closes the connection without a complete
/// answer, as a connection lost after the request was sent.
fn dropped() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other("the fault proxy drops this response"))
    });
    let mut response = Response::new(Body::from_stream(failing));
    response.headers_mut().insert(
        CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/xml"),
    );
    response
}

/// The value of `key` in a form-urlencoded body, decoded.
fn form_field(body: &[u8], key: &str) -> Option<String> {
    body.split(|b| *b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        (form_decode(k) == key).then(|| form_decode(v))
    })
}

/// A form-urlencoded text decoded (`+` is a space, `%XX` a byte), separators kept: what
/// `fail_when` matches against.
fn form_decode(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < text.len() => {
                match std::str::from_utf8(&text[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}
