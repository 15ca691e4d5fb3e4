//! A fake GitLab coordinator: the few API endpoints `gitlab-runner run-single` and the
//! in-environment `gitlab-runner artifacts-uploader`/`artifacts-downloader` use (contract §9.3,
//! §8), served over plain HTTP on 127.0.0.1.
//!
//! A test starts a [`Coordinator`], [`enqueue`](Coordinator::enqueue)s a job payload (§9.4),
//! points `run-single --url` at [`url`](Coordinator::url) with
//! [`runner_token`](Coordinator::runner_token), then watches the trace and waits for the final
//! update, which is the only place the job's result appears (run-single exits 0 whatever
//! happened, §9.3).
//!
//! What each endpoint answers is chosen from how GitLab Runner v17.9.3 reacts to it
//! (`network/gitlab.go`, `network/trace.go`), so both that version and later ones are served:
//! tokens are read from `RUNNER-TOKEN`, `JOB-TOKEN`, `PRIVATE-TOKEN` or the JSON body alike.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Request, State};
use axum::http::header::{CONTENT_TYPE, HeaderName};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post, put};
use drover_protocol::JobResponse;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// The runner token the coordinator accepts. It is longer than 14 characters because
/// `helpers.ShortenToken` in v17.9.3 slices a `glrt-` token past its prefix and panics on a
/// shorter one.
pub const RUNNER_TOKEN: &str = "glrt-drover-fake-runner-0001";

/// How often, in seconds, the runner is told to send the trace (`X-GitLab-Trace-Update-Interval`,
/// §9.3 row 3). The runner's default is 3 s; 1 s makes logs stream promptly in tests.
pub const TRACE_UPDATE_INTERVAL_SECS: u64 = 1;

/// Largest request body accepted: artifact archives can be big, and the runner streams them
/// in one multipart request.
const BODY_LIMIT: usize = 1 << 30;

/// How long [`Coordinator::shutdown`] waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The result the runner reported in its final `PUT /api/v4/jobs/:id` (§9.3 row 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalUpdate {
    /// `success` or `failed`.
    pub state: String,
    /// For a failed job, e.g. `script_failure`, `job_canceled`, `job_execution_timeout`.
    pub failure_reason: Option<String>,
    /// The script's exit code for a `script_failure`. The runner omits 0 (`omitempty`), so a
    /// success has `None`.
    pub exit_code: Option<i32>,
    /// `output.bytesize`: how many trace bytes the runner says it sent; compare with
    /// [`Coordinator::trace`] to see that none were lost.
    pub bytesize: Option<u64>,
    /// `output.checksum`, `crc32:<hex>` of the whole trace.
    pub checksum: Option<String>,
}

/// One request the coordinator answered, for tests to assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, `PUT`, `PATCH`...
    pub method: String,
    /// The path with its query string, e.g. `/api/v4/jobs/7/trace?debug_trace=false`.
    pub path: String,
    /// The status code answered.
    pub status: u16,
}

/// What GitLab says about a job in the `Job-Status` header of its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RemoteStatus {
    /// Graceful cancel: the runner stops the job, runs after_script and reports `job_canceled`.
    Canceling,
    /// Abort: the runner stops the job at once.
    Canceled,
}

impl RemoteStatus {
    fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Canceling => "canceling",
            Self::Canceled => "canceled",
        })
    }
}

/// Everything known about one job id. Created on first mention, which may be a
/// [`Coordinator::trace_stream`] subscription before the job is even enqueued.
struct JobState {
    /// The job token; `None` until the job is enqueued, and the API only knows enqueued jobs.
    token: Option<String>,
    remote: Option<RemoteStatus>,
    trace: Vec<u8>,
    subscribers: Vec<mpsc::UnboundedSender<Vec<u8>>>,
    final_update: watch::Sender<Option<FinalUpdate>>,
}

