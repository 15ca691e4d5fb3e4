//! The fake coordinator answers what GitLab Runner expects (contract §9.3): status codes,
//! headers and payloads, checked over real HTTP.

use std::time::Duration;

use drover_harness::coordinator::{Coordinator, FinalUpdate, TRACE_UPDATE_INTERVAL_SECS};
use drover_protocol::JobResponse;
use reqwest::{Client, Response, StatusCode};
use serde_json::json;
use tempfile::TempDir;
use tokio::time::timeout;

/// A plain-HTTP client. In the workspace reqwest carries rustls without a crypto provider
/// (drover-lxd brings ring for HTTPS to LXD), and reqwest builds no client without one.
fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new()
}

/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

async fn start() -> (Coordinator, TempDir) {
    let storage = tempfile::tempdir().expect("temp dir");
    let coordinator = Coordinator::start(storage.path().join("artifacts"))
        .await
        .expect("coordinator starts");
    (coordinator, storage)
}

/// The minimal payload of §9.4 with the given id and token.
fn job(id: u64, token: &str) -> JobResponse {
    serde_json::from_value(json!({
        "id": id,
        "token": token,
        "allow_git_fetch": false,
        "job_info": {"name": "hello", "stage": "test", "project_id": 42, "project_name": "demo"},
        "git_info": {"repo_url": "http://127.0.0.1:8080/group/demo.git", "ref": "main",
                     "sha": "0123456789abcdef0123456789abcdef01234567",
                     "before_sha": "0000000000000000000000000000000000000000",
                     "ref_type": "branch", "refspecs": [], "depth": 0},
        "runner_info": {"timeout": 600},
        "variables": [{"key": "CI_JOB_ID", "value": id.to_string(), "public": true}],
        "steps": [{"name": "script", "script": ["echo hi"], "timeout": 600,
                   "when": "on_success", "allow_failure": false}],
        "features": {"trace_sections": true}
    }))
    .expect("valid payload")
}

fn api(coordinator: &Coordinator, path: &str) -> String {
    format!("{}api/v4/{path}", coordinator.url())
}

async fn send(request: reqwest::RequestBuilder) -> Response {
    timeout(WAIT, request.send())
        .await
        .expect("answered in time")
        .expect("request succeeds")
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header"))
}

/// A trace PATCH as the runner sends it: `JOB-TOKEN`, inclusive `Content-Range`, raw bytes.
async fn patch_trace(
    client: &Client,
    coordinator: &Coordinator,
    id: u64,
    token: &str,
    start: usize,
    bytes: &[u8],
) -> Response {
    let end = start + bytes.len() - 1;
    send(
        client
            .patch(api(
                coordinator,
                &format!("jobs/{id}/trace?debug_trace=false"),
            ))
            .header("JOB-TOKEN", token)
            .header("Content-Range", format!("{start}-{end}"))
            .header("Content-Type", "text/plain")
            .body(bytes.to_vec()),
    )
    .await
}

async fn put_job(
    client: &Client,
    coordinator: &Coordinator,
    id: u64,
    token_header: Option<(&str, &str)>,
    body: serde_json::Value,
) -> Response {
    let mut request = client
        .put(api(coordinator, &format!("jobs/{id}")))
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some((name, value)) = token_header {
        request = request.header(name, value);
    }
    send(request).await
}

