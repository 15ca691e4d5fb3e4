//! The stand-ins for AWS (tests/cloud) do what drover-ec2's tests rely on: an instance launched
//! in moto boots with its user data and serves ssh on 127.0.0.1, isolated from the host; it
//! powers off when terminated; the fault proxy injects errors and lost answers. Every test skips
//! with one line when `tests/setup/ec2.sh` has not been run, or fails where `DROVER_REQUIRE`
//! names `ec2` (CI).

mod cloud;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    InstanceMarketOptionsRequest, InstanceType, MarketType, ResourceType, Tag, TagSpecification,
};
use cloud::{Fault, FaultProxy, Instances, Moto, SSH_ENDPOINT_TAG};
use drover_test_support::require;

/// How long an instance may take from RunInstances to its `ssh-endpoint` tag (about 1 s here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// `true` when the stand-ins can run here; else a skip (one line saying why and naming
/// `tests/setup/ec2.sh`), or a failure where `DROVER_REQUIRE` names `ec2`.
fn ec2(test: &str) -> bool {
    require::backend("ec2", test, cloud::prerequisites()).is_some()
}

/// A fresh ed25519 key pair in `dir`: the private key's path and the public key's line.
fn keypair(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    let status = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "drover-fixture-test",
            "-f",
        ])
        .arg(&key)
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success(), "ssh-keygen failed: {status}");
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("the public key");
    (key, public.trim().to_owned())
}

/// User data that lets `public_key` log in as root: what the driver's user data does.
fn authorize(public_key: &str) -> String {
    format!(
        "#!/bin/sh\nset -e\nmkdir -p /root/.ssh\nchmod 700 /root/.ssh\n\
         echo '{public_key}' >>/root/.ssh/authorized_keys\n"
    )
}

/// RunInstances of one t3.micro with `user_data`: its id.
async fn launch(client: &Client, ami: &str, subnet: &str, user_data: &str) -> String {
    let out = client
        .run_instances()
        .image_id(ami)
        .subnet_id(subnet)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .user_data(aws_smithy_types::base64::encode(user_data))
        .send()
        .await
        .expect("RunInstances");
    out.instances()[0]
        .instance_id()
        .expect("an instance id")
        .to_owned()
}

