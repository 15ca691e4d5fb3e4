//! drover-libvirt against `benches/libvirt-baseline/driver.sh`, a bash driver doing what GitLab's
//! documented libvirt example does (a qcow2 overlay of the base disk, `virsh define` and
//! `virsh start`, a bounded wait for `ssh ... true`, a new `ssh ... /bin/bash < script` per
//! stage, `virsh destroy` and `undefine`), in the same run on the same guest image: job start,
//! job start from a ready VM (`idle_count = 1`), per-run-stage overhead, output throughput and
//! peak RSS (see `drover_test_support::bench`).
//!
//! Needs libvirt on qemu:///system, the pool `drover-test` and the bench guest with sshd
//! (`tests/setup/libvirt.sh --bench`). Under TCG a boot takes seconds and an ssh handshake about
//! a second, so the rounds are few. Every domain, overlay and cache disk made is removed, also
//! on failure. `cargo bench -p drover-libvirt --bench stages`.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use drover_test_support::bench::{Backend, ReadyStart, Rounds, Side};

const URI: &str = "qemu:///system";
/// The pool of drover-libvirt's overlays and cache disks (the test suite's).
const POOL: &str = "drover-test";
const POOL_DIR: &str = "/var/cache/drover/libvirt-pool";
/// The guest both drivers boot (tests/setup/libvirt.sh --bench).
const IMAGES: &str = "/var/cache/drover/images";
const GUEST: &str = "libvirt-bench-guest";
/// The key the baseline logs in with, authorized in the bench guest.
const KEY: &str = "/var/cache/drover/bench-ssh/id_ed25519";
/// Where the baseline keeps its overlays and console logs (its default).
const BASELINE_DIR: &str = "/var/lib/libvirt/images";
/// drover-libvirt's `runner_name`, part of its domain and volume names.
const RUNNER: &str = "bench";
/// The line the guest's init prints on the serial console once it is up (its sysinit, in
/// tests/setup/libvirt.sh).
const GUEST_READY: &str = "drover test guest: ready";

fn main() -> ExitCode {
    drover_test_support::bench::main(|| {
        let versions = virsh(&["version"])
            .unwrap_or_else(|| panic!("virsh -c {URI} version fails: run tests/setup/libvirt.sh"));
        for file in [
            format!("{IMAGES}/{GUEST}.img"),
            format!("{IMAGES}/{GUEST}.vmlinuz"),
            format!("{IMAGES}/{GUEST}.initrd"),
            KEY.to_owned(),
        ] {
            assert!(
                Path::new(&file).exists(),
                "no {file}: run tests/setup/libvirt.sh --bench"
            );
        }
        Backend {
            driver: "drover-libvirt",
            drover: env!("CARGO_BIN_EXE_drover-libvirt"),
            baseline: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../benches/libvirt-baseline/driver.sh"),
            baseline_name: "benches/libvirt-baseline/driver.sh",
            version: format!("{}, TCG, 1 vCPU, 512 MiB", version(&versions)),
            exec_client: "ssh",
            daemon: "libvirtd and QEMU",
            settings: |state| settings(state, 0),
            ready_start: Some(ReadyStart {
                settings: |state| settings(state, 1),
                wait: ready_vm_booted,
                remove: remove_ready,
            }),
            force_remove: |side, id| match side {
                Side::Baseline => {
                    let domain = format!("baseline-libvirt-job-{id}");
                    remove_domain(&domain);
                    for file in [
                        format!("{BASELINE_DIR}/{domain}.qcow2"),
                        format!("{BASELINE_DIR}/{domain}.console.log"),
                    ] {
                        let _ = std::fs::remove_file(file);
                    }
                }
                Side::Drover => {
                    // A job that took a ready VM runs in that VM, which `remove_ready` removes.
                    let domain = format!("drover-{RUNNER}-p1-j{id}");
                    remove_domain(&domain);
                    delete_volume(&format!("{domain}.qcow2"));
                }
            },
            // The project's cache disks (`drover-bench-p1-cache*.raw`), kept for its later jobs.
            remove_kept: || {
                for volume in volumes() {
                    if volume.starts_with(&format!("drover-{RUNNER}-p1-cache")) {
                        delete_volume(&volume);
                    }
                }
            },
            rounds: Rounds {
                start: 3,
                stage_warmup: 3,
                stage: 20,
                output: 2,
            },
        }
    })
}

