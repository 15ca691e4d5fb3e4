//! drover-ec2 against moto (the EC2 API on 127.0.0.1) whose instances "boot" as isolated
//! environments on this host with an sshd each (`cloud`), called as GitLab Runner calls it
//! (through the `drover` CLI's emulated runner, or the real runner when a binary is given).
//! Every test skips with one line when the stand-ins are missing, or fails where
//! `DROVER_REQUIRE` names `ec2` (CI); `tests/setup/ec2.sh` installs them.

#[path = "../cloud/mod.rs"]
mod cloud;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloud::{Fault, FaultProxy, Instances, Moto, SSH_ENDPOINT_TAG};
use drover_test_support::require;
use drover_test_support::setup::{DriverSetup, as_runner_calls, response};

const DRIVER: &str = env!("CARGO_BIN_EXE_drover-ec2");

/// The stand-ins of one test: its own moto, and its instances.
struct Cloud {
    moto: Moto,
    instances: Instances,
    ami: String,
    subnet: String,
}

async fn cloud(test: &str) -> Option<Cloud> {
    require::backend("ec2", test, cloud::prerequisites())?;
    let moto = Moto::start().expect("moto starts");
    let instances = Instances::start(moto.client());
    let ami = moto.ami().await.expect("an AMI");
    let subnet = moto.subnet().await.expect("a subnet");
    Some(Cloud {
        moto,
        instances,
        ami,
        subnet,
    })
}

/// Instances of `runner` that are not terminated, by id, with their tags.
async fn instances_of(
    client: &aws_sdk_ec2::Client,
    runner: &str,
) -> BTreeMap<String, BTreeMap<String, String>> {
    cloud::live_instances(client, Some(("drover.runner", runner)))
        .await
        .expect("describe")
}

/// `instances_of` from synchronous code (the leftovers callback), on a runtime of its own.
fn instances_blocking(endpoint: &str, runner: &str) -> Vec<String> {
    let (endpoint, runner) = (endpoint.to_owned(), runner.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let client = cloud::ec2_client(
                &endpoint,
                aws_sdk_ec2::config::retry::RetryConfig::standard(),
            );
            instances_of(&client, &runner).await.into_keys().collect()
        })
    })
    .join()
    .expect("describe thread")
}

/// A runner of its own on `endpoint` (moto or a fault proxy in front of it); `driver` is
/// more `[driver]` TOML.
fn new_setup(cloud: &Cloud, test: &str, endpoint: &str, driver: &str) -> DriverSetup {
    let moto = cloud.moto.endpoint();
    DriverSetup::new(
        DRIVER,
        test,
        Box::new(move |runner| instances_blocking(&moto, runner)),
        |runner, state| {
            format!(
                "runner_name = \"{runner}\"\n\
                 [driver]\nstate_dir = {state:?}\nregion = \"{}\"\nendpoint = \"{endpoint}\"\n\
                 access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n\
                 ami = \"{}\"\nsubnets = [\"{}\"]\ninstance_types = [\"t3.micro\"]\n\
                 address = \"{{tag:{SSH_ENDPOINT_TAG}}}\"\nboot_secs = 60\n{driver}\n",
                cloud::REGION,
                cloud.ami,
                cloud.subnet,
            )
        },
    )
}

