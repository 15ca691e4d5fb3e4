//! Ready instances ("spares"), so a job starts without waiting for LXD to create one.
//!
//! Creating an instance from an image is most of a job's start (unpacking the image into the
//! pool, then shifting its ownership: seconds on a `dir` pool, more when the disk is busy),
//! while starting an existing one takes a fraction of a second. With `idle_count = N`, prepare
//! takes a stopped spare made from the job's image, renames it to the job's name (a rename is
//! atomic in LXD: of two jobs taking the same spare one gets it, the other takes the next or
//! creates its own), gives it the job's configuration and devices, and starts it. Before it
//! returns it asks LXD to create spares up to N again. Those creates are not waited for: LXD
//! runs them on its own, after the driver has exited, so no process of ours outlives the stage.
//!
//! A spare is labelled `user.drover.runner` and `user.drover.spare=<image fingerprint>`; spares
//! of an image that is no longer the job's (the alias was moved to a new image) are deleted by
//! the next replenishing, and `gc` deletes them all when `idle_count` is 0.

use drover_core::naming::{LABEL_RUNNER, ResourceNames};
use drover_core::progress;
use serde_json::{Value, json};

use crate::api::Lxd;
use crate::config_key;

/// The label that marks a spare, holding the fingerprint of its image.
pub const SPARE_LABEL: &str = "drover.spare";

/// The spares of one runner and image.
pub struct Pool<'a> {
    /// The daemon.
    pub lxd: &'a Lxd,
    /// The runner's name.
    pub runner: &'a str,
    /// The full fingerprint of the job's image.
    pub fingerprint: &'a str,
    /// How many spares to keep (`idle_count`).
    pub size: usize,
    /// `container` or `virtual-machine`.
    pub instance_type: &'a str,
    /// The profiles of every instance.
    pub profiles: &'a [String],
}

impl Pool<'_> {
    /// Takes a stopped spare as `name` and gives it `job`'s configuration, devices and
    /// profiles (the body of the create it replaces). Returns the spare's name, or None when
    /// there is none to take; a spare taken but not usable is deleted.
    pub async fn claim(&self, name: &str, job: &Value) -> Option<String> {
        // LXD renames an instance it is still creating, and the create then leaves one that
        // cannot start: only spares no operation works on are taken.
        let busy = self.lxd.busy_instances().await.ok()?;
        let spares: Vec<Value> = self
            .lxd
            .instances()
            .await
            .ok()?
            .into_iter()
            .filter(|instance| self.owns(instance) && self.is_current(instance))
            .filter(|instance| instance["status"] == "Stopped")
            .filter(|instance| !busy.iter().any(|name| instance["name"] == name.as_str()))
            .collect();
        for spare in spares {
            let spare_name = spare["name"].as_str().unwrap_or_default();
            // Another job may have taken it meanwhile.
            if self.lxd.rename(spare_name, name).await.is_err() {
                continue;
            }
            // LXD's own keys (volatile.*: the id map, the base image) stay; the rest is the
            // job's, so the spare label goes.
            let mut config: serde_json::Map<String, Value> = spare["config"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(key, _)| key.starts_with("volatile."))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            config.extend(job["config"].as_object().cloned().unwrap_or_default());
            let update = json!({
                "config": config,
                "devices": job["devices"],
                "profiles": job["profiles"],
                "ephemeral": false,
                "description": "",
            });
            return match self.lxd.update(name, &update).await {
                Ok(()) => Some(spare_name.to_owned()),
                Err(err) => {
                    progress!("Could not use ready instance {spare_name}: {err}; creating one");
                    let _ = self.lxd.delete(name).await;
                    None
                }
            };
        }
        None
    }

    /// Asks LXD to create spares up to the pool's size and to delete this runner's spares of
    /// other images or beyond that size; waits for none of it. Failures only cost a later job
    /// its head start, so they are reported and otherwise ignored.
    pub async fn replenish(&self) {
        let Ok(instances) = self.lxd.instances().await else {
            return;
        };
        let mut kept = 0;
        for spare in instances.iter().filter(|instance| self.owns(instance)) {
            if self.is_current(spare) && kept < self.size {
                kept += 1;
            } else if let Some(name) = spare["name"].as_str() {
                // A spare still being created refuses; the next replenishing tries again.
                let _ = self.lxd.delete_in_background(name).await;
            }
        }
        for _ in kept..self.size {
            let body = json!({
                "name": format!("{}spare-{:08x}", ResourceNames::runner_prefix(self.runner), fastrand::u32(..)),
                "type": self.instance_type,
                "source": {"type": "image", "fingerprint": self.fingerprint},
                "profiles": self.profiles,
                "config": {
                    config_key(LABEL_RUNNER): self.runner,
                    config_key(SPARE_LABEL): self.fingerprint,
                },
            });
            if let Err(err) = self.lxd.create_in_background(&body).await {
                progress!("Could not start making a ready instance for later jobs: {err}");
                return;
            }
        }
    }

    /// Whether `instance` is a spare of this runner.
    fn owns(&self, instance: &Value) -> bool {
        let config = &instance["config"];
        config[config_key(SPARE_LABEL).as_str()].is_string()
            && config[config_key(LABEL_RUNNER).as_str()] == self.runner
    }

    /// Whether a spare was made from the job's image, as the kind of instance wanted.
    fn is_current(&self, spare: &Value) -> bool {
        spare["config"][config_key(SPARE_LABEL).as_str()] == self.fingerprint
            && spare["type"] == self.instance_type
    }
}