/// drover-libvirt's settings, keeping `idle_count` VMs ready.
fn settings(state: &Path, idle_count: usize) -> String {
    format!(
        "runner_name = {RUNNER:?}\n\
         [driver]\nuri = {URI:?}\nstate_dir = {state:?}\npool = {POOL:?}\npool_dir = {POOL_DIR:?}\n\
         domain_type = \"qemu\"\nvcpus = 1\nmemory = \"512MiB\"\ncache_size = \"64MiB\"\n\
         idle_count = {idle_count}\n\
         [driver.images.\"debian:bookworm\"]\ndisk = \"{IMAGES}/{GUEST}.img\"\n\
         kernel = \"{IMAGES}/{GUEST}.vmlinuz\"\ninitrd = \"{IMAGES}/{GUEST}.initrd\"\n\
         [policy]\ndefault_image = \"debian:bookworm\"\n"
    )
}

/// The ready VMs of the bench's runner: `drover-bench-ready-*`.
fn ready_prefix() -> String {
    format!("drover-{RUNNER}-ready-")
}

/// Waits up to 120 s until a ready VM's console (`<state_dir>/jobs/<vm>/console.log`) shows
/// the guest's ready line, then 2 s more: the guest's agent starts right after that line
/// (about half a second under TCG), and the start measured must be a hand-over, not the end of
/// a boot. A VM left ready waits far longer than that between jobs.
fn ready_vm_booted(state_dir: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    let booted = || {
        std::fs::read_dir(state_dir.join("jobs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&ready_prefix())
            })
            .any(|entry| {
                std::fs::read(entry.path().join("console.log"))
                    .is_ok_and(|log| String::from_utf8_lossy(&log).contains(GUEST_READY))
            })
    };
    while Instant::now() < deadline {
        if booted() {
            std::thread::sleep(Duration::from_secs(2));
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Removes the bench runner's ready VMs: `gc` under `idle_count = 0` (the driver's own way),
/// then whatever is still there of them (a `gc` that failed), by name.
fn remove_ready(state_dir: &Path) {
    let config = state_dir.with_file_name("gc.toml");
    if std::fs::write(&config, settings(state_dir, 0)).is_ok() {
        let gc = Command::new(env!("CARGO_BIN_EXE_drover-libvirt"))
            .arg("--config")
            .arg(&config)
            .arg("gc")
            .stdin(Stdio::null())
            .output();
        match gc {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "warning: drover-libvirt gc: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!("warning: drover-libvirt gc: {error}"),
        }
    }
    for domain in virsh(&["list", "--all", "--name"])
        .unwrap_or_default()
        .lines()
    {
        if domain.starts_with(&ready_prefix()) {
            remove_domain(domain);
        }
    }
    for volume in volumes() {
        if volume.starts_with(&ready_prefix()) {
            delete_volume(&volume);
        }
    }
}

/// `virsh -c URI -q <args>`'s stdout, or `None` when it fails.
fn virsh(args: &[&str]) -> Option<String> {
    let output = Command::new("virsh")
        .args(["-c", URI, "-q"])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Destroys and undefines `domain`, if there is one.
fn remove_domain(domain: &str) {
    let _ = virsh(&["destroy", domain]);
    let _ = virsh(&["undefine", domain]);
}

/// The volumes of drover-libvirt's pool.
fn volumes() -> Vec<String> {
    virsh(&["vol-list", "--pool", POOL])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn delete_volume(volume: &str) {
    let _ = virsh(&["vol-delete", "--pool", POOL, volume]);
}

/// `libvirt 9.0.0, QEMU 7.2.22` from `virsh version`.
fn version(versions: &str) -> String {
    let field = |prefix: &str| {
        versions
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .map_or("?", str::trim)
            .to_owned()
    };
    format!(
        "{}, {}",
        field("Using library: "),
        field("Running hypervisor: ")
    )
}
