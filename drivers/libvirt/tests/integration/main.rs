//! drover-libvirt against the real libvirtd and QEMU (TCG), called as GitLab Runner calls it
//! (through the `drover` CLI's emulated runner, or the real runner when a binary is given).
//! Every test skips with one line when libvirt or the test guest is missing, or fails where
//! `DROVER_REQUIRE` names `libvirt` (CI); `tests/setup/libvirt.sh` sets both up.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_test_support::require;
use drover_test_support::setup::{DriverSetup, as_runner_calls, response};

const DRIVER: &str = env!("CARGO_BIN_EXE_drover-libvirt");
const URI: &str = "qemu:///system";
const IMAGES: &str = "/var/cache/drover/images";
/// The tests' storage pool, shared by every test (volumes are named by runner).
const POOL: &str = "drover-test";
const POOL_DIR: &str = "/var/cache/drover/libvirt-pool";

/// `true` when libvirt answers and the test guest is built; else a skip (one line saying
/// why), or a failure where `DROVER_REQUIRE` names `libvirt`.
fn libvirt(test: &str) -> bool {
    let answers = virsh(&["version"]).is_some();
    let guest = std::path::Path::new(IMAGES).join("libvirt-guest.img");
    let found = if !answers {
        Err(format!(
            "libvirt does not answer on {URI} (run tests/setup/libvirt.sh as root)"
        ))
    } else if !guest.is_file() {
        Err(format!(
            "no test guest {} (run tests/setup/libvirt.sh as root)",
            guest.display()
        ))
    } else {
        Ok(())
    };
    require::backend("libvirt", test, found).is_some()
}

fn virsh(args: &[&str]) -> Option<String> {
    let output = Command::new("virsh")
        .args(["-c", URI, "-q"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Settings for a runner of its own, so leftovers are attributable to one test; `driver` is
/// more `[driver]` TOML.
fn new_setup(test: &str, driver: &str) -> DriverSetup {
    DriverSetup::new(DRIVER, test, Box::new(leftovers), |runner, state| {
        format!(
            "runner_name = \"{runner}\"\n\
             [driver]\nstate_dir = {state:?}\npool = \"{POOL}\"\npool_dir = \"{POOL_DIR}\"\n\
             vcpus = 1\nmemory = \"512MiB\"\ncache_size = \"64MiB\"\n{driver}\n\
             [driver.images.\"debian:bookworm\"]\ndisk = \"{IMAGES}/libvirt-guest.img\"\n\
             kernel = \"{IMAGES}/libvirt-guest.vmlinuz\"\ninitrd = \"{IMAGES}/libvirt-guest.initrd\"\n\
             [driver.images.\"silent:1\"]\ndisk = \"{IMAGES}/libvirt-guest.img\"\n\
             kernel = \"{IMAGES}/libvirt-guest.vmlinuz\"\ninitrd = \"{IMAGES}/libvirt-guest.initrd\"\n\
             cmdline = \"console=ttyS0 root=/dev/vda rw init=/bin/false\"\n\
             [policy]\ndefault_image = \"debian:bookworm\"\nallowed_images = [\"debian:*\", \"missing:*\", \"silent:*\"]\n"
        )
    })
}

/// What `runner` left: its domains, its job overlays in the pool (its cache disks stay, as a
/// project's cache must), and its job directories.
fn leftovers(runner: &str) -> Vec<String> {
    let prefix = format!("drover-{runner}-");
    let mut left: Vec<String> = virsh(&["list", "--all", "--name"])
        .unwrap_or_default()
        .lines()
        .chain(
            virsh(&["vol-list", POOL])
                .unwrap_or_default()
                .lines()
                .filter_map(|line| line.split_whitespace().next()),
        )
        .filter(|name| name.starts_with(&prefix) && !name.contains("-cache"))
        .map(str::to_owned)
        .collect();
    left.sort();
    left
}

/// Removes what a setup's runner has on libvirt when the test ends, passed or failed: its cache
/// disks (they stay after a job, as a project's cache must) and, after a failure, any domain
/// (ready VMs included) and volume of its. The runner is the test's alone, and a test that
/// passed has asserted there was nothing else left.
struct DropCaches<'a>(&'a DriverSetup);

impl Drop for DropCaches<'_> {
    fn drop(&mut self) {
        let prefix = format!("drover-{}-", self.0.runner);
        for domain in virsh(&["list", "--all", "--name"])
            .unwrap_or_default()
            .lines()
        {
            if domain.starts_with(&prefix) {
                let _ = virsh(&["destroy", domain]);
                let _ = virsh(&["undefine", domain]);
            }
        }
        for line in virsh(&["vol-list", POOL]).unwrap_or_default().lines() {
            if let Some(name) = line
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with(&prefix))
            {
                let _ = virsh(&["vol-delete", "--pool", POOL, name]);
            }
        }
    }
}

