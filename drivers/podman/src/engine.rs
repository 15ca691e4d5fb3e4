//! The container engine behind its Docker-compatible API (podman's `system service`, or
//! Docker), through bollard. Every call maps its error to a one-line [`Error`] that names what
//! failed and, where it helps, what to fix; errors that may pass (a busy engine, a timeout) are
//! transient and retried by the caller.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, ExecConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, RemoveContainerOptions,
};
use bytes::Bytes;
use drover_core::channel::{Chunk, Output};
use drover_core::{Error, Result, Stream};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

/// The API version spoken.
const API_VERSION: bollard::ClientVersion = bollard::ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Seconds bollard waits for one API call. Image pulls stream and are not bounded by it.
const API_TIMEOUT_SECS: u64 = 120;

/// Sockets tried, in order, when the operator names none: podman's rootful and rootless
/// sockets, then Docker's.
pub fn default_sockets() -> Vec<PathBuf> {
    let mut sockets = vec![PathBuf::from("/run/podman/podman.sock")];
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR") {
        sockets.push(Path::new(&runtime).join("podman/podman.sock"));
    }
    sockets.push(PathBuf::from("/var/run/docker.sock"));
    sockets
}

/// A connection to the engine.
pub struct Engine {
    docker: Docker,
    /// What the operator should look at when the engine does not answer.
    pub endpoint: String,
}

/// Whether a pull is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull before every job.
    Always,
    /// Pull only when the image is missing.
    IfNotPresent,
    /// Never pull: the image must be present.
    Never,
}

impl Engine {
    /// Connects to `socket` (a path) or, when `None`, the first default socket that exists.
    /// Nothing is sent yet: the first call reports an engine that is down.
    pub fn connect(socket: Option<&Path>) -> Result<Engine> {
        let path = match socket {
            Some(path) => path.to_owned(),
            None => default_sockets().into_iter().find(|p| p.exists()).ok_or_else(|| {
                let tried: Vec<String> = default_sockets().iter().map(|p| p.display().to_string()).collect();
                Error::system(format!(
                    "no podman or Docker API socket found (tried {}); start `podman system service` or set [driver] socket",
                    tried.join(", ")
                ))
            })?,
        };
        let endpoint = path.display().to_string();
        if !path.exists() {
            return Err(Error::system(format!(
                "the engine socket {endpoint} does not exist; start `podman system service unix://{endpoint}` (or dockerd) or fix [driver] socket"
            )));
        }
        // API 1.41 is what podman 4 serves and what every Docker since 20.10 accepts. It is
        // fixed rather than negotiated: podman answers `GET /version` in about 0.8 s, which
        // every stage would pay.
        let docker = Docker::connect_with_unix(&endpoint, API_TIMEOUT_SECS, &API_VERSION)
            .map_err(|err| Error::system(format!("engine socket {endpoint}: {err}")))?;
        Ok(Engine { docker, endpoint })
    }

    /// Checks that the engine answers (`GET /_ping`, fast on podman).
    pub async fn ping(&self) -> Result<()> {
        self.docker
            .ping()
            .await
            .map(|_| ())
            .map_err(|err| unreachable(&self.endpoint, &err))
    }