impl Default for JobState {
    fn default() -> Self {
        Self {
            token: None,
            remote: None,
            trace: Vec::new(),
            subscribers: Vec::new(),
            final_update: watch::Sender::new(None),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Bare repositories served over git's "dumb" HTTP protocol, by URL path
    /// (`/group/project.git`).
    repositories: HashMap<String, PathBuf>,
    queue: VecDeque<JobResponse>,
    jobs: HashMap<u64, JobState>,
    requests: Vec<RequestRecord>,
}

/// State shared by the handle and the server's handlers.
struct Shared {
    runner_token: String,
    storage: PathBuf,
    inner: Mutex<Inner>,
}

impl Shared {
    /// Never held across an `.await`. A panic while holding it cannot leave the maps
    /// half-updated in a way that matters to a test, so a poisoned lock is simply reused.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn artifacts_path(&self, job_id: u64) -> PathBuf {
        self.storage.join(job_id.to_string()).join("artifacts.zip")
    }
}

/// A fake GitLab coordinator serving on `127.0.0.1:<any free port>` until dropped.
pub struct Coordinator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl Coordinator {
    /// Binds `127.0.0.1:0` and serves until dropped (or [`shutdown`](Self::shutdown)).
    /// Uploaded artifacts are stored under `storage/<job id>/artifacts.zip`; `storage` is
    /// created if missing. Must be called inside a tokio runtime, which runs the server.
    pub async fn start(storage: PathBuf) -> std::io::Result<Coordinator> {
        tokio::fs::create_dir_all(&storage).await?;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            runner_token: RUNNER_TOKEN.to_owned(),
            storage,
            inner: Mutex::new(Inner::default()),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, router(shared.clone())).with_graceful_shutdown(async {
            // Either an explicit stop or the handle being dropped ends the server.
            let _ = stopped.await;
        });
        let server = tokio::spawn(async move {
            // An accept error ends the server; tests then see connection errors, which is
            // all they could do with it.
            let _ = serve.await;
        });
        Ok(Coordinator {
            shared,
            addr,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// Stops accepting requests and waits (a few seconds at most) for open ones to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
                .await
                .is_err()
        {
            server.abort();
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/`: what `run-single --url` and `CI_SERVER_URL` get. The runner
    /// appends `api/v4/` itself (§9.3, `fixCIURL`).
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The runner token `POST jobs/request` accepts ([`RUNNER_TOKEN`]).
    pub fn runner_token(&self) -> &str {
        &self.shared.runner_token
    }

    /// Serves the bare repository `dir` (prepared with `git update-server-info`) at
    /// `<url>/<project_path>.git`, so get_sources can clone it like a GitLab project: the
    /// runner's `git fetch` speaks git's "dumb" HTTP protocol, plain GETs of the repository's
    /// files.
    pub fn serve_repository(&self, project_path: &str, dir: PathBuf) {
        let key = format!("/{}.git", project_path.trim_matches('/'));
        self.shared.lock().repositories.insert(key, dir);
    }

    /// Queues a job: the next `POST jobs/request` with the runner token answers `201` with
    /// it. From now on the job's own token is accepted for its updates, trace and artifacts.
    pub fn enqueue(&self, job: JobResponse) {
        self.register(&job);
        self.shared.lock().queue.push_back(job);
    }

    /// Makes a job known without handing it out: its token is accepted for artifacts (and
    /// updates) from now on. For jobs that another runner, e.g. the emulated one, runs.
    pub fn register(&self, job: &JobResponse) {
        let mut inner = self.shared.lock();
        inner.jobs.entry(job.id).or_default().token = Some(job.token.clone());
    }

    /// Requests a graceful cancel: later trace PATCH answers and `running` PUT answers carry
    /// `Job-Status: canceling` (§9.3 rows 3–4). An earlier [`abort`](Self::abort) stays.
    pub fn cancel(&self, job_id: u64) {
        let mut inner = self.shared.lock();
        let job = inner.jobs.entry(job_id).or_default();
        if job.remote.is_none() {
            job.remote = Some(RemoteStatus::Canceling);
        }
    }

    /// Requests an abort: later trace PATCH answers and `running` PUT answers carry
    /// `Job-Status: canceled`.
    pub fn abort(&self, job_id: u64) {
        self.shared.lock().jobs.entry(job_id).or_default().remote = Some(RemoteStatus::Canceled);
    }

    /// The job's trace as it arrives: every byte exactly once and in order, even when the
    /// runner resends a range. A subscriber first receives, as one chunk, whatever arrived
    /// before it subscribed, so it may subscribe before or after the job is requested. The
    /// stream ends (`recv` gives `None`) once the final update is recorded, since the runner
    /// flushes the trace before sending it.
    pub fn trace_stream(&self, job_id: u64) -> mpsc::UnboundedReceiver<Vec<u8>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.shared.lock();
        let job = inner.jobs.entry(job_id).or_default();
        if !job.trace.is_empty() {
            // The receiver is alive (we hold it), so this cannot fail.
            let _ = tx.send(job.trace.clone());
        }
        if job.final_update.borrow().is_none() {
            job.subscribers.push(tx);
        }
        rx
    }

    /// The whole trace received so far, byte for byte (it need not be UTF-8).
    pub fn trace(&self, job_id: u64) -> Vec<u8> {
        self.shared
            .lock()
            .jobs
            .get(&job_id)
            .map(|job| job.trace.clone())
            .unwrap_or_default()
    }

    /// Resolves when the runner's final update (`state` `success` or `failed`) for the job
    /// has been recorded, at once if it already has. Never resolves otherwise: wrap it in a
    /// timeout.
    pub async fn wait_final(&self, job_id: u64) -> FinalUpdate {
        let mut updates = self
            .shared
            .lock()
            .jobs
            .entry(job_id)
            .or_default()
            .final_update
            .subscribe();
        match updates.wait_for(Option::is_some).await {
            Ok(update) => {
                if let Some(update) = update.clone() {
                    return update;
                }
            }
            // The sender lives in `self.shared`, which outlives this borrow; nothing to do
            // but honour "never resolves".
            Err(_closed) => {}
        }
        std::future::pending().await
    }

    /// The final update, if it has arrived.
    pub fn final_update(&self, job_id: u64) -> Option<FinalUpdate> {
        self.shared
            .lock()
            .jobs
            .get(&job_id)
            .and_then(|job| job.final_update.borrow().clone())
    }

    /// The bytes of the artifacts archive uploaded for the job, if any. Reads the stored file
    /// (a blocking read: meant for test assertions).
    pub fn artifacts(&self, job_id: u64) -> Option<Vec<u8>> {
        std::fs::read(self.shared.artifacts_path(job_id)).ok()
    }

    /// Every request answered so far, in the order the answers were sent.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // Graceful: the server stops accepting and closes connections once their current
        // request is answered.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v4/jobs/request", post(request_job))
        .route("/api/v4/jobs/{id}", put(update_job))
        .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
        .route(
            "/api/v4/jobs/{id}/artifacts",
            post(upload_artifacts).get(download_artifacts),
        )
        .route("/api/v4/runners/verify", post(verify_runner))
        // An endpoint or method we do not serve is a 404, never axum's 405, so a test can
        // look for one status in `requests()` to spot something the runner needed.
        .fallback(repository_file)
        .method_not_allowed_fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        .with_state(shared)
}

/// Records every request with the status it got, fallbacks and rejections included.
async fn record(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path().to_owned(), |pq| pq.to_string());
    let response = next.run(request).await;
    shared.lock().requests.push(RequestRecord {
        method,
        path,
        status: response.status().as_u16(),
    });
    response
}

/// A GitLab-style error body: `{"message": "403 Forbidden"}`.
fn status_response(status: StatusCode) -> Response {
    let message = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    );
    json_response(status, &json!({ "message": message }))
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

async fn not_found() -> Response {
    status_response(StatusCode::NOT_FOUND)
}

/// A file of a served repository (`GET /group/project.git/info/refs`, `.../objects/..`), or
/// 404. Paths with `..` or other non-normal parts are refused.
async fn repository_file(
    State(shared): State<Arc<Shared>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    if method != axum::http::Method::GET {
        return not_found().await;
    }
    let path = uri.path();
    let file = {
        let inner = shared.lock();
        inner.repositories.iter().find_map(|(prefix, dir)| {
            let rest = path.strip_prefix(prefix.as_str())?.strip_prefix('/')?;
            let rest = Path::new(rest);
            rest.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
                .then(|| dir.join(rest))
        })
    };
    match file {
        Some(file) => match tokio::fs::read(&file).await {
            Ok(bytes) => (StatusCode::OK, bytes).into_response(),
            Err(_) => not_found().await,
        },
        None => not_found().await,
    }
}

/// The first token present in `headers` (in the order given), else the JSON body's `token`.
/// v17.9.3 sends runner and job tokens as `PRIVATE-TOKEN`; later versions as
/// `RUNNER-TOKEN`/`JOB-TOKEN`; both put them in the body of JSON requests (§9.3).
fn token_from(headers: &HeaderMap, names: &[&str], body: Option<&Value>) -> Option<String> {
    names
        .iter()
        .find_map(|name| headers.get(*name)?.to_str().ok().map(str::to_owned))
        .or_else(|| Some(body?.get("token")?.as_str()?.to_owned()))
}

const JOB_TOKEN_HEADERS: [&str; 2] = ["JOB-TOKEN", "PRIVATE-TOKEN"];

/// A lenient JSON body: the runner always sends JSON where one is expected, but a malformed
/// one should still reach the token check rather than fail extraction.
fn json_body(body: &Bytes) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

/// Job ids in paths are numbers; anything else is an endpoint we do not serve.
fn parse_job_id(id: &str) -> Result<u64, StatusCode> {
    id.parse().map_err(|_| StatusCode::NOT_FOUND)
}

/// Checks that the job is known (404 otherwise, as GitLab answers for a missing job) and
/// that `token` is its token (403 otherwise). Both make the runner abort the job (§9.3).
fn authorize_job(inner: &Inner, job_id: u64, token: Option<&str>) -> Result<(), StatusCode> {
    let Some(expected) = inner.jobs.get(&job_id).and_then(|job| job.token.as_deref()) else {
        return Err(StatusCode::NOT_FOUND);
    };
    if token == Some(expected) {
        Ok(())
    } else {
        Err(StatusCode::FORBIDDEN)
    }
}

fn set_job_status(response: &mut Response, remote: Option<RemoteStatus>) {
    if let Some(remote) = remote {
        response
            .headers_mut()
            .insert(HeaderName::from_static("job-status"), remote.header_value());
    }
}

/// `POST /api/v4/jobs/request` (§9.3 row 1).
async fn request_job(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = json_body(&body);
    let token = token_from(&headers, &["RUNNER-TOKEN", "PRIVATE-TOKEN"], body.as_ref());
    if token.as_deref() != Some(shared.runner_token.as_str()) {
        // The runner logs "forbidden" and, in run-single, sleeps 300 s before polling again.
        return status_response(StatusCode::FORBIDDEN);
    }
    let Some(job) = shared.lock().queue.pop_front() else {
        // The runner polls again after `CheckInterval` (3 s).
        return StatusCode::NO_CONTENT.into_response();
    };
    match serde_json::to_string(&job) {
        // The content type matters: a 201 without `application/json` counts as a failed
        // request and the job is never run (`network/client.go` `doJSON`).
        Ok(payload) => (
            StatusCode::CREATED,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            payload,
        )
            .into_response(),
        Err(_) => status_response(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// `PUT /api/v4/jobs/:id`: a `running` touch (§9.3 rows 2 and 4) or the final update (row 5).
async fn update_job(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let job_id = match parse_job_id(&id) {
        Ok(job_id) => job_id,
        Err(status) => return status_response(status),
    };
    let body = json_body(&body).unwrap_or(Value::Null);
    let token = token_from(&headers, &JOB_TOKEN_HEADERS, Some(&body));
    let mut inner = shared.lock();
    if let Err(status) = authorize_job(&inner, job_id, token.as_deref()) {
        return status_response(status);
    }
    let Some(job) = inner.jobs.get_mut(&job_id) else {
        return status_response(StatusCode::NOT_FOUND);
    };
    match body.get("state").and_then(Value::as_str) {
        Some("running") => {
            // A silent job hears of a cancel only through this answer (§9.3 row 4).
            let mut response = StatusCode::OK.into_response();
            set_job_status(&mut response, job.remote);
            response
        }
        Some(state @ ("success" | "failed")) => {
            let output = body.get("output");
            let update = FinalUpdate {
                state: state.to_owned(),
                failure_reason: body
                    .get("failure_reason")
                    .and_then(Value::as_str)
                    .filter(|reason| !reason.is_empty())
                    .map(str::to_owned),
                exit_code: body
                    .get("exit_code")
                    .and_then(Value::as_i64)
                    .and_then(|code| i32::try_from(code).ok()),
                bytesize: output
                    .and_then(|output| output.get("bytesize"))
                    .and_then(Value::as_u64),
                checksum: output
                    .and_then(|output| output.get("checksum"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            };
            job.final_update.send_replace(Some(update));
            // Dropping the senders ends every trace stream: the runner flushed the trace
            // before this PUT.
            job.subscribers.clear();
            // 200, not 202: a 202 would make the runner sleep and repeat the update.
            StatusCode::OK.into_response()
        }
        _ => status_response(StatusCode::BAD_REQUEST),
    }
}

/// Parses `Content-Range: <start>-<end inclusive>` as the runner writes it (`PatchTrace`).
fn content_range(headers: &HeaderMap) -> Option<(usize, usize)> {
    let value = headers.get("Content-Range")?.to_str().ok()?;
    let (start, end) = value.trim().split_once('-')?;
    Some((start.parse().ok()?, end.parse().ok()?))
}

/// `PATCH /api/v4/jobs/:id/trace` (§9.3 row 3).
async fn patch_trace(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let job_id = match parse_job_id(&id) {
        Ok(job_id) => job_id,
        Err(status) => return status_response(status),
    };
    let token = token_from(&headers, &JOB_TOKEN_HEADERS, None);
    let mut inner = shared.lock();
    if let Err(status) = authorize_job(&inner, job_id, token.as_deref()) {
        return status_response(status);
    }
    let Some(job) = inner.jobs.get_mut(&job_id) else {
        return status_response(StatusCode::NOT_FOUND);
    };
    // The runner never sends an empty patch, and its range always matches the body.
    let Some((start, end)) = content_range(&headers) else {
        return status_response(StatusCode::BAD_REQUEST);
    };
    if body.is_empty() || end.checked_sub(start).map(|span| span + 1) != Some(body.len()) {
        return status_response(StatusCode::BAD_REQUEST);
    }
    let current = job.trace.len();
    let mut response = if start > current {
        // A gap: tell the runner where we are; it resends from there (`NewOffset` reads the
        // number after the dash).
        let mut response = status_response(StatusCode::RANGE_NOT_SATISFIABLE);
        if let Ok(range) = HeaderValue::try_from(format!("0-{current}")) {
            response.headers_mut().insert("Range", range);
        }
        response
    } else {
        // A resend overlapping what we have adds only the bytes past our end (none if it
        // lies wholly inside), so a subscriber sees each byte once.
        let fresh = &body[(current - start).min(body.len())..];
        if !fresh.is_empty() {
            job.trace.extend_from_slice(fresh);
            job.subscribers
                .retain(|subscriber| subscriber.send(fresh.to_vec()).is_ok());
        }
        // 202, never 200: the runner counts anything else as a failed patch (§9.3 row 3).
        let mut response = StatusCode::ACCEPTED.into_response();
        let headers = response.headers_mut();
        if let Ok(range) = HeaderValue::try_from(format!("0-{}", job.trace.len())) {
            headers.insert("Range", range);
        }
        headers.insert(
            "X-GitLab-Trace-Update-Interval",
            HeaderValue::from(TRACE_UPDATE_INTERVAL_SECS),
        );
        response
    };
    set_job_status(&mut response, job.remote);
    response
}

/// `POST /api/v4/jobs/:id/artifacts`: a multipart body, streamed with chunked encoding by
/// the artifacts-uploader, whose `file` part is the archive (§8, §9.3).
async fn upload_artifacts(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let job_id = match parse_job_id(&id) {
        Ok(job_id) => job_id,
        Err(status) => return status_response(status),
    };
    let token = token_from(&headers, &JOB_TOKEN_HEADERS, None);
    if let Err(status) = authorize_job(&shared.lock(), job_id, token.as_deref()) {
        return status_response(status);
    }
    let Ok(mut multipart) = multipart else {
        return status_response(StatusCode::BAD_REQUEST);
    };
    let target = shared.artifacts_path(job_id);
    match store_file_part(&mut multipart, &target).await {
        Ok(true) => json_response(StatusCode::CREATED, &json!({ "message": "201 Created" })),
        Ok(false) | Err(_) => status_response(StatusCode::BAD_REQUEST),
    }
}

/// Streams the `file` part to `target`, through a temporary name so a concurrent download
/// never sees half an archive. `Ok(false)` when there is no `file` part.
async fn store_file_part(multipart: &mut Multipart, target: &Path) -> std::io::Result<bool> {
    let partial = target.with_extension("zip.partial");
    if let Some(dir) = target.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let mut stored = false;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(std::io::Error::other)?
    {
        if field.name() != Some("file") {
            continue;
        }
        let mut file = tokio::fs::File::create(&partial).await?;
        let written = async {
            while let Some(chunk) = field.chunk().await.map_err(std::io::Error::other)? {
                file.write_all(&chunk).await?;
            }
            file.flush().await
        }
        .await;
        drop(file);
        if let Err(error) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(error);
        }
        tokio::fs::rename(&partial, target).await?;
        stored = true;
    }
    Ok(stored)
}

/// `GET /api/v4/jobs/:id/artifacts[?direct_download=true]`. A dependent job downloads with
/// its own token or the dependency's (§8), so any known job's token is accepted.
async fn download_artifacts(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let job_id = match parse_job_id(&id) {
        Ok(job_id) => job_id,
        Err(status) => return status_response(status),
    };
    let token = token_from(&headers, &JOB_TOKEN_HEADERS, None);
    let known = token.is_some_and(|token| {
        shared
            .lock()
            .jobs
            .values()
            .any(|job| job.token.as_deref() == Some(token.as_str()))
    });
    if !known {
        return status_response(StatusCode::FORBIDDEN);
    }
    match tokio::fs::read(shared.artifacts_path(job_id)).await {
        Ok(archive) => (
            StatusCode::OK,
            [(CONTENT_TYPE, HeaderValue::from_static("application/zip"))],
            Body::from(archive),
        )
            .into_response(),
        Err(_) => status_response(StatusCode::NOT_FOUND),
    }
}

/// `POST /api/v4/runners/verify`: unused by run-single, answered so `gitlab-runner verify`
/// pointed here does not fail.
async fn verify_runner(State(shared): State<Arc<Shared>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "id": 1, "token": shared.runner_token, "token_expires_at": null }),
    )
}