#[test]
fn passes_the_conformance_suite_and_leaves_nothing_behind_part_1() {
    passes_part_of_the_conformance_suite(0);
}

#[test]
fn passes_the_conformance_suite_and_leaves_nothing_behind_part_2() {
    passes_part_of_the_conformance_suite(1);
}

#[test]
fn passes_the_conformance_suite_and_leaves_nothing_behind_part_3() {
    passes_part_of_the_conformance_suite(2);
}

/// Every third case of the suite from `part` on (the three parts together run all of them, the
/// hostile group included), each passing, and nothing left afterwards.
fn passes_part_of_the_conformance_suite(part: usize) {
    let test = format!(
        "passes_the_conformance_suite_and_leaves_nothing_behind_part_{}",
        part + 1
    );
    if !libvirt(&test) {
        return;
    }
    let setup = new_setup(&format!("conf{}", part + 1), "domain_type = \"qemu\"");
    let _caches = DropCaches(&setup);
    drover_test_support::setup::expect_conformance_part(&setup, part, 3);
}

#[test]
fn a_missing_base_disk_and_an_unmapped_image_are_one_line_system_failures() {
    if !libvirt("a_missing_base_disk_and_an_unmapped_image_are_one_line_system_failures") {
        return;
    }
    let setup = new_setup(
        "nodisk",
        &format!(
            "domain_type = \"qemu\"\n[driver.images.\"missing:1\"]\ndisk = \"{IMAGES}/no-such-disk.img\""
        ),
    );
    let (ok, log) = setup.run_job("x:\n  image: missing:1\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(
        log.contains("the base disk /var/cache/drover/images/no-such-disk.img cannot be read"),
        "{log}"
    );
    assert!(log.contains("result: runner_system_failure"), "{log}");
    let (ok, log) = setup.run_job("x:\n  image: debian:trixie\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(
        log.contains("no [driver.images] entry maps the job's image \"debian:trixie\""),
        "{log}"
    );
    assert!(!log.contains("never\n"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_guest_that_never_answers_fails_within_boot_secs_with_its_console_and_leaves_nothing() {
    let test =
        "a_guest_that_never_answers_fails_within_boot_secs_with_its_console_and_leaves_nothing";
    if !libvirt(test) {
        return;
    }
    let setup = new_setup("silent", "domain_type = \"qemu\"\nboot_secs = 25");
    let _caches = DropCaches(&setup);
    let started = Instant::now();
    let (ok, log) = setup.run_job("x:\n  image: silent:1\n  script: [echo never]\n", &[]);
    assert!(!ok);
    assert!(
        log.contains("did not answer on its stage channel within 25 s (boot_secs)"),
        "{log}"
    );
    // init=/bin/false: the kernel says why the guest never came up.
    assert!(log.contains("console: "), "{log}");
    assert!(log.contains("Kernel panic"), "{log}");
    assert!(log.contains("result: runner_system_failure"), "{log}");
    // Prepare is tried three times by the runner (§5.1), each bounded.
    assert!(
        started.elapsed() < Duration::from_secs(3 * 25 + 60),
        "{log}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn a_driver_killed_during_prepare_is_cleaned_up_by_cleanup() {
    let test = "a_driver_killed_during_prepare_is_cleaned_up_by_cleanup";
    if !libvirt(test) {
        return;
    }
    let setup = new_setup("killed", "domain_type = \"qemu\"");
    let _caches = DropCaches(&setup);
    let job = response(99301, 7);
    let dir = setup.dir.path().join("custom-executor1");
    std::fs::create_dir_all(&dir).expect("job dir");
    std::fs::write(dir.join("response.json"), &job).expect("response");
    let mut prepare = Command::new(DRIVER);
    prepare.arg("--config").arg(setup.settings()).arg("prepare");
    let mut child = as_runner_calls(&mut prepare, &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prepare runs");
    let domain = format!("drover-{}-p7-j99301", setup.runner);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !leftovers(&setup.runner).contains(&domain) {
        assert!(Instant::now() < deadline, "prepare made no domain in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    assert!(!setup.leftovers().is_empty());
    let cleanup = setup.stage(&job, &["cleanup"]);
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
    assert!(!setup.state_dir().join("jobs").join(&domain).exists());
}

#[test]
fn a_vm_that_powers_off_during_a_stage_is_a_system_failure_with_its_console() {
    let test = "a_vm_that_powers_off_during_a_stage_is_a_system_failure_with_its_console";
    if !libvirt(test) {
        return;
    }
    let setup = new_setup("poweroff", "domain_type = \"qemu\"");
    let _caches = DropCaches(&setup);
    let (ok, log) = setup.run_job(
        "x:\n  script: [echo \"before $((6*7))\", echo o > /proc/sysrq-trigger, sleep 60]\n",
        &[],
    );
    assert!(!ok);
    assert!(log.contains("\nbefore 42"), "{log}");
    assert!(log.contains("stopped while the stage ran"), "{log}");
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn caches_are_per_runner_and_per_project_and_survive_the_vm() {
    let test = "caches_are_per_runner_and_per_project_and_survive_the_vm";
    if !libvirt(test) {
        return;
    }
    let setup = new_setup("cacheiso", "domain_type = \"qemu\"");
    let _caches = DropCaches(&setup);
    let other = new_setup("cacheisob", "domain_type = \"qemu\"");
    let _other_caches = DropCaches(&other);
    drover_test_support::setup::expect_caches_per_runner_and_project(&setup, &other);
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[test]
fn gc_removes_only_expired_jobs_and_doctor_reports_libvirt_and_the_domain_type() {
    let test = "gc_removes_only_expired_jobs_and_doctor_reports_libvirt_and_the_domain_type";
    if !libvirt(test) {
        return;
    }
    // domain_type "auto": the first prepare test-boots under KVM if libvirt offers it.
    let setup = new_setup("gc", "");
    let _caches = DropCaches(&setup);
    setup.abandon_an_expired_job();
    let domain = format!("drover-{}-p5-j99001", setup.runner);
    assert_eq!(
        setup.leftovers(),
        vec![domain.clone(), format!("{domain}.qcow2")]
    );
    setup.expect_gc_removes(&domain);
    assert!(!setup.state_dir().join("jobs").join(&domain).exists());

    let doctor = setup.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(doctor.status.success(), "{text}");
    assert!(text.contains("ok   libvirt: libvirt "), "{text}");
    assert!(
        text.contains(&format!("ok   pool: {POOL} in {POOL_DIR}")),
        "{text}"
    );
    // Either answer is right on some machine; the reason must say how it was found.
    assert!(
        text.contains("domain_type: kvm: a test boot under KVM")
            || text.contains("domain_type: qemu: libvirt offers kvm, but a test boot")
            || text.contains("domain_type: qemu: libvirt offers no kvm"),
        "{text}"
    );
    let broken = new_setup(
        "doctor",
        "uri = \"qemu+unix:///system?socket=/nonexistent\"",
    );
    let doctor = broken.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{text}");
    assert!(text.contains("cannot connect to libvirt"), "{text}");
}

/// The ready VM a job's log says it took, if any.
fn taken_ready_vm(log: &str) -> Option<String> {
    let line = log.lines().find(|line| line.contains("Using ready VM "))?;
    let name = line
        .split("Using ready VM ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    Some(name.to_owned())
}

#[test]
fn ready_vms_start_jobs_without_a_boot_once_each_with_the_projects_cache() {
    let test = "ready_vms_start_jobs_without_a_boot_once_each_with_the_projects_cache";
    if !libvirt(test) {
        return;
    }
    let setup = new_setup("ready", "domain_type = \"qemu\"\nidle_count = 1");
    let _caches = DropCaches(&setup);
    let ready_prefix = format!("drover-{}-ready-", setup.runner);
    // The first job boots its own VM and leaves one ready for the next.
    let (ok, log) = setup.run_job("x:\n  script: [echo first > /cache/mark, hostname]\n", &[]);
    assert!(ok, "{log}");
    assert_eq!(taken_ready_vm(&log), None, "{log}");
    assert!(
        log.contains("Started 1 ready VM(s) from debian:bookworm"),
        "{log}"
    );
    let left = setup.leftovers();
    assert_eq!(left.len(), 2, "one ready VM and its overlay: {left:?}");
    assert!(
        left.iter().all(|name| name.starts_with(&ready_prefix)),
        "{left:?}"
    );
    // The next ones take it: their own hostname, the project's cache plugged in, and a new
    // ready VM each time, since a VM serves one job only.
    let mut taken = Vec::new();
    for round in ["second", "third"] {
        let (ok, log) = setup.run_job(
            &format!("x:\n  script: [cat /cache/mark, echo {round} > /cache/mark, hostname]\n"),
            &[],
        );
        assert!(ok, "{log}");
        let vm = taken_ready_vm(&log).unwrap_or_else(|| panic!("no ready VM taken: {log}"));
        assert!(vm.starts_with(&ready_prefix), "{vm}");
        assert!(log.contains("Ready in "), "{log}");
        assert!(log.contains("hand-over"), "{log}");
        let previous = if round == "second" { "first" } else { "second" };
        assert!(log.contains(&format!("\n{previous}\n")), "{log}");
        assert!(
            log.contains(&format!("\ndrover-{}-p", setup.runner)),
            "{log}"
        );
        assert!(!taken.contains(&vm), "{vm} served two jobs");
        taken.push(vm);
        let left = setup.leftovers();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            !left
                .iter()
                .any(|name| taken.iter().any(|vm| name.starts_with(vm.as_str()))),
            "{left:?}"
        );
    }
    // Without ready VMs wanted, gc removes them.
    let dry = setup.driver(&["gc", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&dry.stdout)
            .lines()
            .all(|l| !l.starts_with("would remove"))
    );
    setup.set("driver.idle_count", 0);
    let gc = setup.driver(&["gc"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
    let jobs = std::fs::read_dir(setup.state_dir().join("jobs")).map_or(0, |dir| dir.count());
    assert_eq!(jobs, 0, "job directories left");
}

#[test]
fn the_real_runner_runs_jobs_with_their_exit_codes_and_leaves_nothing() {
    let test = "the_real_runner_runs_jobs_with_their_exit_codes_and_leaves_nothing";
    if !libvirt(test) {
        return;
    }
    let Some(runner) = require::gitlab_runner(test) else {
        return;
    };
    let runner = runner.to_string_lossy();
    let setup = new_setup("realrunner", "domain_type = \"qemu\"");
    let _caches = DropCaches(&setup);
    let yaml = "ok:\n  script: [echo \"hello $((6*7))\"]\n\
        fails:\n  script: [echo before, exit 3]\n  after_script: [echo \"after $((6*7))\"]\n";
    let (_, log) = setup.run_job(yaml, &["--runner", "real", "--gitlab-runner", &runner]);
    assert!(log.contains("\nhello 42"), "{log}");
    assert!(log.contains("\nafter 42"), "{log}");
    assert!(log.contains("Job ok result: success"), "{log}");
    assert!(
        log.contains("Job fails result: script_failure (exit code 3)"),
        "{log}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_runner_passes_artifacts_and_cache_between_vms_cancels_and_times_out() {
    use drover_harness::coordinator::Coordinator;
    use drover_harness::pipeline::RunnerMode;
    use drover_harness::real::RealRunner;

    let test = "the_real_runner_passes_artifacts_and_cache_between_vms_cancels_and_times_out";
    if !libvirt(test) {
        return;
    }
    let Some(runner) = require::gitlab_runner(test) else {
        return;
    };
    let work = tempfile::tempdir().expect("work dir");
    let coordinator = Coordinator::start(work.path().join("artifacts"))
        .await
        .expect("coordinator");
    // The runner gives the job's helper commands its own URL, drover's fake GitLab on the
    // host's 127.0.0.1: forward_ports brings it to the VM's. The image has no gitlab-runner.
    let setup = new_setup(
        "realpipe",
        &format!(
            "domain_type = \"qemu\"\ngitlab_runner_binary = {runner:?}\nforward_ports = [{}]",
            coordinator.addr().port()
        ),
    );
    let _caches = DropCaches(&setup);
    let pipeline = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/jobs/pipeline.yml"
    ))
    .expect("example pipeline");
    let mode = RunnerMode::Real(RealRunner {
        binary: runner.clone(),
        builds_dir: "/builds".into(),
        cache_dir: "/cache".into(),
        work_dir: work.path().join("runner"),
    });
    let logs = setup
        .expect_pipeline_succeeds(&pipeline, &mode, &coordinator, Duration::from_secs(400))
        .await;
    assert!(logs.contains("Running with gitlab-runner"), "{logs}");
    assert!(logs.contains("release 1.0 built by job"), "{logs}");
    assert!(logs.contains("dependencies fetched by job"), "{logs}");
    let uploads = coordinator
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.contains("/artifacts") && r.status == 201)
        .count();
    assert_eq!(uploads, 1, "{logs}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());

    // A cancel (Ctrl-C to drover: the fake GitLab cancels the job) and a timeout, each
    // stopping the script in the VM, running after_script, and leaving nothing.
    let runner_arg = runner.to_string_lossy().into_owned();
    let real = ["--runner", "real", "--gitlab-runner", runner_arg.as_str()];
    let log = tokio::task::block_in_place(|| setup.run_and_interrupt(&real));
    assert!(log.contains("Job long result: canceled"), "{log}");
    assert!(log.contains("after_script ran"), "{log}");
    assert!(
        !log.contains("tick 40\n"),
        "the script went on after the cancel: {log}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
    let (ok, log) = tokio::task::block_in_place(|| {
        setup.run_job(
            "slow:\n  timeout: 60s\n  script:\n    - for i in $(seq 1 600); do echo tock $i; sleep 0.5; done\n  after_script:\n    - echo after the timeout\n",
            &real,
        )
    });
    assert!(!ok, "{log}");
    // The timeout counts from the job's start, prepare included (a boot under TCG).
    assert!(log.contains("\ntock 1"), "{log}");
    assert!(log.contains("Job slow result: timedout"), "{log}");
    assert!(
        !log.contains("tock 150\n"),
        "the script went on after the timeout: {log}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}