/// The instance's `ssh-endpoint` tag, as the driver would read it, once it is there; a boot
/// failure fails at once with the environment's console.
async fn ssh_endpoint(client: &Client, instances: &Instances, id: &str) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Some(why) = instances.boot_error(id) {
            panic!("{id} did not boot: {why}");
        }
        let out = client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .expect("DescribeInstances");
        let tag = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.tags())
            .find(|t| t.key() == Some(SSH_ENDPOINT_TAG))
            .and_then(|t| t.value());
        if let Some(endpoint) = tag {
            return endpoint.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{id} has no {SSH_ENDPOINT_TAG} tag {} s after launch; console:\n{}",
            BOOT_TIMEOUT.as_secs(),
            instances.console(id).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ssh root@127.0.0.1 -p PORT command` with `key`, trusting the host key on first use
/// (`known_hosts` is the test's own); bounded by 30 s.
async fn ssh(key: &Path, known_hosts: &Path, endpoint: &str, command: &str) -> Output {
    let (host, port) = endpoint.rsplit_once(':').expect("HOST:PORT");
    let run = tokio::process::Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", port, "-o", "StrictHostKeyChecking=accept-new", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("root@{host}"))
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("ssh finished within 30 s")
        .expect("ssh runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Moto, the instances watcher, a key pair and a booted instance whose user data authorized
/// the key: everything a test over ssh needs.
struct Booted {
    // Field order: the environments go before moto.
    instances: Instances,
    _moto: Moto,
    client: Client,
    id: String,
    user_data: String,
    endpoint: String,
    key: PathBuf,
    known_hosts: PathBuf,
    _dir: tempfile::TempDir,
}

async fn booted_instance() -> Booted {
    let moto = Moto::start().expect("moto starts");
    let client = moto.client();
    let instances = Instances::start(client.clone());
    let dir = tempfile::tempdir().expect("a temp dir");
    let (key, public) = keypair(dir.path());
    let user_data = authorize(&public);
    let started = Instant::now();
    let (ami, subnet) = (
        moto.ami().await.expect("an AMI"),
        moto.subnet().await.expect("a subnet"),
    );
    eprintln!(
        "an AMI and a subnet found in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let launched = Instant::now();
    let id = launch(&client, &ami, &subnet, &user_data).await;
    let endpoint = ssh_endpoint(&client, &instances, &id).await;
    eprintln!(
        "{id}: ssh-endpoint {endpoint} {:.2} s after RunInstances",
        launched.elapsed().as_secs_f64()
    );
    Booted {
        instances,
        _moto: moto,
        client,
        id,
        user_data,
        endpoint,
        key,
        known_hosts: dir.path().join("known_hosts"),
        _dir: dir,
    }
}

impl Booted {
    async fn ssh(&self, command: &str) -> Output {
        ssh(&self.key, &self.known_hosts, &self.endpoint, command).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_launched_instance_runs_its_user_data_and_serves_ssh_in_namespaces_of_its_own() {
    if !ec2("a_launched_instance_runs_its_user_data_and_serves_ssh_in_namespaces_of_its_own") {
        return;
    }
    // Something in the host's /tmp that the instance must not see.
    let marker = tempfile::Builder::new()
        .prefix("drover-host-only-")
        .tempfile()
        .expect("a host temp file");
    let marker_name = marker
        .path()
        .file_name()
        .expect("a name")
        .to_string_lossy()
        .into_owned();
    let vm = booted_instance().await;

    let out = vm
        .ssh(
            "echo hi; hostname; tr '\\0' ' ' </proc/1/cmdline; echo; \
             readlink /proc/self/ns/pid /proc/self/ns/mnt; \
             if touch /usr/.drover-probe 2>/dev/null; then echo usr-writable; else echo usr-read-only; fi; \
             echo /tmp:; ls -a /tmp",
        )
        .await;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "ssh failed ({}): {}{}",
        out.status,
        stdout,
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "hi", "{stdout}");
    assert_eq!(lines[1], vm.id, "the hostname is the instance id: {stdout}");
    assert!(
        lines[2].contains("/usr/sbin/sshd"),
        "PID 1 is the instance's sshd: {stdout}"
    );
    let host_pid_ns = std::fs::read_link("/proc/self/ns/pid").expect("the host's pid namespace");
    let host_mnt_ns = std::fs::read_link("/proc/self/ns/mnt").expect("the host's mount namespace");
    assert_ne!(
        Path::new(lines[3]),
        host_pid_ns,
        "another PID namespace: {stdout}"
    );
    assert_ne!(
        Path::new(lines[4]),
        host_mnt_ns,
        "another mount namespace: {stdout}"
    );
    assert_eq!(lines[5], "usr-read-only", "{stdout}");
    assert_eq!(lines[6], "/tmp:", "{stdout}");
    assert!(
        !stdout.contains(&marker_name),
        "the instance sees the host's /tmp: {stdout}"
    );
    assert_eq!(
        vm.instances.user_data(&vm.id).as_deref(),
        Some(vm.user_data.as_bytes()),
        "the user data it was booted with"
    );
    assert_eq!(vm.instances.booted(), [vm.id.as_str()]);
    assert_eq!(vm.instances.running(), [vm.id.as_str()]);
    assert_eq!(
        vm.instances.endpoint(&vm.id).as_deref(),
        Some(vm.endpoint.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_all_as_root_in_an_instance_spares_the_host_and_the_instance_sshd() {
    if !ec2("kill_all_as_root_in_an_instance_spares_the_host_and_the_instance_sshd") {
        return;
    }
    let vm = booted_instance().await;
    let mut host_sleep = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .expect("a host process");

    // The session dies with everything else in the namespace but PID 1, so ssh's own exit
    // status says nothing here.
    let out = vm.ssh("sleep 600 & kill -9 -1; echo survived").await;
    assert!(
        !text(&out.stdout).contains("survived"),
        "kill -9 -1 did not kill the session: {}",
        text(&out.stdout)
    );
    assert!(
        host_sleep.try_wait().expect("try_wait").is_none(),
        "kill -9 -1 in the instance killed a host process"
    );
    let again = vm.ssh("echo again; ps -e -o pid=,comm=").await;
    let _ = host_sleep.kill();
    let _ = host_sleep.wait();
    let stdout = text(&again.stdout);
    assert!(
        again.status.success() && stdout.starts_with("again\n"),
        "no new connection after kill -9 -1 ({}): {stdout}{}",
        again.status,
        text(&again.stderr)
    );
    assert!(
        !stdout.contains("sleep"),
        "the instance's own sleep should be gone: {stdout}"
    );
    assert_eq!(vm.instances.running(), [vm.id.as_str()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_instance_powers_off_and_its_ssh_port_closes() {
    if !ec2("a_terminated_instance_powers_off_and_its_ssh_port_closes") {
        return;
    }
    let vm = booted_instance().await;
    vm.client
        .terminate_instances()
        .instance_ids(&vm.id)
        .send()
        .await
        .expect("TerminateInstances");
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let alive = vm.instances.running().contains(&vm.id);
        let answers = std::net::TcpStream::connect(&vm.endpoint).is_ok();
        if !alive && !answers {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        refused,
        "10 s after TerminateInstances: environment alive {}, {} accepts connections",
        vm.instances.running().contains(&vm.id),
        vm.endpoint
    );
    assert_eq!(
        vm.instances.booted(),
        [vm.id.as_str()],
        "booted once, never again"
    );
}

/// Moto and a fault proxy in front of it, with a client through the proxy (no retries) and one
/// straight to moto.
async fn proxied() -> (Moto, FaultProxy, Client, Client) {
    let moto = Moto::start().expect("moto starts");
    let proxy = FaultProxy::start(&moto.endpoint())
        .await
        .expect("the proxy starts");
    let through = proxy.client();
    let direct = moto.client();
    (moto, proxy, through, direct)
}

/// The ids of moto's pending or running instances tagged `test` = `value`.
async fn tagged(direct: &Client, value: &str) -> Vec<String> {
    cloud::live_instances(direct, Some(("test", value)))
        .await
        .expect("DescribeInstances")
        .into_keys()
        .collect()
}

fn test_tag(value: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(ResourceType::Instance)
        .tags(Tag::builder().key("test").value(value).build())
        .build()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injected_capacity_error_reaches_the_caller_with_its_code_once() {
    if !ec2("an_injected_capacity_error_reaches_the_caller_with_its_code_once") {
        return;
    }
    let (moto, proxy, through, direct) = proxied().await;
    let (ami, subnet) = (
        moto.ami().await.expect("AMI"),
        moto.subnet().await.expect("subnet"),
    );
    proxy.fail(
        "RunInstances",
        1,
        Fault::error(
            500,
            "InsufficientInstanceCapacity",
            "We currently do not have sufficient t3.micro capacity.",
        ),
    );
    let run = || {
        through
            .run_instances()
            .image_id(&ami)
            .subnet_id(&subnet)
            .instance_type(InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .tag_specifications(test_tag("capacity"))
            .send()
    };
    let err = run().await.expect_err("the first launch meets the fault");
    assert_eq!(err.code(), Some("InsufficientInstanceCapacity"), "{err:?}");
    assert_eq!(
        err.message(),
        Some("We currently do not have sufficient t3.micro capacity.")
    );
    assert!(
        tagged(&direct, "capacity").await.is_empty(),
        "moto never saw the failed launch"
    );
    let out = run().await.expect("the second launch goes through");
    assert_eq!(out.instances().len(), 1);
    assert_eq!(tagged(&direct, "capacity").await.len(), 1);
    assert_eq!(proxy.calls(), ["RunInstances", "RunInstances"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_run_instances_answer_fails_the_call_but_launches_the_instance() {
    if !ec2("a_lost_run_instances_answer_fails_the_call_but_launches_the_instance") {
        return;
    }
    let (moto, proxy, through, direct) = proxied().await;
    proxy.fail("RunInstances", 1, Fault::DropResponse);
    let result = through
        .run_instances()
        .image_id(moto.ami().await.expect("AMI"))
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .tag_specifications(test_tag("lost"))
        .send()
        .await;
    let err = result.expect_err("the call fails without an answer");
    eprintln!("the SDK's error for a lost answer: {err:?}");
    assert_eq!(
        err.code(),
        None,
        "a transport error, not an API error: {err:?}"
    );
    assert_eq!(
        tagged(&direct, "lost").await.len(),
        1,
        "the instance exists all the same"
    );
    assert_eq!(proxy.count("RunInstances"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fault_for_spot_launches_leaves_on_demand_launches_alone() {
    if !ec2("a_fault_for_spot_launches_leaves_on_demand_launches_alone") {
        return;
    }
    let (moto, proxy, through, _direct) = proxied().await;
    let ami = moto.ami().await.expect("AMI");
    proxy.fail_when(
        "RunInstances",
        "InstanceMarketOptions.MarketType=spot",
        5,
        Fault::error(500, "InsufficientInstanceCapacity", "no spot capacity"),
    );
    let launch = |spot: bool| {
        let request = through
            .run_instances()
            .image_id(&ami)
            .instance_type(InstanceType::T3Micro)
            .min_count(1)
            .max_count(1);
        let request = if spot {
            request.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .build(),
            )
        } else {
            request
        };
        request.send()
    };
    launch(false)
        .await
        .expect("an on-demand launch is not faulted");
    let err = launch(true).await.expect_err("a spot launch is");
    assert_eq!(err.code(), Some("InsufficientInstanceCapacity"));
    assert_eq!(proxy.count("RunInstances"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_answer_arrives_late_and_intact() {
    if !ec2("a_delayed_answer_arrives_late_and_intact") {
        return;
    }
    let (_moto, proxy, through, _direct) = proxied().await;
    proxy.fail(
        "DescribeInstances",
        1,
        Fault::Delay(Duration::from_millis(600)),
    );
    let started = Instant::now();
    through
        .describe_instances()
        .send()
        .await
        .expect("DescribeInstances answers");
    assert!(started.elapsed() >= Duration::from_millis(600));
    let started = Instant::now();
    through.describe_instances().send().await.expect("again");
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "the rule applied once only"
    );
    assert_eq!(proxy.calls(), ["DescribeInstances", "DescribeInstances"]);
}
