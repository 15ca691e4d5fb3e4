//! Ready VMs (`idle_count`): VMs booted ahead of demand, so a job's start is a hand-over
//! instead of a boot.
//!
//! Booting is nearly all of a cold start (define and start take a fraction of a second; the
//! guest's kernel and init the rest: seconds under KVM, more under TCG). With `idle_count = N`
//! the driver keeps up to N booted VMs per runner and job image, labelled `drover.ready=<key>`
//! and `drover.image=<image>`. They are made from the image alone: no job has touched them, they
//! have no cache disk, and the key (a hash of everything a VM is started with) keeps a VM made
//! under other settings from being handed out. Each is used once.
//!
//! prepare takes the oldest running one by renaming its directory (`jobs/<vm>`) to the job's
//! (`jobs/<job>`): a rename is atomic, the directory keeps a `domain` file naming the VM, and a
//! VM without a directory is taken. Then it relabels the domain as the job's (so `gc` and
//! `cleanup` treat it like any job VM), waits for its agent if it is still booting, plugs the
//! project's cache disk in (only then: an initramfs that found the cache disk first would take
//! it for the root disk), and the setup stage gives the guest its hostname and machine-id. Finally it starts VMs up to N again and does not
//! wait for them to boot; libvirt runs them, so no process of the driver outlives the stage.
//!
//! All of this happens under the driver's state lock (see `StateLock`), as does the choice of
//! a cache disk, so two prepares never take one VM or one cache disk, and `gc` sees no half-made
//! state. A job whose CPUs or memory differ from the defaults gets a VM of its own.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use drover_core::naming::{LABEL_RUNNER, ResourceNames};
use drover_core::{Result, progress};

use crate::libvirt::{Libvirt, Listed};
use crate::{Launch, LibvirtDriver};

/// The label of a ready VM: the key of what it was started with.
pub const LABEL_READY: &str = "drover.ready";
/// The label of a ready VM: the job image it was made from.
pub const LABEL_IMAGE: &str = "drover.image";

/// The key of VMs started from `launch` under these settings: equal keys, interchangeable VMs.
pub fn key(driver: &LibvirtDriver, launch: &Launch<'_>) -> String {
    let mut hasher = DefaultHasher::new();
    (
        launch.image_name,
        &launch.image.disk,
        &launch.image.kernel,
        &launch.image.initrd,
        &launch.image.cmdline,
        &launch.domain_type,
        launch.memory_kib,
        launch.vcpus,
        &launch.helper,
    )
        .hash(&mut hasher);
    (format!("{:?}", driver.network), &driver.template).hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

impl LibvirtDriver {
    /// Takes a ready VM for job `job_name`, relabelled with `labels`; its name, or `None` when
    /// there is none. Call with the state lock held.
    pub(crate) async fn take_ready(
        &self,
        lv: &Libvirt,
        key: &str,
        job_name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let mut ready: Vec<Listed> = self
            .ready_vms(lv)
            .await?
            .into_iter()
            .filter(|vm| vm.labels.get(LABEL_READY).map(String::as_str) == Some(key))
            .collect();
        // Oldest first: its boot is the most likely to be over. Names sort by their start time.
        ready.sort_by(|a, b| a.name.cmp(&b.name));
        for vm in ready {
            if lv.running(&vm.name).await? != Some(true) {
                // Stopped while it waited (a guest that powered off): of no use to anyone.
                self.remove(lv, &vm.name).await?;
                continue;
            }
            match std::fs::rename(self.job_dir(&vm.name), self.job_dir(job_name)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(drover_core::Error::system(format!(
                        "cannot take ready VM {}: {err}",
                        vm.name
                    )));
                }
            }
            lv.set_labels(&vm.name, labels).await?;
            return Ok(Some(vm.name));
        }
        Ok(None)
    }

    /// Starts ready VMs for `launch` up to `idle_count`, after removing those of its image made
    /// under other settings and those that stopped. Never fails the job: what goes wrong is
    /// a line in its log. Call with the state lock held.
    pub(crate) async fn replenish(&self, lv: &Libvirt, key: &str, launch: &Launch<'_>) {
        let wanted = self.settings.idle_count;
        let result = async {
            let mut have = 0;
            for vm in self.ready_vms(lv).await? {
                let same_image =
                    vm.labels.get(LABEL_IMAGE).map(String::as_str) == Some(launch.image_name);
                let current = vm.labels.get(LABEL_READY).map(String::as_str) == Some(key);
                if !same_image {
                    continue;
                }
                if current && have < wanted && lv.running(&vm.name).await? == Some(true) {
                    have += 1;
                } else {
                    self.remove(lv, &vm.name).await?;
                }
            }
            let mut started = 0;
            for _ in have..wanted {
                let name = ready_name(&self.runner);
                let labels = BTreeMap::from([
                    (LABEL_RUNNER.to_owned(), self.runner.clone()),
                    (LABEL_READY.to_owned(), key.to_owned()),
                    (LABEL_IMAGE.to_owned(), launch.image_name.to_owned()),
                ]);
                if let Err(err) = self.start_vm(lv, &name, &name, labels, launch, None).await {
                    let _ = self.remove(lv, &name).await;
                    return Err(err);
                }
                started += 1;
            }
            Ok::<_, drover_core::Error>(started)
        }
        .await;
        match result {
            Ok(0) => {}
            Ok(started) => progress!(
                "Started {started} ready VM(s) from {} for the next jobs",
                launch.image_name
            ),
            Err(err) => progress!("Could not start ready VMs for the next jobs: {err}"),
        }
    }

    /// The ready VMs of this runner that no job has taken.
    pub(crate) async fn ready_vms(&self, lv: &Libvirt) -> Result<Vec<Listed>> {
        Ok(lv
            .drover_domains()
            .await?
            .into_iter()
            .filter(|vm| {
                vm.labels.get(LABEL_RUNNER) == Some(&self.runner)
                    && vm.labels.contains_key(LABEL_READY)
            })
            .filter(|vm| is_untaken(&self.job_dir(&vm.name)))
            .collect())
    }
}

/// Whether a ready VM whose directory is `dir` is still free: taking one moves its directory.
pub fn is_untaken(dir: &Path) -> bool {
    dir.is_dir()
}

/// A new ready VM's name: the runner's prefix, `ready-` and the time in microseconds (fixed
/// width, so names sort by age) and the process id, which keeps two drivers apart.
fn ready_name(runner: &str) -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    format!(
        "{}ready-{micros:014x}-{:x}",
        ResourceNames::runner_prefix(runner),
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_names_sort_by_age_and_belong_to_the_runner() {
        let first = ready_name("ci");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = ready_name("ci");
        assert!(first.starts_with("drover-ci-ready-"), "{first}");
        assert!(first < second, "{first} {second}");
    }
}