#[tokio::test]
async fn job_request_answers_204_403_and_201_with_json() {
    let (coordinator, _storage) = start().await;
    let client = client();
    let runner_token = coordinator.runner_token().to_owned();
    assert!(runner_token.starts_with("glrt-") && runner_token.len() >= 14);
    let request = || client.post(api(&coordinator, "jobs/request"));
    let info = json!({"info": {"name": "gitlab-runner"}, "system_id": "s_0123456789ab"});

    let none = send(
        request()
            .header("RUNNER-TOKEN", &runner_token)
            .body(info.to_string()),
    )
    .await;
    assert_eq!(none.status(), StatusCode::NO_CONTENT);

    coordinator.enqueue(job(11, "job-token-11"));
    coordinator.enqueue(job(12, "job-token-12"));
    coordinator.enqueue(job(13, "job-token-13"));
    let wrong = send(request().header("RUNNER-TOKEN", "glrt-not-the-right-one")).await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let missing = send(request().body(info.to_string())).await;
    assert_eq!(missing.status(), StatusCode::FORBIDDEN);

    // v17.11+ style, v17.9.3 style (`PRIVATE-TOKEN`), and the token in the body only.
    let by_runner_header = send(request().header("RUNNER-TOKEN", &runner_token)).await;
    let by_private_header = send(request().header("PRIVATE-TOKEN", &runner_token)).await;
    let mut with_token = info.clone();
    with_token["token"] = json!(runner_token);
    let by_body = send(request().body(with_token.to_string())).await;
    for (response, id) in [
        (by_runner_header, 11),
        (by_private_header, 12),
        (by_body, 13),
    ] {
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(header(&response, "content-type"), Some("application/json"));
        let bytes = response.bytes().await.expect("body");
        let payload = JobResponse::parse(&bytes).expect("a job payload");
        assert_eq!(payload.id, id);
        assert_eq!(payload.token, format!("job-token-{id}"));
        assert_eq!(payload, job(id, &format!("job-token-{id}")));
    }

    let drained = send(request().header("RUNNER-TOKEN", &runner_token)).await;
    assert_eq!(drained.status(), StatusCode::NO_CONTENT);
    let statuses: Vec<u16> = coordinator.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [204, 403, 403, 201, 201, 201, 204]);
    assert!(
        coordinator
            .requests()
            .iter()
            .all(|r| r.method == "POST" && r.path == "/api/v4/jobs/request")
    );
}

#[tokio::test]
async fn trace_patches_append_dedupe_overlaps_and_reject_gaps() {
    let (coordinator, _storage) = start().await;
    let client = client();
    // Subscribed before the job exists, as a test does before starting the runner.
    let mut stream = coordinator.trace_stream(21);
    coordinator.enqueue(job(21, "tok-21"));

    let first = patch_trace(&client, &coordinator, 21, "tok-21", 0, b"hello").await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert_eq!(
        header(&first, "X-GitLab-Trace-Update-Interval"),
        Some(TRACE_UPDATE_INTERVAL_SECS.to_string().as_str())
    );
    assert_eq!(header(&first, "Job-Status"), None);

    // A resend overlapping the end adds only the new bytes; a full resend adds nothing.
    let overlap = patch_trace(&client, &coordinator, 21, "tok-21", 3, b"lo world").await;
    assert_eq!(overlap.status(), StatusCode::ACCEPTED);
    let repeat = patch_trace(&client, &coordinator, 21, "tok-21", 0, b"hello").await;
    assert_eq!(repeat.status(), StatusCode::ACCEPTED);
    assert_eq!(coordinator.trace(21), b"hello world");

    // A gap: 416 and `Range: 0-<our length>`, from which the runner resumes.
    let gap = patch_trace(&client, &coordinator, 21, "tok-21", 20, b"late").await;
    assert_eq!(gap.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&gap, "Range"), Some("0-11"));
    assert_eq!(coordinator.trace(21), b"hello world");

    // Not UTF-8, and kept byte for byte.
    let binary: &[u8] = &[b'\n', 0xff, 0xfe, 0x00, 0x80, b'\r', 0xc3];
    let raw = patch_trace(&client, &coordinator, 21, "tok-21", 11, binary).await;
    assert_eq!(raw.status(), StatusCode::ACCEPTED);
    let mut expected = b"hello world".to_vec();
    expected.extend_from_slice(binary);
    assert_eq!(coordinator.trace(21), expected);

    let wrong = patch_trace(&client, &coordinator, 21, "tok-other", 0, b"x").await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let unknown = patch_trace(&client, &coordinator, 999, "tok-21", 0, b"x").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let no_range = send(
        client
            .patch(api(&coordinator, "jobs/21/trace"))
            .header("JOB-TOKEN", "tok-21")
            .body("x"),
    )
    .await;
    assert_eq!(no_range.status(), StatusCode::BAD_REQUEST);

    // The stream saw each byte once, in order, and ends with the final update.
    let done = put_job(
        &client,
        &coordinator,
        21,
        Some(("JOB-TOKEN", "tok-21")),
        json!({"state": "success", "output": {"bytesize": expected.len()}}),
    )
    .await;
    assert_eq!(done.status(), StatusCode::OK);
    let mut streamed = Vec::new();
    let mut chunks = Vec::new();
    while let Some(chunk) = timeout(WAIT, stream.recv()).await.expect("stream ends") {
        streamed.extend_from_slice(&chunk);
        chunks.push(chunk);
    }
    assert_eq!(streamed, expected);
    assert_eq!(
        chunks,
        [b"hello".to_vec(), b" world".to_vec(), binary.to_vec()]
    );

    // A late subscriber gets the whole trace at once, then the end.
    let mut late = coordinator.trace_stream(21);
    let backlog = timeout(WAIT, late.recv()).await.expect("backlog");
    assert_eq!(backlog, Some(expected));
    assert_eq!(timeout(WAIT, late.recv()).await.expect("ended"), None);
}

