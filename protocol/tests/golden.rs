//! Golden fixtures of every wire format, in the shapes GitLab Runner v17.9.3 and v19.x write
//! (contract §2, §3.1, §3.4): parsing must keep working when the runner adds fields.

use drover_protocol::{ConfigOutput, JobResponse, Service, TrustedIdentity};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path}: {err}"))
}

#[test]
fn job_response_v17_gives_identity_steps_image_and_services() {
    let job = JobResponse::parse(fixture("job_response_v17.json").as_bytes()).expect("v17 payload");
    assert_eq!(
        job.trusted_identity(),
        TrustedIdentity {
            job_id: 1001,
            project_id: 42
        }
    );
    assert_eq!(job.runner_info.effective_timeout_secs(), 600);
    assert_eq!(
        job.steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["script", "after_script"]
    );
    assert_eq!(
        job.image.as_ref().map(|i| i.name.as_str()),
        Some("debian:bookworm")
    );
    assert_eq!(job.services[0].alias, "cache");
    // Variables are user-influenced: a later CI_JOB_ID shadows the first, but identity does not move.
    assert_eq!(job.variable("CI_JOB_ID"), Some("999"));
    assert!(
        job.variables
            .iter()
            .any(|v| v.file && v.key == "CI_SERVER_TLS_CA_FILE")
    );
}

#[test]
fn job_response_v19_with_newer_fields_parses_and_round_trips() {
    let text = fixture("job_response_v19.json");
    let job = JobResponse::parse(text.as_bytes()).expect("v19 payload");
    assert_eq!(
        job.trusted_identity(),
        TrustedIdentity {
            job_id: 2002,
            project_id: 7
        }
    );
    assert_eq!(
        job.runner_info.effective_timeout_secs(),
        7200,
        "timeout 0 means the default"
    );
    assert_eq!(job.git_info.git_ref, "v1.0");
    assert_eq!(job.image.as_ref().map(|i| i.entrypoint.len()), Some(2));
    assert!(job.other.contains_key("inputs"), "unknown fields are kept");
    let again = serde_json::to_vec(&job).expect("serializes");
    assert_eq!(JobResponse::parse(&again).expect("round trip"), job);
}

#[test]
fn config_output_serializes_to_the_golden_bytes() {
    let text = fixture("config_output_full.json");
    let parsed = ConfigOutput::parse_stdout(text.as_bytes())
        .expect("valid")
        .expect("present");
    assert_eq!(parsed.builds_dir_is_shared, Some(true));
    assert_eq!(parsed.to_json(), text);
}

#[test]
fn ci_job_services_in_both_shapes() {
    let v17 = Service::parse_list(&fixture("ci_job_services_v17.json")).expect("v17");
    assert_eq!(v17.len(), 2);
    assert_eq!(v17[0].alias, "cache");
    assert_eq!(
        v17[1].command.as_deref(),
        Some(&["postgres".to_owned(), "-c".into(), "fsync=off".into()][..])
    );
    let v19 = Service::parse_list(&fixture("ci_job_services_v19.json")).expect("v19");
    assert_eq!(v19[0].variables[0].key, "POSTGRES_PASSWORD");
    assert!(
        Service::parse_list("")
            .expect("empty means none")
            .is_empty()
    );
}

/// The exact bytes GitLab Runner v17.9.3 wrote to `JOB_RESPONSE_FILE` for a job served by a
/// fake coordinator (captured by a config_exec that copied the file): Go writes `null` for
/// the empty `services`, `artifacts`, `cache` and `dependencies`.
#[test]
fn the_file_runner_17_9_3_actually_writes_parses() {
    let job = JobResponse::parse(fixture("job_response_written_by_runner_v17.9.3.json").as_bytes())
        .expect("the runner's own bytes");
    assert_eq!(
        job.trusted_identity(),
        TrustedIdentity {
            job_id: 1001,
            project_id: 42
        }
    );
    assert!(job.services.is_empty());
    assert_eq!(job.steps.len(), 2);
}