    /// The engine's name and version, e.g. `Podman Engine 4.3.1 (API 1.41)` or `Docker Engine
    /// 20.10.24 (API 1.41)`. Slow on podman: for `doctor`, not for stages.
    pub async fn describe(&self) -> Result<String> {
        let version = self
            .docker
            .version()
            .await
            .map_err(|err| self.error("version", &err))?;
        let name = version
            .components
            .unwrap_or_default()
            .first()
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "engine".into());
        // Docker names its first component plain `Engine`; podman says `Podman Engine`.
        let name = if name == "Engine" {
            "Docker Engine".to_owned()
        } else {
            name
        };
        Ok(format!(
            "{name} {} (API {})",
            version.version.unwrap_or_default(),
            version.api_version.unwrap_or_default()
        ))
    }

    /// The image's metadata.
    pub async fn inspect_image(&self, image: &str) -> Result<bollard::models::ImageInspect> {
        self.docker
            .inspect_image(image)
            .await
            .map_err(|err| self.error(&format!("inspect image {image}"), &err))
    }

    /// Makes `image` available under `policy`, pulling with `credentials` when needed.
    pub async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: Option<DockerCredentials>,
    ) -> Result<()> {
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(err) if status(&err) == Some(404) => false,
            Err(err) => return Err(self.error(&format!("inspect image {image}"), &err)),
        };
        match (policy, present) {
            (PullPolicy::Never, false) => Err(Error::system(format!(
                "image {image} is not present and pull_policy is never; pull it on the host or change [driver] pull_policy"
            ))),
            (PullPolicy::Never | PullPolicy::IfNotPresent, true) => Ok(()),
            (PullPolicy::Always | PullPolicy::IfNotPresent, _) => {
                self.pull(image, credentials).await
            }
        }
    }

    async fn pull(&self, image: &str, credentials: Option<DockerCredentials>) -> Result<()> {
        drover_core::progress!("Pulling image {image} ...");
        let options = CreateImageOptions {
            from_image: Some(image.to_owned()),
            ..CreateImageOptions::default()
        };
        let mut progress = self.docker.create_image(Some(options), None, credentials);
        while let Some(item) = progress.next().await {
            item.map_err(|err| {
                Error::system(format!(
                    "cannot pull image {image}: {}; check the name, the registry and its credentials",
                    message(&err)
                ))
            })?;
        }
        Ok(())
    }

    /// Creates (not starts) a container.
    pub async fn create(&self, name: &str, body: ContainerCreateBody) -> Result<()> {
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..CreateContainerOptions::default()
        };
        self.docker
            .create_container(Some(options), body)
            .await
            .map(|_| ())
            .map_err(|err| self.error(&format!("create container {name}"), &err))
    }

    /// Starts a created container.
    pub async fn start(&self, name: &str) -> Result<()> {
        self.docker
            .start_container(
                name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|err| self.error(&format!("start container {name}"), &err))
    }

    /// Why a container is not running, e.g. `exited with 137`, or `None` while it runs; a
    /// container that is gone says so.
    pub async fn not_running(&self, name: &str) -> Result<Option<String>> {
        match self
            .docker
            .inspect_container(
                name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(container) => {
                let state = container.state.unwrap_or_default();
                Ok((state.running != Some(true))
                    .then(|| format!("exited with {}", state.exit_code.unwrap_or_default())))
            }
            Err(err) if status(&err) == Some(404) => Ok(Some("was removed".to_owned())),
            Err(err) => Err(self.error(&format!("inspect container {name}"), &err)),
        }
    }

    /// Removes a container and its anonymous volumes; a container that is already gone is
    /// fine (cleanup runs more than once, §6.3).
    pub async fn remove(&self, name: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..RemoveContainerOptions::default()
        };
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if status(&err) == Some(404) => Ok(()),
            Err(err) => Err(self.error(&format!("remove container {name}"), &err)),
        }
    }

    /// Creates a named volume carrying `labels`, so cleanup and gc find it.
    pub async fn create_volume(
        &self,
        name: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let options = bollard::models::VolumeCreateRequest {
            name: Some(name.to_owned()),
            labels: Some(labels.clone().into_iter().collect()),
            ..bollard::models::VolumeCreateRequest::default()
        };
        self.docker
            .create_volume(options)
            .await
            .map(|_| ())
            .map_err(|err| self.error(&format!("create volume {name}"), &err))
    }

    /// Removes a named volume; one that is gone is fine.
    pub async fn remove_volume(&self, name: &str) -> Result<()> {
        let options = bollard::query_parameters::RemoveVolumeOptions { force: true };
        match self.docker.remove_volume(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if status(&err) == Some(404) => Ok(()),
            Err(err) => Err(self.error(&format!("remove volume {name}"), &err)),
        }
    }

    /// Names and labels of all containers (running or not) carrying every `label=value`.
    pub async fn containers_with(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<(String, HashMap<String, String>)>> {
        let filters = label_filters(labels);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..ListContainersOptions::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|err| self.error("list containers", &err))?;
        // Checked here too, as for volumes (see `volumes_with`).
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let name = c.names?.first()?.trim_start_matches('/').to_owned();
                Some((name, c.labels.unwrap_or_default()))
            })
            .filter(|(_, found)| has_labels(found, labels))
            .collect())
    }

    /// Names and labels of the volumes carrying every `label=value`.
    pub async fn volumes_with(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<(String, HashMap<String, String>)>> {
        let filters = label_filters(labels);
        let options = bollard::query_parameters::ListVolumesOptions {
            filters: Some(filters),
        };
        let volumes = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(|err| self.error("list volumes", &err))?;
        // podman 4.3 gives the volumes matching *any* of several label filters (Docker: all),
        // so each is checked here too: a cleanup must never take another runner's volume.
        Ok(volumes
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter(|v| has_labels(&v.labels, labels))
            .map(|v| (v.name, v.labels))
            .collect())
    }

    /// The `USER` an image runs as (empty: root).
    pub async fn image_user(&self, image: &str) -> Result<String> {
        let inspect = self.inspect_image(image).await?;
        Ok(inspect.config.and_then(|c| c.user).unwrap_or_default())
    }

    /// Starts `cmd` in `container` with `stdin` as its whole input, and returns the exec's id
    /// and its stdout and stderr as they come.
    pub async fn exec(
        &self,
        container: &str,
        cmd: &[String],
        stdin: Bytes,
    ) -> Result<(String, Output<'static>)> {
        let config = ExecConfig {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(cmd.to_vec()),
            ..ExecConfig::default()
        };
        let exec = self
            .docker
            .create_exec(container, config)
            .await
            .map_err(|err| self.error(&format!("exec in container {container}"), &err))?;
        let started = self
            .docker
            .start_exec(&exec.id, Some(StartExecOptions::default()))
            .await
            .map_err(|err| self.error(&format!("start exec in container {container}"), &err))?;
        let StartExecResults::Attached { output, mut input } = started else {
            return Err(Error::system("the engine started the exec detached"));
        };
        input.write_all(&stdin).await.map_err(|err| {
            Error::system(format!("cannot send the script to {container}: {err}"))
        })?;
        // EOF on the command's stdin: it has all of it.
        input.shutdown().await.map_err(|err| {
            Error::system(format!(
                "cannot close the input of the exec in {container}: {err}"
            ))
        })?;
        let output = output.filter_map(|frame| async move {
            match frame {
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    Some(Ok(Chunk {
                        stream: Stream::Stdout,
                        bytes: message,
                    }))
                }
                Ok(LogOutput::StdErr { message }) => Some(Ok(Chunk {
                    stream: Stream::Stderr,
                    bytes: message,
                })),
                Ok(LogOutput::StdIn { .. }) => None,
                Err(err) => Some(Err(std::io::Error::other(message(&err)))),
            }
        });
        Ok((exec.id, Box::pin(output)))
    }

    /// The exit code of a finished exec.
    pub async fn exec_exit_code(&self, container: &str, exec: &str) -> Result<i32> {
        let inspect = self
            .docker
            .inspect_exec(exec)
            .await
            .map_err(|err| self.error(&format!("exec status in {container}"), &err))?;
        inspect
            .exit_code
            .and_then(|c| i32::try_from(c).ok())
            .ok_or_else(|| {
                Error::system(format!(
                    "the engine reported no exit code for the exec in {container}"
                ))
            })
    }

    fn error(&self, what: &str, err: &bollard::errors::Error) -> Error {
        match err {
            bollard::errors::Error::DockerResponseServerError { status_code, .. }
                if *status_code >= 500 && *status_code != 501 =>
            {
                Error::transient(format!("{what}: {}", message(err)))
            }
            bollard::errors::Error::DockerResponseServerError { .. } => {
                Error::system(format!("{what}: {}", message(err)))
            }
            bollard::errors::Error::RequestTimeoutError => Error::transient(format!(
                "{what}: the engine at {} did not answer within {API_TIMEOUT_SECS} s",
                self.endpoint
            )),
            _ => unreachable(&self.endpoint, err),
        }
    }
}

/// The engine's filter for resources carrying every `label=value` (see [`has_labels`]).
fn label_filters(labels: &[(&str, &str)]) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_owned(),
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    )])
}

/// Whether `found` carries every `label=value` of `wanted`.
fn has_labels(found: &HashMap<String, String>, wanted: &[(&str, &str)]) -> bool {
    wanted
        .iter()
        .all(|(label, value)| found.get(*label).map(String::as_str) == Some(*value))
}

fn status(err: &bollard::errors::Error) -> Option<u16> {
    match err {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own message, on one line.
fn message(err: &bollard::errors::Error) -> String {
    match err {
        bollard::errors::Error::DockerResponseServerError { message, .. } => {
            message.trim().to_owned()
        }
        other => other.to_string(),
    }
}

fn unreachable(endpoint: &str, err: &bollard::errors::Error) -> Error {
    Error::system(format!(
        "cannot reach the engine at {endpoint}: {}; is `podman system service` (or dockerd) running?",
        message(err)
    ))
}
