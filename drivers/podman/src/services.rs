//! `services:` (`CI_JOB_SERVICES`, §3.4): service containers that share one network namespace
//! with the job, the way the Kubernetes executor's pod does, so a service listening on a port
//! is at `127.0.0.1:PORT` and at its alias for the job. The aliases go into a hosts file the
//! driver writes and mounts read-only at `/etc/hosts` in every container of the job (podman
//! refuses `ExtraHosts` on a container that joins another's namespace).

use std::path::Path;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bytes::Bytes;
use drover_core::protocol::Service;
use drover_core::{Job, Result, ResultExt, progress};
use futures_util::StreamExt;

use crate::engine::Engine;
use crate::{KEEPALIVE, LABEL_ROLE, PodmanSettings};

/// How the job's containers are networked.
pub struct Network {
    /// `NetworkMode` for the job and helper containers.
    pub mode: Option<String>,
    /// Bind mounts every container of the job needs (the hosts file).
    pub binds: Vec<String>,
    /// Each service's first alias and the TCP ports its image exposes.
    services: Vec<(String, Vec<u16>)>,
}

/// The aliases a service is reachable by: its own, or, like the docker executor, the image
/// name without tag with `/` turned into `__` and into `-`.
pub fn aliases(service: &Service) -> Vec<String> {
    if !service.alias.is_empty() {
        return vec![service.alias.clone()];
    }
    let name = service
        .name
        .rsplit_once(':')
        .map_or(service.name.as_str(), |(name, tag)| {
            if tag.contains('/') {
                service.name.as_str()
            } else {
                name
            }
        });
    let mut found = vec![name.replace('/', "__"), name.replace('/', "-")];
    found.dedup();
    found
}

/// Starts the job's services, if it has any, and says how to join their network.
pub async fn prepare_network(
    engine: &Engine,
    job: &Job,
    image: &str,
    settings: &PodmanSettings,
    job_dir: &Path,
) -> Result<Network> {
    let services = &job.env().services;
    if services.is_empty() {
        return Ok(Network {
            mode: settings.network_mode.clone(),
            binds: Vec::new(),
            services: Vec::new(),
        });
    }
    // prepare checked them already, before it made anything.
    let limits = services
        .iter()
        .map(|service| job.policy().service(&service.name))
        .collect::<Result<Vec<_>>>()?;
    let names = job.names();
    let labels = job.labels();
    let all_aliases: Vec<String> = services.iter().flat_map(aliases).collect();
    std::fs::create_dir_all(job_dir)
        .or_system(format_args!("cannot create {}", job_dir.display()))?;
    let hosts = job_dir.join("hosts");
    let text = format!(
        "127.0.0.1\tlocalhost {}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        all_aliases.join(" ")
    );
    std::fs::write(&hosts, text).or_system(format_args!("cannot write {}", hosts.display()))?;
    let hosts_bind = format!("{}:/etc/hosts:ro", hosts.display());

    let holder = names.job_scoped("net");
    let mut holder_labels: std::collections::HashMap<String, String> =
        labels.clone().into_iter().collect();
    holder_labels.insert(LABEL_ROLE.into(), "net".into());
    engine
        .create(
            &holder,
            ContainerCreateBody {
                image: Some(image.to_owned()),
                entrypoint: Some(vec!["sh".into(), "-c".into()]),
                cmd: Some(vec![KEEPALIVE.into()]),
                labels: Some(holder_labels),
                host_config: Some(HostConfig {
                    network_mode: settings.network_mode.clone(),
                    binds: Some(vec![hosts_bind.clone()]),
                    ..HostConfig::default()
                }),
                ..ContainerCreateBody::default()
            },
        )
        .await?;
    engine.start(&holder).await?;
    let mode = Some(format!("container:{holder}"));

    let mut started = Vec::new();
    for (index, (service, limits)) in services.iter().zip(limits).enumerate() {
        let name = names.job_scoped(&format!("svc-{index}"));
        let service_aliases = aliases(service);
        progress!(
            "Starting service {} as {}",
            service.name,
            service_aliases.join(", ")
        );
        engine
            .ensure_image(&service.name, settings.pull_policy, None)
            .await?;
        let ports = engine.exposed_ports(&service.name).await?;
        let mut service_labels: std::collections::HashMap<String, String> =
            labels.clone().into_iter().collect();
        service_labels.insert(LABEL_ROLE.into(), "service".into());
        let body = ContainerCreateBody {
            image: Some(service.name.clone()),
            entrypoint: service.entrypoint.clone(),
            cmd: service.command.clone(),
            env: Some(
                service
                    .variables
                    .iter()
                    .map(|v| format!("{}={}", v.key, v.value))
                    .collect(),
            ),
            labels: Some(service_labels),
            host_config: Some(HostConfig {
                network_mode: mode.clone(),
                binds: Some(vec![hosts_bind.clone()]),
                ..crate::limits(limits.cpus, limits.memory_bytes)
            }),
            ..ContainerCreateBody::default()
        };
        engine.create(&name, body).await?;
        engine
            .start(&name)
            .await
            .map_err(|err| err.context(format_args!("service {}", service.name)))?;
        started.push((
            service_aliases.into_iter().next().unwrap_or_default(),
            ports,
        ));
    }
    Ok(Network {
        mode,
        binds: vec![hosts_bind],
        services: started,
    })
}

