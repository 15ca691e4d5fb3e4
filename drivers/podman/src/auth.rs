//! Registry credentials for pulling a job's image, the way the docker executor finds them:
//! the operator's own first, then the job's `DOCKER_AUTH_CONFIG`, then GitLab's registry
//! credentials for images in the project's registry (`CI_REGISTRY_*`, `CI_JOB_TOKEN`).

use std::collections::BTreeMap;

use bollard::auth::DockerCredentials;
use drover_core::protocol::JobEnv;
use serde::Deserialize;

/// A username and password for one registry in the operator's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

/// The registry an image reference names: its first path component when that looks like a
/// host (has a `.` or `:`, or is `localhost`), else Docker Hub.
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Credentials for pulling `image`, if any source has them.
pub fn credentials_for(
    image: &str,
    operator: &BTreeMap<String, Credentials>,
    job: &JobEnv,
) -> Option<DockerCredentials> {
    let registry = registry_of(image);
    if let Some(found) = operator.get(registry) {
        return Some(basic(registry, &found.username, &found.password));
    }
    if let Some(found) = job
        .variable("DOCKER_AUTH_CONFIG")
        .and_then(|config| from_auth_config(config, registry))
    {
        return Some(found);
    }
    let gitlab_registry = job.variable("CI_REGISTRY")?;
    if gitlab_registry != registry {
        return None;
    }
    match (
        job.variable("CI_REGISTRY_USER"),
        job.variable("CI_REGISTRY_PASSWORD"),
    ) {
        (Some(user), Some(password)) => Some(basic(registry, user, password)),
        _ => job
            .variable("CI_JOB_TOKEN")
            .map(|token| basic(registry, "gitlab-ci-token", token)),
    }
}

fn basic(registry: &str, username: &str, password: &str) -> DockerCredentials {
    DockerCredentials {
        username: Some(username.to_owned()),
        password: Some(password.to_owned()),
        serveraddress: Some(registry.to_owned()),
        ..DockerCredentials::default()
    }
}

/// `{"auths": {"registry": {"auth": "<base64 user:pass>"}}}`, as docker's config.json.
fn from_auth_config(config: &str, registry: &str) -> Option<DockerCredentials> {
    #[derive(Deserialize)]
    struct Config {
        auths: BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config = serde_json::from_str(config).ok()?;
    let (host, entry) = config.auths.into_iter().find(|(host, _)| {
        let host = host
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        host.split('/').next() == Some(registry)
    })?;
    Some(DockerCredentials {
        auth: entry.auth,
        username: entry.username,
        password: entry.password,
        serveraddress: Some(host),
        ..DockerCredentials::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(vars: &[(&str, &str)]) -> JobEnv {
        let mut env: BTreeMap<String, String> = [
            ("BUILD_FAILURE_EXIT_CODE", "1"),
            ("SYSTEM_FAILURE_EXIT_CODE", "2"),
            ("JOB_RESPONSE_FILE", "/r.json"),
        ]
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
        for (k, v) in vars {
            env.insert(format!("CUSTOM_ENV_{k}"), (*v).into());
        }
        JobEnv::from_map(&env).expect("env")
    }

    #[test]
    fn registries_are_read_from_image_names() {
        assert_eq!(registry_of("debian:12"), "docker.io");
        assert_eq!(registry_of("library/debian"), "docker.io");
        assert_eq!(
            registry_of("registry.example.com/group/app:1"),
            "registry.example.com"
        );
        assert_eq!(registry_of("localhost:5000/app"), "localhost:5000");
        assert_eq!(
            registry_of("localhost/drover-test/debian:bookworm"),
            "localhost"
        );
    }

    #[test]
    fn operator_credentials_come_first_then_docker_auth_config_then_the_job_token() {
        let image = "registry.example.com/group/app:1";
        let operator = BTreeMap::from([(
            "registry.example.com".to_owned(),
            Credentials {
                username: "op".into(),
                password: "pw".into(),
            },
        )]);
        let ci = job(&[
            ("CI_REGISTRY", "registry.example.com"),
            ("CI_JOB_TOKEN", "job-token"),
            (
                "DOCKER_AUTH_CONFIG",
                r#"{"auths": {"registry.example.com": {"auth": "dTpw"}}}"#,
            ),
        ]);
        let found = credentials_for(image, &operator, &ci).expect("operator");
        assert_eq!(found.username.as_deref(), Some("op"));
        let found = credentials_for(image, &BTreeMap::new(), &ci).expect("auth config");
        assert_eq!(found.auth.as_deref(), Some("dTpw"));
        let token_only = job(&[
            ("CI_REGISTRY", "registry.example.com"),
            ("CI_JOB_TOKEN", "job-token"),
        ]);
        let found = credentials_for(image, &BTreeMap::new(), &token_only).expect("job token");
        assert_eq!(
            (found.username.as_deref(), found.password.as_deref()),
            (Some("gitlab-ci-token"), Some("job-token"))
        );
        assert!(credentials_for("debian:12", &BTreeMap::new(), &token_only).is_none());
    }
}