#[tokio::test]
async fn cancel_and_abort_show_in_job_status() {
    let (coordinator, _storage) = start().await;
    let client = client();
    coordinator.enqueue(job(31, "tok-31"));
    let touch = json!({"state": "running", "token": "tok-31", "output": {"bytesize": 0}});

    let plain = put_job(&client, &coordinator, 31, None, touch.clone()).await;
    assert_eq!(plain.status(), StatusCode::OK);
    assert_eq!(header(&plain, "Job-Status"), None);

    coordinator.cancel(31);
    let patched = patch_trace(&client, &coordinator, 31, "tok-31", 0, b"step 1\n").await;
    assert_eq!(patched.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&patched, "Job-Status"), Some("canceling"));
    let touched = put_job(&client, &coordinator, 31, None, touch.clone()).await;
    assert_eq!(touched.status(), StatusCode::OK);
    assert_eq!(header(&touched, "Job-Status"), Some("canceling"));

    coordinator.abort(31);
    let patched = patch_trace(&client, &coordinator, 31, "tok-31", 7, b"step 2\n").await;
    assert_eq!(header(&patched, "Job-Status"), Some("canceled"));
    let touched = put_job(&client, &coordinator, 31, None, touch.clone()).await;
    assert_eq!(header(&touched, "Job-Status"), Some("canceled"));
    // A cancel after an abort does not soften it.
    coordinator.cancel(31);
    let touched = put_job(&client, &coordinator, 31, None, touch).await;
    assert_eq!(header(&touched, "Job-Status"), Some("canceled"));
}

#[tokio::test]
async fn final_update_is_recorded_and_wakes_waiters() {
    let (coordinator, _storage) = start().await;
    let client = client();
    coordinator.enqueue(job(41, "tok-41"));

    // v17.9.3 puts the job token in `PRIVATE-TOKEN` (and the body).
    let touch = put_job(
        &client,
        &coordinator,
        41,
        Some(("PRIVATE-TOKEN", "tok-41")),
        json!({"state": "running", "token": "tok-41"}),
    )
    .await;
    assert_eq!(touch.status(), StatusCode::OK);
    assert_eq!(coordinator.final_update(41), None);

    let wrong = put_job(
        &client,
        &coordinator,
        41,
        Some(("JOB-TOKEN", "tok-nope")),
        json!({"state": "success"}),
    )
    .await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    let unknown = put_job(
        &client,
        &coordinator,
        4242,
        Some(("JOB-TOKEN", "tok-41")),
        json!({"state": "success"}),
    )
    .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(coordinator.final_update(41), None);

    let expected = FinalUpdate {
        state: "failed".into(),
        failure_reason: Some("script_failure".into()),
        exit_code: Some(3),
        bytesize: Some(12),
        checksum: Some("crc32:0badf00d".into()),
    };
    let (waited, answered) = tokio::join!(timeout(WAIT, coordinator.wait_final(41)), async {
        // Give the waiter a moment to park first: it must be woken, not just find it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        put_job(
            &client,
            &coordinator,
            41,
            Some(("JOB-TOKEN", "tok-41")),
            json!({"state": "failed", "token": "tok-41", "failure_reason": "script_failure",
                       "exit_code": 3, "checksum": "crc32:0badf00d",
                       "output": {"checksum": "crc32:0badf00d", "bytesize": 12}}),
        )
        .await
    });
    assert_eq!(answered.status(), StatusCode::OK);
    assert_eq!(waited.expect("final update in time"), expected);
    assert_eq!(coordinator.final_update(41), Some(expected.clone()));
    // Later waiters resolve at once.
    let again = timeout(WAIT, coordinator.wait_final(41)).await;
    assert_eq!(again.expect("already there"), expected);

    // Token in the body only; a success carries no exit code (the runner omits 0).
    coordinator.enqueue(job(42, "tok-42"));
    let success = put_job(
        &client,
        &coordinator,
        42,
        None,
        json!({"state": "success", "token": "tok-42", "output": {"bytesize": 0}}),
    )
    .await;
    assert_eq!(success.status(), StatusCode::OK);
    let update = timeout(WAIT, coordinator.wait_final(42))
        .await
        .expect("recorded");
    assert_eq!(update.state, "success");
    assert_eq!(update.failure_reason, None);
    assert_eq!(update.exit_code, None);
}