/// Waits, bounded, until every port a service's image exposes accepts connections from the
/// job container, as the docker executor does; a service that never answers is a warning in
/// the job log, not a failure (the job may not need it yet).
pub async fn wait_for_ports(
    engine: &Engine,
    job: &Job,
    network: &Network,
    settings: &PodmanSettings,
) {
    let rounds = (settings.service_wait_secs * 4).max(1);
    for (alias, ports) in &network.services {
        for port in ports {
            // bash's /dev/tcp needs no tools in the image; 4 tries a second.
            let probe = format!(
                "for i in $(seq 1 {rounds}); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0; sleep 0.25; done; exit 1"
            );
            let cmd = [settings.shell.clone(), "-c".into(), probe];
            let probe = async {
                let container = job.names().job();
                let (exec, mut output) = engine.exec(&container, &cmd, Bytes::new()).await?;
                while output.next().await.is_some() {}
                engine.exec_exit_code(&container, &exec).await
            };
            let waited = tokio::select! {
                waited = tokio::time::timeout(Duration::from_secs(settings.service_wait_secs + 5), probe) => waited,
                () = job.cancel_token().cancelled() => return,
            };
            if !matches!(waited, Ok(Ok(0))) {
                progress!(
                    "*** WARNING: service {alias} did not answer on port {port} within {} s",
                    settings.service_wait_secs
                );
            }
        }
    }
}

/// Parses `6379/tcp` into 6379; other protocols are not waited for.
pub fn tcp_port(spec: &str) -> Option<u16> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    (proto == "tcp").then(|| port.parse().ok()).flatten()
}

impl Engine {
    /// TCP ports the image declares with `EXPOSE`.
    pub async fn exposed_ports(&self, image: &str) -> Result<Vec<u16>> {
        let inspect = self.inspect_image(image).await?;
        Ok(inspect
            .config
            .and_then(|c| c.exposed_ports)
            .map(|ports| ports.iter().filter_map(|p| tcp_port(p)).collect())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, alias: &str) -> Service {
        Service {
            name: name.into(),
            alias: alias.into(),
            ..Service::default()
        }
    }

    #[test]
    fn aliases_like_the_docker_executor() {
        assert_eq!(aliases(&service("redis:7", "cache")), ["cache"]);
        assert_eq!(aliases(&service("redis:7", "")), ["redis"]);
        assert_eq!(
            aliases(&service("tutum/wordpress:latest", "")),
            ["tutum__wordpress", "tutum-wordpress"]
        );
        assert_eq!(
            aliases(&service("localhost:5000/db", "")),
            ["localhost:5000__db", "localhost:5000-db"]
        );
    }

    #[test]
    fn only_tcp_ports_are_waited_for() {
        assert_eq!(tcp_port("6379/tcp"), Some(6379));
        assert_eq!(tcp_port("53/udp"), None);
        assert_eq!(tcp_port("8080"), Some(8080));
    }
}
