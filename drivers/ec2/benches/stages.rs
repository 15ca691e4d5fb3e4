//! drover-ec2's own costs, against moto and the test instances (`tests/cloud`): job start
//! cold (a launch per job) and from the warm pool, the EC2 calls per job, and the cost of one
//! run stage against the SSH floor, `ssh host true` over the job's already open connection,
//! measured in the same run. Needs `tests/setup/ec2.sh`. `cargo bench -p drover-ec2`.
//!
//! The instances "boot" in about 0.1 s (set `DROVER_BENCH_BOOT_SECS` to mimic a real boot):
//! a cold start here is a lower bound of a real one, and the warm start is what the pool
//! saves of it.

#[path = "../tests/cloud/mod.rs"]
mod cloud;

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use drover_test_support::setup::{DriverSetup, response};

const DRIVER: &str = env!("CARGO_BIN_EXE_drover-ec2");
const ROUNDS: usize = 5;
const STAGES: usize = 30;

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    if let Err(why) = cloud::prerequisites() {
        eprintln!("{why}");
        return ExitCode::FAILURE;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
    ExitCode::SUCCESS
}

async fn bench() {
    let moto = cloud::Moto::start().expect("moto");
    let instances = cloud::Instances::start(moto.client());
    let boot: u64 = std::env::var("DROVER_BENCH_BOOT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    instances.set_boot_delay(Duration::from_secs(boot));
    let proxy = cloud::FaultProxy::start(&moto.endpoint())
        .await
        .expect("proxy");
    let (ami, subnet) = (
        moto.ami().await.expect("ami"),
        moto.subnet().await.expect("subnet"),
    );
    let endpoint = proxy.endpoint();
    let setup = DriverSetup::new(
        DRIVER,
        "bench",
        Box::new(|_| Vec::new()),
        |runner, state| {
            format!(
                "runner_name = \"{runner}\"\n[driver]\nstate_dir = {state:?}\nregion = \"{}\"\n\
             endpoint = \"{endpoint}\"\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n\
             ami = \"{ami}\"\nsubnets = [\"{subnet}\"]\ninstance_types = [\"t3.micro\"]\n\
             address = \"{{tag:{}}}\"\nboot_secs = 600\n[driver.pool]\nidle_count = 0\nidle_time = 0\n",
                cloud::REGION,
                cloud::SSH_ENDPOINT_TAG
            )
        },
    );
    let stage = |job: &str, args: &[&str]| {
        let output = tokio::task::block_in_place(|| setup.stage(job, args));
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let mut job_id = 770_000;
    let mut start = |warm: bool| {
        job_id += 1;
        let job = response(job_id, 3);
        if warm {
            let gc = tokio::task::block_in_place(|| setup.driver(&["gc"]));
            assert!(gc.status.success());
        }
        let (calls, mock) = (proxy.calls().len(), proxy.upstream_time());
        let started = Instant::now();
        stage(&job, &["prepare"]);
        let took = started.elapsed();
        let prepare_calls = proxy.calls().len() - calls;
        let own = took.saturating_sub(proxy.upstream_time() - mock);
        (job, (took, own), prepare_calls)
    };

    // Cold: a launch per job.
    let (mut cold, mut cold_own) = (Vec::new(), Vec::new());
    let mut cold_calls = 0;
    let mut cleanup_calls = 0;
    let mut cleanup_own = Vec::new();
    for _ in 0..ROUNDS {
        let (job, (took, own), calls) = start(false);
        cold.push(took);
        cold_own.push(own);
        cold_calls = calls;
        let (before, mock) = (proxy.calls().len(), proxy.upstream_time());
        let started = Instant::now();
        stage(&job, &["cleanup"]);
        cleanup_own.push(
            started
                .elapsed()
                .saturating_sub(proxy.upstream_time() - mock),
        );
        cleanup_calls = proxy.calls().len() - before;
    }
    // Warm: the pool has one ready (gc launched it and it booted); prepare takes it.
    setup.set("driver.pool.idle_count", 1);
    setup.set("driver.pool.idle_time", 3600);
    let (mut warm, mut warm_own) = (Vec::new(), Vec::new());
    let mut warm_calls = 0;
    for _ in 0..ROUNDS {
        let gc = tokio::task::block_in_place(|| setup.driver(&["gc"]));
        assert!(gc.status.success());
        // Let the idle instance boot, as it would between two jobs.
        tokio::time::sleep(Duration::from_secs(boot) + Duration::from_millis(500)).await;
        let (job, (took, own), calls) = start(false);
        warm.push(took);
        warm_own.push(own);
        warm_calls = calls;
        stage(&job, &["cleanup"]);
    }

    // One job's stages against the SSH floor over its connection.
    let (job, _, _) = start(false);
    let script = setup.dir.path().join("noop");
    std::fs::write(&script, "true\n").expect("script");
    let script = script.to_string_lossy().into_owned();
    let mut stages = Vec::new();
    for _ in 0..STAGES {
        let started = Instant::now();
        stage(&job, &["run", &script, "build_script"]);
        stages.push(started.elapsed());
    }
    let instance_dir = std::fs::read_dir(setup.state_dir().join("instances"))
        .expect("instances dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("control").exists())
        .expect("an instance with a connection");
    let address = std::fs::read_to_string(instance_dir.join("address")).expect("address");
    let (host, port) = address.trim().rsplit_once(':').expect("host:port");
    let ssh = |command: &str, input: &[u8]| {
        use std::io::Write;
        let started = Instant::now();
        let mut child = Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "ControlMaster=no",
                "-o",
                "BatchMode=yes",
            ])
            .arg("-o")
            .arg(format!(
                "ControlPath={}",
                instance_dir.join("control").display()
            ))
            .args(["-p", port, "-l", "root", host, command])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("input");
        assert!(child.wait().expect("ssh").success());
        started.elapsed()
    };
    let floor: Vec<_> = (0..STAGES).map(|_| ssh("true", b"")).collect();
    // The same stage without the driver: the agent's stage mode over the open connection,
    // which is what the driver's process adds to.
    let agent = drover_core::channel::stage_argv("0123456789abcdef", "bash")
        .iter()
        .map(|arg| format!("'{}'", arg.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let agent: Vec<_> = (0..STAGES).map(|_| ssh(&agent, b"true\n")).collect();
    stage(&job, &["cleanup"]);
    setup.set("driver.pool.idle_count", 0);
    setup.set("driver.pool.idle_time", 0);
    let _ = tokio::task::block_in_place(|| setup.driver(&["gc"]));

    let (cold, warm) = (median(cold), median(warm));
    let (cold_own, warm_own, cleanup_own) =
        (median(cold_own), median(warm_own), median(cleanup_own));
    let (stage, floor, agent) = (median(stages), median(floor), median(agent));
    println!("drover-ec2 against moto and loopback sshd instances (boot delay {boot} s), medians");
    println!("(own: the time minus moto's answers, measured at the proxy)");
    println!(
        "job start (prepare), cold launch:     {:8.1} ms, own {:6.1} ms  ({cold_calls} EC2 calls)",
        ms(cold),
        ms(cold_own)
    );
    println!(
        "job start (prepare), warm pool:       {:8.1} ms, own {:6.1} ms  ({warm_calls} EC2 calls)  ratio {:.2}",
        ms(warm),
        ms(warm_own),
        warm.as_secs_f64() / cold.as_secs_f64()
    );
    println!(
        "cleanup:                                          own {:6.1} ms  ({cleanup_calls} EC2 calls)",
        ms(cleanup_own)
    );
    println!(
        "run stage (no-op script), whole stage: {:8.1} ms",
        ms(stage)
    );
    println!(
        "the agent's stage alone, over ssh:     {:8.1} ms",
        ms(agent)
    );
    println!(
        "ssh host true over the open connection:{:8.1} ms  ratio {:.2} (stage / floor)",
        ms(floor),
        stage.as_secs_f64() / floor.as_secs_f64()
    );
}