#[tokio::test]
async fn artifacts_upload_streamed_multipart_and_download_with_any_known_token() {
    let (coordinator, storage) = start().await;
    let client = client();
    coordinator.enqueue(job(51, "tok-51"));
    coordinator.enqueue(job(52, "tok-52"));
    let download = |token: &str, query: &str| {
        client
            .get(api(&coordinator, &format!("jobs/51/artifacts{query}")))
            .header("JOB-TOKEN", token.to_owned())
    };

    let before = send(download("tok-51", "")).await;
    assert_eq!(before.status(), StatusCode::NOT_FOUND);
    assert_eq!(coordinator.artifacts(51), None);

    // Larger than axum's default 2 MB body limit, with every byte value, sent as a stream so
    // the request goes out chunked, as the artifacts-uploader sends it.
    let archive: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let upload = |token: &str| {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            archive.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let part = reqwest::multipart::Part::stream(body)
            .file_name("artifacts.zip")
            .mime_str("application/octet-stream")
            .expect("mime");
        client
            .post(api(
                &coordinator,
                "jobs/51/artifacts?artifact_format=zip&artifact_type=archive&expire_in=1d",
            ))
            .header("JOB-TOKEN", token.to_owned())
            .multipart(reqwest::multipart::Form::new().part("file", part))
    };

    let forbidden = send(upload("tok-unknown")).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    // The uploader's token must be the job's own.
    let other_job = send(upload("tok-52")).await;
    assert_eq!(other_job.status(), StatusCode::FORBIDDEN);
    assert_eq!(coordinator.artifacts(51), None);

    let created = send(upload("tok-51")).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(header(&created, "content-type"), Some("application/json"));
    assert_eq!(
        coordinator.artifacts(51).as_deref(),
        Some(archive.as_slice())
    );
    let stored = storage.path().join("artifacts/51/artifacts.zip");
    assert_eq!(std::fs::read(stored).expect("stored on disk"), archive);

    // Its own token, or a dependent job's token with `direct_download`.
    for (token, query) in [("tok-51", ""), ("tok-52", "?direct_download=true")] {
        let response = send(download(token, query)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "content-type"), Some("application/zip"));
        let bytes = timeout(WAIT, response.bytes()).await.expect("in time");
        assert_eq!(bytes.expect("body").as_ref(), archive.as_slice());
    }
    let stranger = send(download("tok-unknown", "")).await;
    assert_eq!(stranger.status(), StatusCode::FORBIDDEN);

    let not_multipart = send(
        client
            .post(api(&coordinator, "jobs/51/artifacts"))
            .header("JOB-TOKEN", "tok-51")
            .body("plain"),
    )
    .await;
    assert_eq!(not_multipart.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_endpoints_are_404_and_recorded() {
    let (coordinator, _storage) = start().await;
    let client = client();

    let verify = send(client.post(api(&coordinator, "runners/verify"))).await;
    assert_eq!(verify.status(), StatusCode::OK);
    let discovery = send(client.get(api(&coordinator, "runners/router/discovery"))).await;
    assert_eq!(discovery.status(), StatusCode::NOT_FOUND);
    // A served path with a method we do not serve is a 404 too, not a 405.
    let wrong_method = send(client.get(api(&coordinator, "jobs/request"))).await;
    assert_eq!(wrong_method.status(), StatusCode::NOT_FOUND);
    let bad_id = send(client.put(api(&coordinator, "jobs/abc"))).await;
    assert_eq!(bad_id.status(), StatusCode::NOT_FOUND);

    let records: Vec<(String, String, u16)> = coordinator
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect();
    assert_eq!(
        records,
        [
            ("POST".into(), "/api/v4/runners/verify".into(), 200),
            ("GET".into(), "/api/v4/runners/router/discovery".into(), 404),
            ("GET".into(), "/api/v4/jobs/request".into(), 404),
            ("PUT".into(), "/api/v4/jobs/abc".into(), 404),
        ]
    );

    let url = coordinator.url();
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with('/'));
    timeout(WAIT, coordinator.shutdown())
        .await
        .expect("shuts down");
    let refused = timeout(
        WAIT,
        client.post(format!("{url}api/v4/jobs/request")).send(),
    )
    .await
    .expect("answered in time");
    assert!(refused.is_err(), "server still answering after shutdown");
}
