//! A driver for testing `drover-core` as GitLab Runner sees it: the core's tests start this
//! binary exactly as the runner would and assert its exit codes, output and leftovers. The
//! backend is the runner's own temp dir; the `[driver]` settings make it misbehave on purpose.

use std::time::Duration;

use drover_core::protocol::ConfigOutput;
use drover_core::{Driver, Job, JobCommand, Result, Script, Settings, progress};
use serde::Deserialize;

/// `[driver]` settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestSettings {
    /// Panic in this stage (`config`, `prepare`, `run`, `cleanup`).
    #[serde(default)]
    panic_in: Option<String>,
    /// Make prepare take this long, watching for cancellation like a real backend call.
    #[serde(default)]
    prepare_millis: u64,
}

struct TestDriver {
    panic_in: Option<String>,
    prepare: Duration,
}

impl TestDriver {
    fn maybe_panic(&self, stage: &str) {
        if self.panic_in.as_deref() == Some(stage) {
            panic!("asked to panic in {stage}");
        }
    }
}

impl Driver for TestDriver {
    const NAME: &'static str = "drover-test-driver";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    type Settings = TestSettings;

    fn new(settings: &Settings<TestSettings>) -> Result<Self> {
        Ok(TestDriver {
            panic_in: settings.driver.panic_in.clone(),
            prepare: Duration::from_millis(settings.driver.prepare_millis),
        })
    }

    async fn config(&self, job: &Job) -> Result<ConfigOutput> {
        self.maybe_panic("config");
        let _ = job;
        Ok(drover_core::base_config::<Self>())
    }

    async fn prepare(&self, job: &Job) -> Result<()> {
        self.maybe_panic("prepare");
        progress!("Preparing for {} ms", self.prepare.as_millis());
        // As a real backend call would be: retried within the job's deadline.
        let backend_call = || async {
            tokio::select! {
                () = tokio::time::sleep(self.prepare) => Ok(()),
                () = job.cancel_token().cancelled() => Ok(()),
            }
        };
        drover_core::retry(
            "preparing",
            drover_core::Backoff::default(),
            Some(job.deadline()),
            job.cancel_token(),
            backend_call,
        )
        .await
    }

    async fn run(&self, job: &Job, script: &Script) -> Result<i32> {
        self.maybe_panic("run");
        let mut command = JobCommand::for_job("bash");
        command.arg(&script.path);
        if let Some(dir) = job.tmpdir() {
            command.current_dir(dir);
        }
        command.stream(job.cancel_token()).await
    }

    async fn cleanup(&self, _job: &Job) -> Result<()> {
        self.maybe_panic("cleanup");
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    drover_core::run::<TestDriver>()
}