/// Runs the driver's `gc`, which must succeed.
fn gc(setup: &DriverSetup) {
    let output = setup.driver(&["gc"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a blocking call (a `drover` process) off the runtime, so the proxy keeps serving.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking call")
}

/// Waits, bounded, for `check`.
async fn eventually(what: &str, bound: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {bound:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn run_job(
    setup: &std::sync::Arc<DriverSetup>,
    yaml: &'static str,
) -> impl std::future::Future<Output = (bool, String)> + use<> {
    let setup = setup.clone();
    blocking(move || setup.run_job(yaml, &[]))
}

#[tokio::test(flavor = "multi_thread")]
async fn passes_the_conformance_suite_and_leaves_nothing_behind() {
    let test = "passes_the_conformance_suite_and_leaves_nothing_behind";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let setup = new_setup(&cloud, "conf", &cloud.moto.endpoint(), "");
    blocking(move || drover_test_support::setup::expect_conformance_part(&setup, 0, 1)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_on_an_instance_of_its_own_tagged_at_creation_and_terminated_after() {
    let test = "a_job_runs_on_an_instance_of_its_own_tagged_at_creation_and_terminated_after";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let proxy = FaultProxy::start(&cloud.moto.endpoint())
        .await
        .expect("proxy");
    let setup = std::sync::Arc::new(new_setup(&cloud, "own", &proxy.endpoint(), ""));
    let (ok, log) = run_job(
        &setup,
        "x:\n  script: [\"echo \\\"on $(hostname) $((6*7))\\\"\", \"test ! -e /etc/drover-marker\", \"touch /etc/drover-marker\"]\n",
    )
    .await;
    assert!(ok, "{log}");
    let booted = cloud.instances.booted();
    assert_eq!(booted.len(), 1, "{log}");
    assert!(log.contains(&format!("on {} 42", booted[0])), "{log}");
    assert!(
        log.contains(&format!("Launched instance {}", booted[0])),
        "{log}"
    );
    // Tags in the launch itself: RunInstances carried them, and no CreateTags came after.
    let calls = proxy.calls();
    assert_eq!(proxy.count("RunInstances"), 1, "{calls:?}");
    assert_eq!(proxy.count("CreateTags"), 0, "{calls:?}");
    assert_eq!(proxy.count("TerminateInstances"), 1, "{calls:?}");
    let data = String::from_utf8(cloud.instances.user_data(&booted[0]).expect("user data"))
        .expect("utf-8");
    assert!(data.contains("ssh-ed25519 "), "{data}");
    assert!(!data.contains("PRIVATE KEY"), "{data}");
    // A second job gets a fresh instance: the first one's file is not there.
    let (ok, log) = run_job(&setup, "x:\n  script: [\"test ! -e /etc/drover-marker\"]\n").await;
    assert!(ok, "{log}");
    assert_eq!(cloud.instances.booted().len(), 2);
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_name_the_runner_job_project_and_expiry_from_the_first_moment() {
    let test = "tags_name_the_runner_job_project_and_expiry_from_the_first_moment";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let setup = std::sync::Arc::new(new_setup(&cloud, "tags", &cloud.moto.endpoint(), ""));
    let job = response(88101, 5);
    let prepare = {
        let (setup, job) = (setup.clone(), job.clone());
        blocking(move || setup.stage(&job, &["prepare"])).await
    };
    assert!(
        prepare.status.success(),
        "{}",
        String::from_utf8_lossy(&prepare.stderr)
    );
    let client = cloud.moto.client();
    let owned = instances_of(&client, &setup.runner).await;
    assert_eq!(owned.len(), 1, "{owned:?}");
    let tags = owned.values().next().expect("one");
    assert_eq!(
        tags.get("drover.job").map(String::as_str),
        Some("88101"),
        "{tags:?}"
    );
    assert_eq!(
        tags.get("drover.project").map(String::as_str),
        Some("5"),
        "{tags:?}"
    );
    assert!(
        tags.get("drover.expires")
            .is_some_and(|e| e.parse::<u64>().is_ok()),
        "{tags:?}"
    );
    assert!(tags.contains_key("drover.intent"), "{tags:?}");
    let cleanup = setup.stage(&job, &["cleanup"]);
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    // Idempotent: a second cleanup is fine and there is nothing to terminate.
    let again = setup.stage(&job, &["cleanup"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn spot_capacity_errors_fall_back_and_throttling_backs_off_in_one_prepare() {
    let test = "spot_capacity_errors_fall_back_and_throttling_backs_off_in_one_prepare";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let proxy = FaultProxy::start(&cloud.moto.endpoint())
        .await
        .expect("proxy");
    let setup = std::sync::Arc::new(new_setup(
        &cloud,
        "spot",
        &proxy.endpoint(),
        "market = \"spot-then-on-demand\"",
    ));
    setup.set(
        "driver.instance_types",
        toml::Value::Array(vec!["t3.micro".into(), "t3a.micro".into()]),
    );
    // Spot: no capacity for either type; on-demand is fine. (EC2 answers this with a 500,
    // which the SDK tries once more itself: two answers per pool.)
    proxy.fail_when(
        "RunInstances",
        "InstanceMarketOptions.MarketType=spot",
        4,
        Fault::error(
            500,
            "InsufficientInstanceCapacity",
            "We currently do not have sufficient t3.micro capacity",
        ),
    );
    let (ok, log) = run_job(&setup, "x:\n  script: [\"echo ran $((6*7))\"]\n").await;
    assert!(ok, "{log}");
    assert!(log.contains("ran 42"), "{log}");
    assert!(log.contains("No capacity for spot t3.micro"), "{log}");
    assert!(log.contains("No capacity for spot t3a.micro"), "{log}");
    assert!(log.contains("as on-demand t3.micro"), "{log}");
    assert_eq!(proxy.count("RunInstances"), 5, "{:?}", proxy.calls());
    assert_eq!(setup.leftovers(), Vec::<String>::new());

    proxy.clear();
    proxy.fail(
        "RunInstances",
        2,
        Fault::error(503, "RequestLimitExceeded", "Request limit exceeded."),
    );
    let (ok, log) = run_job(&setup, "x:\n  script: [\"echo ran $((6*7))\"]\n").await;
    assert!(ok, "{log}");
    assert!(
        log.contains("EC2 is throttling RunInstances (RequestLimitExceeded)"),
        "{log}"
    );
    assert_eq!(
        cloud.instances.booted().len(),
        2,
        "one instance per job, none launched twice"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_ami_is_one_line_naming_the_setting_and_launches_nothing() {
    let test = "a_bad_ami_is_one_line_naming_the_setting_and_launches_nothing";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let proxy = FaultProxy::start(&cloud.moto.endpoint())
        .await
        .expect("proxy");
    let setup = std::sync::Arc::new(new_setup(&cloud, "badami", &proxy.endpoint(), ""));
    setup.set("driver.ami", "ami-00000000000000000");
    // moto launches from any AMI id; EC2 answers this.
    proxy.fail(
        "RunInstances",
        usize::MAX,
        Fault::error(
            400,
            "InvalidAMIID.NotFound",
            "The image id '[ami-00000000000000000]' does not exist",
        ),
    );
    let (ok, log) = run_job(&setup, "x:\n  script: [echo never]\n").await;
    assert!(!ok);
    assert!(
        log.contains("EC2 refused the launch because of [driver] ami: InvalidAMIID.NotFound"),
        "{log}"
    );
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert!(!log.contains("never\n"), "{log}");
    // A settings error is not retried within the prepare: one call per prepare (the runner
    // tries prepare three times).
    assert!(proxy.count("RunInstances") <= 3, "{:?}", proxy.calls());
    assert!(cloud.instances.booted().is_empty());
    assert_eq!(setup.leftovers(), Vec::<String>::new());
    // doctor says the same before any job.
    let doctor = setup.driver(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(!doctor.status.success(), "{text}");
    assert!(text.contains("ami-00000000000000000"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_driver_killed_during_the_launch_call_is_cleaned_up_or_carried_on_by_its_retry() {
    let test = "a_driver_killed_during_the_launch_call_is_cleaned_up_or_carried_on_by_its_retry";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let proxy = FaultProxy::start(&cloud.moto.endpoint())
        .await
        .expect("proxy");
    let setup = std::sync::Arc::new(new_setup(&cloud, "killed", &proxy.endpoint(), ""));
    // The launch reaches EC2, and its answer never comes back before the kill.
    proxy.fail("RunInstances", 1, Fault::Hang(Duration::from_secs(60)));
    for (job_id, finish) in [(99301_u64, "cleanup"), (99302, "gc"), (99303, "retry")] {
        let job = response(job_id, 7);
        let dir = setup.dir.path().join(format!("custom-executor-{job_id}"));
        std::fs::create_dir_all(&dir).expect("job dir");
        std::fs::write(dir.join("response.json"), &job).expect("response");
        let mut prepare = Command::new(DRIVER);
        prepare.arg("--config").arg(setup.settings()).arg("prepare");
        let mut child = as_runner_calls(&mut prepare, &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prepare runs");
        let client = cloud.moto.client();
        let runner = setup.runner.clone();
        eventually(
            "the launch reached EC2",
            Duration::from_secs(30),
            async || !instances_of(&client, &runner).await.is_empty(),
        )
        .await;
        child.kill().expect("kill -9");
        let _ = child.wait();
        let finished = match finish {
            "cleanup" => {
                let setup = setup.clone();
                blocking(move || setup.stage(&job, &["cleanup"])).await
            }
            "retry" => {
                // The runner tries prepare again (§5.1): it carries on with the cut-off
                // launch's instance, and launches no second one.
                let launched = instances_of(&client, &runner).await;
                let calls = proxy.count("RunInstances");
                let retried = {
                    let (setup, job) = (setup.clone(), job.clone());
                    blocking(move || setup.stage(&job, &["prepare"])).await
                };
                assert!(
                    retried.status.success(),
                    "{}",
                    String::from_utf8_lossy(&retried.stderr)
                );
                assert_eq!(proxy.count("RunInstances"), calls);
                assert_eq!(
                    instances_of(&client, &runner)
                        .await
                        .into_keys()
                        .collect::<Vec<_>>(),
                    launched.into_keys().collect::<Vec<_>>()
                );
                let setup = setup.clone();
                blocking(move || setup.stage(&job, &["cleanup"])).await
            }
            _ => {
                let setup = setup.clone();
                blocking(move || setup.driver(&["gc"])).await
            }
        };
        assert!(
            finished.status.success(),
            "{}",
            String::from_utf8_lossy(&finished.stderr)
        );
        assert_eq!(setup.leftovers(), Vec::<String>::new(), "after {finish}");
        proxy.clear();
        proxy.fail("RunInstances", 1, Fault::Hang(Duration::from_secs(60)));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_warm_pool_keeps_its_idle_target_and_starts_jobs_without_a_launch() {
    let test = "the_warm_pool_keeps_its_idle_target_and_starts_jobs_without_a_launch";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let proxy = FaultProxy::start(&cloud.moto.endpoint())
        .await
        .expect("proxy");
    let setup = std::sync::Arc::new(new_setup(
        &cloud,
        "warm",
        &proxy.endpoint(),
        "[driver.pool]\nidle_count = 2\nidle_time = 3600",
    ));
    gc(&setup);
    assert_eq!(setup.leftovers().len(), 2, "gc launched the idle target");
    let idle = setup.leftovers();
    let before = proxy.count("RunInstances");
    let (ok, log) = run_job(&setup, "x:\n  script: [\"echo \\\"on $(hostname)\\\"\"]\n").await;
    assert!(ok, "{log}");
    assert!(log.contains("Using warm instance"), "{log}");
    assert!(
        idle.iter().any(|id| log.contains(&format!("on {id}"))),
        "{log}"
    );
    // The job's instance is gone, and the pool is back at its target.
    let after = setup.leftovers();
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(
        proxy.count("RunInstances"),
        before + 1,
        "one launch to refill the pool"
    );
    // idle_count 0 and idle_time 0: gc removes the idle instances.
    setup.set("driver.pool.idle_count", 0);
    setup.set("driver.pool.idle_time", 0);
    gc(&setup);
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_time_max_builds_and_periods_are_honoured() {
    let test = "idle_time_max_builds_and_periods_are_honoured";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let setup = std::sync::Arc::new(new_setup(
        &cloud,
        "rules",
        &cloud.moto.endpoint(),
        "reset_command = \"rm -rf /builds/* && test -d /builds\"\n\
         [driver.pool]\nidle_count = 0\nidle_time = 2\nmax_builds = 2\n",
    ));
    // max_builds 2, no idle target: the first job's instance goes back to the pool after
    // the reset, the second job gets it, and it is retired after that.
    setup.set("driver.pool.periods", toml::Value::Array(vec![]));
    let script = "x:\n  script: [\"echo \\\"on $(hostname)\\\"\"]\n";
    let (ok, first) = run_job(&setup, script).await;
    assert!(ok, "{first}");
    let used = setup.leftovers();
    assert_eq!(used.len(), 1, "back in the pool after the reset");
    assert!(first.contains(&format!("on {}", used[0])), "{first}");
    let (ok, second) = run_job(&setup, script).await;
    assert!(ok, "{second}");
    assert!(second.contains(&format!("on {}", used[0])), "{second}");
    assert!(second.contains("use 2 of 2"), "{second}");
    assert_eq!(
        setup.leftovers(),
        Vec::<String>::new(),
        "retired after its second job"
    );
    // A period in force all the time raises the idle target to 1...
    setup.set(
        "driver.pool.periods",
        toml::Value::Array(vec![toml::Value::Table(toml::toml! {
            periods = ["* * * * * * *"]
            timezone = "UTC"
            idle_count = 1
        })]),
    );
    gc(&setup);
    assert_eq!(setup.leftovers().len(), 1);
    // ...one that matches no time (a year long past) leaves the root's 0: the idle instance
    // stays until idle_time (2 s) has passed, then goes.
    setup.set(
        "driver.pool.periods",
        toml::Value::Array(vec![toml::Value::Table(toml::toml! {
            periods = ["* * * * * * 2001"]
            timezone = "Europe/Berlin"
            idle_count = 1
        })]),
    );
    gc(&setup);
    assert_eq!(setup.leftovers().len(), 1, "removed before idle_time");
    tokio::time::sleep(Duration::from_secs(3)).await;
    gc(&setup);
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_larger_than_the_idle_target_gets_instances_without_churn_and_survives_a_restart() {
    let test =
        "a_burst_larger_than_the_idle_target_gets_instances_without_churn_and_survives_a_restart";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let proxy = FaultProxy::start(&cloud.moto.endpoint())
        .await
        .expect("proxy");
    let setup = std::sync::Arc::new(new_setup(
        &cloud,
        "burst",
        &proxy.endpoint(),
        "[driver.pool]\nidle_count = 1\nidle_time = 3600",
    ));
    gc(&setup);
    // Three jobs at once, each 4 s long; halfway, the pool "restarts": a gc with nothing in
    // memory, the runner host's view rebuilt from the journal and the tags.
    let jobs: Vec<_> = (0..3)
        .map(|_| {
            run_job(
                &setup,
                "x:\n  script: [\"sleep 4\", \"echo done $((6*7))\"]\n",
            )
        })
        .map(tokio::spawn)
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let terminated_before = proxy.count("TerminateInstances");
    let restarted = {
        let setup = setup.clone();
        blocking(move || setup.driver(&["gc"])).await
    };
    assert!(
        restarted.status.success(),
        "{}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    assert_eq!(
        proxy.count("TerminateInstances"),
        terminated_before,
        "gc terminated an instance while jobs ran"
    );
    for job in jobs {
        let (ok, log) = job.await.expect("job");
        assert!(ok, "{log}");
        assert!(log.contains("done 42"), "{log}");
    }
    // Each job's instance went after its job, and the idle target is met: one left.
    assert_eq!(setup.leftovers().len(), 1, "{:?}", setup.leftovers());
    setup.set("driver.pool.idle_count", 0);
    setup.set("driver.pool.idle_time", 0);
    gc(&setup);
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_vanishes_during_a_stage_is_a_system_failure_saying_so() {
    let test = "an_instance_that_vanishes_during_a_stage_is_a_system_failure_saying_so";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let setup = std::sync::Arc::new(new_setup(&cloud, "vanish", &cloud.moto.endpoint(), ""));
    let job = run_job(
        &setup,
        "x:\n  script: [\"echo before $((6*7))\", \"sleep 60\"]\n",
    );
    let job = tokio::spawn(job);
    let client = cloud.moto.client();
    let runner = setup.runner.clone();
    eventually(
        "the job's instance runs",
        Duration::from_secs(60),
        async || !cloud.instances.running().is_empty(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ids: Vec<String> = instances_of(&client, &runner).await.into_keys().collect();
    client
        .terminate_instances()
        .set_instance_ids(Some(ids))
        .send()
        .await
        .expect("terminate behind the driver's back");
    let (ok, log) = job.await.expect("job");
    assert!(!ok, "{log}");
    assert!(log.contains("before 42"), "{log}");
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert!(
        log.contains("is terminated") || log.contains("is shutting-down"),
        "{log}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_real_runner_runs_jobs_from_the_pool_with_their_exit_codes_and_leaves_nothing() {
    let test = "the_real_runner_runs_jobs_from_the_pool_with_their_exit_codes_and_leaves_nothing";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let Some(runner) = require::gitlab_runner(test) else {
        return;
    };
    let setup = std::sync::Arc::new(new_setup(
        &cloud,
        "realrunner",
        &cloud.moto.endpoint(),
        "[driver.pool]\nidle_count = 1\nidle_time = 3600",
    ));
    let yaml = "ok:\n  script: [echo \"hello $((6*7))\"]\n\
        fails:\n  script: [echo before, exit 3]\n  after_script: [echo \"after $((6*7))\"]\n";
    let (_, log) = {
        let setup = setup.clone();
        let runner = runner.to_string_lossy().into_owned();
        blocking(move || setup.run_job(yaml, &["--runner", "real", "--gitlab-runner", &runner]))
            .await
    };
    assert!(log.contains("\nhello 42"), "{log}");
    assert!(log.contains("\nafter 42"), "{log}");
    assert!(log.contains("Job ok result: success"), "{log}");
    assert!(
        log.contains("Job fails result: script_failure (exit code 3)"),
        "{log}"
    );
    // The pool's one idle instance is all that is left; without an idle target gc removes it.
    assert_eq!(setup.leftovers().len(), 1, "{log}");
    setup.set("driver.pool.idle_count", 0);
    setup.set("driver.pool.idle_time", 0);
    gc(&setup);
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

/// The directory of the one instance the driver has connected to.
fn instance_dir(setup: &DriverSetup) -> std::path::PathBuf {
    std::fs::read_dir(setup.state_dir().join("instances"))
        .expect("instances dir")
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.join("known_hosts").exists())
        .expect("an instance the driver connected to")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_key_other_than_the_pinned_one_is_refused_as_a_system_failure() {
    let test = "a_host_key_other_than_the_pinned_one_is_refused_as_a_system_failure";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    let setup = std::sync::Arc::new(new_setup(&cloud, "hostkey", &cloud.moto.endpoint(), ""));
    let job = response(99401, 7);
    let prepared = {
        let (setup, job) = (setup.clone(), job.clone());
        blocking(move || setup.stage(&job, &["prepare"])).await
    };
    assert!(
        prepared.status.success(),
        "{}",
        String::from_utf8_lossy(&prepared.stderr)
    );
    // As if another machine answered at the instance's address: the connection ends, and
    // the key it would meet now is not the one pinned on first contact.
    let dir = instance_dir(&setup);
    let exit = Command::new("ssh")
        .args(["-F", "/dev/null", "-o"])
        .arg(format!("ControlPath={}", dir.join("control").display()))
        .args(["-O", "exit", "instance"])
        .stderr(Stdio::null())
        .status()
        .expect("ssh -O exit");
    assert!(exit.success());
    let other = tempfile::tempdir().expect("tempdir");
    let other_key = drover_core::ssh::make_key(other.path())
        .await
        .expect("another key");
    let pinned = std::fs::read_to_string(dir.join("known_hosts")).expect("known_hosts");
    let alias = pinned.split_whitespace().next().expect("a pinned line");
    let other_key: Vec<&str> = other_key.split_whitespace().take(2).collect();
    std::fs::write(
        dir.join("known_hosts"),
        format!("{alias} {}\n", other_key.join(" ")),
    )
    .expect("known_hosts");
    let script = setup.dir.path().join("script");
    std::fs::write(&script, "echo never\n").expect("script");
    let ran = {
        let (setup, job) = (setup.clone(), job.clone());
        let script = script.to_string_lossy().into_owned();
        blocking(move || setup.stage(&job, &["run", &script, "build_script"])).await
    };
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(ran.status.code(), Some(2), "a system failure: {log}");
    assert!(
        log.contains("presented another host key than on first contact"),
        "{log}"
    );
    assert!(!log.contains("never"), "{log}");
    let cleaned = {
        let setup = setup.clone();
        blocking(move || setup.stage(&job, &["cleanup"])).await
    };
    assert!(cleaned.status.success());
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jump_host_from_the_operators_ssh_config_carries_the_connection_and_is_checked() {
    let test = "a_jump_host_from_the_operators_ssh_config_carries_the_connection_and_is_checked";
    let Some(cloud) = cloud(test).await else {
        return;
    };
    // The bastion: an instance of its own that the operator reaches with a key of theirs.
    let operator = tempfile::tempdir().expect("tempdir");
    let key_dir = operator.path().join("key");
    let public = drover_core::ssh::make_key(&key_dir)
        .await
        .expect("the operator's key");
    let launched = cloud
        .moto
        .client()
        .run_instances()
        .image_id(&cloud.ami)
        .subnet_id(&cloud.subnet)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .user_data(aws_smithy_types::base64::encode(format!(
            "#!/bin/sh\nmkdir -p /root/.ssh\necho '{public}' >>/root/.ssh/authorized_keys\n"
        )))
        .send()
        .await
        .expect("the bastion's launch");
    let bastion = launched.instances()[0]
        .instance_id()
        .expect("an id")
        .to_owned();
    let mut endpoint = None;
    eventually(
        "the bastion serves SSH",
        Duration::from_secs(60),
        async || {
            endpoint = cloud.instances.endpoint(&bastion);
            endpoint.is_some()
        },
    )
    .await;
    let endpoint = endpoint.expect("endpoint");
    let (_, port) = endpoint.rsplit_once(':').expect("host:port");
    let scan = Command::new("ssh-keyscan")
        .args(["-T", "5", "-t", "ed25519", "-p", port, "127.0.0.1"])
        .stderr(Stdio::null())
        .output()
        .expect("ssh-keyscan");
    assert!(!scan.stdout.is_empty(), "the bastion's host key");
    let known_hosts = operator.path().join("known_hosts");
    std::fs::write(&known_hosts, &scan.stdout).expect("known_hosts");
    let config = operator.path().join("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host drover-bastion\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  \
             IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
             StrictHostKeyChecking yes\n  BatchMode yes\n",
            key_dir.join("id_ed25519").display(),
            known_hosts.display()
        ),
    )
    .expect("ssh_config");
    let setup = std::sync::Arc::new(new_setup(
        &cloud,
        "jump",
        &cloud.moto.endpoint(),
        &format!("jump_host = \"drover-bastion\"\nssh_config = {config:?}"),
    ));
    let (ok, log) = run_job(&setup, "x:\n  script: [\"echo \\\"via $((6*7))\\\"\"]\n").await;
    assert!(ok, "{log}");
    assert!(log.contains("via 42"), "{log}");
    let console = cloud.instances.console(&bastion).unwrap_or_default();
    assert!(
        console.contains("Accepted publickey for root"),
        "the bastion carried no connection:\n{console}"
    );
    assert_eq!(setup.leftovers(), Vec::<String>::new());
    // A bastion whose key the operator's known hosts do not hold is refused, and said so.
    std::fs::write(&known_hosts, "").expect("known_hosts");
    let (ok, log) = run_job(&setup, "x:\n  script: [\"echo never\"]\n").await;
    assert!(!ok, "{log}");
    assert!(log.contains("result: runner_system_failure"), "{log}");
    assert!(log.contains("jump host drover-bastion"), "{log}");
    assert!(!log.contains("never\n"), "{log}");
    assert_eq!(setup.leftovers(), Vec::<String>::new());
}
