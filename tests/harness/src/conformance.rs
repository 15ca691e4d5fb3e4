//! The conformance suite: what every driver must do for a user not to notice it is not the
//! runner's fault (contract §10). Each case runs real jobs through the emulated runner and
//! checks the result, the exit code, the job log and what is left running.
//!
//! "Left running" is found by scanning `/proc/*/environ` for the job's unique
//! `DROVER_CONFORMANCE_MARKER` variable: the generated scripts export every job variable, so
//! every process of the job carries it, and the driver gets it as `CUSTOM_ENV_...`. This sees
//! processes of local and container drivers (same kernel); for VM drivers it sees only the
//! local side (the driver and its ssh client), not the guest.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_protocol::{ConfigOutput, JobResponse, SubStage};

use crate::emulated::{
    CallRecord, CancelHandle, Driver, ExecStage, Hooks, JobReport, JobResult, PrepareTermination,
    RunnerOptions, call_name, config_then_cleanup, run_job,
};
use crate::job::Job;
use crate::payload::{PayloadOptions, job_payload, random_hex};
use crate::process::CallExit;

/// The marker variable every conformance job carries.
pub const MARKER_VARIABLE: &str = "DROVER_CONFORMANCE_MARKER";

/// The message of case `sigterm-during-prepare` when the driver's prepare is too fast to be
/// interrupted.
pub const PREPARE_TOO_FAST: &str = "prepare finished before SIGTERM reached it; give the driver a prepare that lasts at least 0.5 s (e.g. a prepare hook)";

/// The driver calls of a job that is only `script:` (§9.4).
pub const SIMPLE_JOB_CALLS: [(ExecStage, Option<SubStage>); 7] = [
    (ExecStage::Config, None),
    (ExecStage::Prepare, None),
    (ExecStage::Run, Some(SubStage::PrepareScript)),
    (ExecStage::Run, Some(SubStage::GetSources)),
    (ExecStage::Run, Some(SubStage::BuildScript)),
    (ExecStage::Run, Some(SubStage::CleanupFileVariables)),
    (ExecStage::Cleanup, None),
];

/// The cases, in the order they run; the last ones are the hostile group (see [`HOSTILE`]).
pub const CASES: [&str; 16] = [
    "success",
    "script-exit-3",
    "script-exit-2",
    "after-script-after-failure",
    "cancel-during-script",
    "job-timeout",
    "sigterm-during-prepare",
    "cleanup-idempotent",
    "parallel-jobs",
    "output-100mb",
    "non-utf8-output",
    "overridden-job-id",
    "config-stdout-strict",
    "hostile-symlink-swap",
    "hostile-flood",
    "hostile-kill-everything",
];

/// The hostile group: jobs that attack the driver from inside their environment, as untrusted
/// job code would. They apply to drivers that isolate jobs from the host (containers, VMs);
/// for a driver whose jobs run on the host as its own user (drover-local, like the shell
/// executor), isolation is not what it offers, and the group says so instead of passing.
pub const HOSTILE: [&str; 3] = [
    "hostile-symlink-swap",
    "hostile-flood",
    "hostile-kill-everything",
];

/// Lists the directories of the job's environment that are mounts from outside it (what it
/// shares with the host): mount points of real file systems, by `/proc/self/mountinfo`.
const SHARED_DIRS: &str = r#"shared_dirs() {
  awk '{ for (i = 7; i <= NF && $i != "-"; i++); fs = $(i + 1);
    if ($5 != "/" && fs !~ /^(proc|sysfs|devpts|tmpfs|mqueue|cgroup|cgroup2|devtmpfs|securityfs|debugfs|tracefs|fusectl|configfs|pstore|bpf|binfmt_misc|hugetlbfs|autofs|rpc_pipefs|nsfs|overlay|ramfs|squashfs|fuse.lxcfs)$/) print $5 }' /proc/self/mountinfo |
  while read -r m; do [ -d "$m" ] && echo "$m"; done
}"#;

/// Replaces every entry of every shared directory it can with a symlink to the canary file (or
/// directory), and plants such symlinks under the names a driver might use, once at once and
/// then again and again in the background, so that it races with the driver's later stages.
const SWAP: &str = r#"swap() {
  for d in $(shared_dirs); do
    for e in "$d"/* "$d"/.[!.]*; do
      [ -L "$e" ] && continue
      [ -e "$e" ] || continue
      if [ -d "$e" ]; then target=$DROVER_CANARY_DIR; else target=$DROVER_CANARY_FILE; fi
      { mv "$e" "$e.moved" && ln -s "$target" "$e"; } 2>/dev/null || true
    done
    for n in wake script ready hosts status pid out err sh alive .doctor-probe cache.zip; do
      ln -s "$DROVER_CANARY_FILE" "$d/$n" 2>/dev/null || true
    done
  done
}"#;

/// Floods every FIFO in the shared directories (16 MiB without a newline each, while also
/// stealing from them) and its own output (8 MiB without a newline on each stream).
const FLOOD: &str = r#"for f in $(find $(shared_dirs) -maxdepth 2 -type p 2>/dev/null); do
  ( head -c 16777216 /dev/zero | tr '\0' x >"$f" ) 2>/dev/null &
  ( cat "$f" >/dev/null ) 2>/dev/null &
done
head -c 8388608 /dev/zero | tr '\0' y
head -c 8388608 /dev/zero | tr '\0' z >&2
echo"#;

/// What to run the suite against.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// The driver.
    pub driver: Driver,
    /// `image:` for every job (container drivers).
    pub image: Option<String>,
    /// The cases to run; empty means all of [`CASES`].
    pub cases: Vec<String>,
    /// The runner options every job starts from (graceful_kill_timeout 10 s by default).
    pub runner: RunnerOptions,
}

impl SuiteOptions {
    /// All cases against `driver`, with suite defaults.
    pub fn new(driver: Driver) -> SuiteOptions {
        SuiteOptions {
            driver,
            image: None,
            cases: Vec::new(),
            runner: RunnerOptions {
                graceful_kill_timeout: Duration::from_secs(10),
                prepare_retry_interval: Duration::from_millis(500),
                ..RunnerOptions::default()
            },
        }
    }
}

/// How a case that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The driver did what the case asks.
    Passed,
    /// The case does not apply to this driver, for the reason given.
    NotApplicable(String),
}

/// One case's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// The verdict, or the reason it failed.
    pub outcome: Result<Verdict, String>,
    /// How long it took.
    pub duration: Duration,
}

impl std::fmt::Display for CaseResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Ok(Verdict::Passed) => write!(
                f,
                "PASS {} ({:.1} s)",
                self.name,
                self.duration.as_secs_f64()
            ),
            Ok(Verdict::NotApplicable(why)) => write!(f, "N/A  {}: {why}", self.name),
            Err(reason) => write!(f, "FAIL {}: {reason}", self.name),
        }
    }
}

/// Runs the selected cases one after another; `on_result` sees each verdict as it is known.
pub async fn run_suite(options: &SuiteOptions, on_result: impl Fn(&CaseResult)) -> Vec<CaseResult> {
    let selected: Vec<String> = if options.cases.is_empty() {
        CASES.iter().map(|c| c.to_string()).collect()
    } else {
        options.cases.clone()
    };
    let mut results = Vec::new();
    for name in selected {
        let started = Instant::now();
        let suite = Suite { options };
        let outcome = match suite.case(&name) {
            Some(case) => case.await,
            None => Err(format!("no such case; known cases: {}", CASES.join(", "))),
        };
        let result = CaseResult {
            name,
            outcome,
            duration: started.elapsed(),
        };
        on_result(&result);
        results.push(result);
    }
    results
}

type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<Verdict, String>> + 'a>>;

/// A case that passes or fails, as a [`CaseFuture`].
fn plain<'a>(case: impl Future<Output = Result<(), String>> + 'a) -> CaseFuture<'a> {
    Box::pin(async move { case.await.map(|()| Verdict::Passed) })
}

/// Upper bound for any single job of the suite.
const JOB_BOUND: Duration = Duration::from_secs(180);

/// Fails with `msg` unless `ok`.
fn check(ok: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(msg()) }
}

fn expect_result(report: &JobReport, want: &JobResult) -> Result<(), String> {
    check(report.result == *want, || {
        let reason = match &report.result {
            JobResult::RunnerSystemFailure { reason } => format!(" ({reason})"),
            _ => String::new(),
        };
        // The log's last lines say why, which the result alone does not (a system failure's
        // message is in the log).
        let log = report.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n    ");
        format!(
            "result {}{reason}, want {want}; the job log ends:\n    {tail}",
            report.result
        )
    })
}

/// How many of a failed case's job log lines its report shows.
const LOG_TAIL_LINES: usize = 12;

fn log_has(report: &JobReport, needle: &[u8]) -> bool {
    report.log.windows(needle.len()).any(|w| w == needle)
}

struct Suite<'a> {
    options: &'a SuiteOptions,
}

/// A job and its payload, with a fresh marker.
struct Prepared {
    payload: JobResponse,
    marker: String,
}

impl<'a> Suite<'a> {
    fn case(&self, name: &str) -> Option<CaseFuture<'_>> {
        Some(match name {
            "success" => plain(self.success()),
            "script-exit-3" => plain(self.script_exit(3)),
            "script-exit-2" => plain(self.script_exit(2)),
            "after-script-after-failure" => plain(self.after_script_after_failure()),
            "cancel-during-script" => plain(self.cancel_during_script()),
            "job-timeout" => plain(self.job_timeout()),
            "sigterm-during-prepare" => plain(self.sigterm_during_prepare()),
            "cleanup-idempotent" => plain(self.cleanup_idempotent()),
            "parallel-jobs" => plain(self.parallel_jobs()),
            "output-100mb" => plain(self.output_100mb()),
            "non-utf8-output" => plain(self.non_utf8_output()),
            "overridden-job-id" => plain(self.overridden_job_id()),
            "config-stdout-strict" => plain(self.config_stdout_strict()),
            "hostile-symlink-swap" => Box::pin(self.hostile(Hostile::SymlinkSwap)),
            "hostile-flood" => Box::pin(self.hostile(Hostile::Flood)),
            "hostile-kill-everything" => Box::pin(self.hostile(Hostile::KillEverything)),
            _ => return None,
        })
    }

    fn job(&self, script: &[&str], after: &[&str]) -> Job {
        Job {
            name: "conformance".into(),
            stage: "test".into(),
            image: self.options.image.clone(),
            script: script.iter().map(|s| s.to_string()).collect(),
            after_script: after.iter().map(|s| s.to_string()).collect(),
            ..Job::default()
        }
    }

    fn prepare(&self, mut job: Job, payload: &PayloadOptions) -> Prepared {
        let marker = format!("drover-{}", random_hex(16));
        job.variables.push((MARKER_VARIABLE.into(), marker.clone()));
        Prepared {
            payload: job_payload(&job, &[], payload),
            marker,
        }
    }

    async fn run(
        &self,
        job: &Prepared,
        runner: &RunnerOptions,
        hooks: &Hooks,
        cancel: &CancelHandle,
    ) -> Result<JobReport, String> {
        let run = run_job(&self.options.driver, &job.payload, runner, hooks, cancel);
        tokio::time::timeout(JOB_BOUND, run)
            .await
            .map_err(|_| format!("the job did not finish within {} s", JOB_BOUND.as_secs()))
    }

    async fn run_simple(&self, job: Job) -> Result<(JobReport, String), String> {
        let job = self.prepare(job, &PayloadOptions::fresh());
        let report = self
            .run(
                &job,
                &self.options.runner,
                &Hooks::default(),
                &CancelHandle::new(),
            )
            .await?;
        Ok((report, job.marker))
    }

    async fn success(&self) -> Result<(), String> {
        let (report, marker) = self
            .run_simple(self.job(&["echo \"hello $((6*7))\""], &[]))
            .await?;
        expect_result(&report, &JobResult::Success)?;
        check(log_has(&report, b"hello 42"), || {
            "the log lacks the script's output `hello 42`".into()
        })?;
        check(report.call_kinds() == SIMPLE_JOB_CALLS, || {
            format!(
                "calls {:?}, want {:?}",
                report.call_names(),
                names_of(&SIMPLE_JOB_CALLS)
            )
        })?;
        nothing_left(&marker).await
    }

    async fn script_exit(&self, code: i32) -> Result<(), String> {
        let script = format!("exit {code}");
        let (report, _) = self.run_simple(self.job(&[&script], &[])).await?;
        expect_result(&report, &JobResult::ScriptFailure { exit_code: code })
    }

    async fn after_script_after_failure(&self) -> Result<(), String> {
        let (report, _) = self
            .run_simple(self.job(&["exit 4"], &["echo \"after $((6*7))\""]))
            .await?;
        expect_result(&report, &JobResult::ScriptFailure { exit_code: 4 })?;
        check(log_has(&report, b"after 42"), || {
            "after_script's output is not in the log".into()
        })
    }

    async fn cancel_during_script(&self) -> Result<(), String> {
        let job = self.prepare(
            self.job(
                &["echo \"started $((6*7))\"", "sleep 300"],
                &["echo \"after $((6*7))\""],
            ),
            &PayloadOptions::fresh(),
        );
        let cancel = CancelHandle::new();
        let canceled_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let hooks = Hooks {
            on_log: Some(on_output(b"started 42", {
                let (cancel, canceled_at) = (cancel.clone(), canceled_at.clone());
                move || {
                    if let Ok(mut at) = canceled_at.lock() {
                        *at = Some(Instant::now());
                    }
                    cancel.cancel();
                }
            })),
            ..Hooks::default()
        };
        let report = self
            .run(&job, &self.options.runner, &hooks, &cancel)
            .await?;
        let since_cancel = canceled_at
            .lock()
            .map_err(|_| "poisoned".to_string())?
            .map(|t| t.elapsed())
            .ok_or("the script's first line never appeared, so the job was never canceled")?;
        expect_result(&report, &JobResult::Canceled)?;
        check(since_cancel < Duration::from_secs(20), || {
            format!(
                "the job took {:.1} s to end after the cancel (bound 20 s)",
                since_cancel.as_secs_f64()
            )
        })?;
        check(log_has(&report, b"after 42"), || {
            "after_script did not run after the cancel".into()
        })?;
        check(cleanup_was_last(&report), || {
            "cleanup_exec was not called last".into()
        })?;
        nothing_left(&job.marker).await
    }

    async fn job_timeout(&self) -> Result<(), String> {
        let mut job = self.job(&["sleep 300"], &["echo \"after $((6*7))\""]);
        job.timeout = Some(Duration::from_secs(3));
        let started = Instant::now();
        let (report, marker) = self.run_simple(job).await?;
        expect_result(&report, &JobResult::TimedOut)?;
        let bound = Duration::from_secs(3)
            + self.options.runner.graceful_kill_timeout
            + Duration::from_secs(15);
        check(started.elapsed() < bound, || {
            format!(
                "the job took {:.1} s (bound {} s)",
                started.elapsed().as_secs_f64(),
                bound.as_secs()
            )
        })?;
        check(!log_has(&report, b"after 42"), || {
            "after_script ran after a job timeout".into()
        })?;
        check(cleanup_was_last(&report), || {
            "cleanup_exec was not called after the timeout".into()
        })?;
        nothing_left(&marker).await
    }

    async fn sigterm_during_prepare(&self) -> Result<(), String> {
        let runner = RunnerOptions {
            terminate_first_prepare: Some(PrepareTermination::AfterFirstByte),
            // Case 7 asks for an exit within 5 s of SIGTERM.
            graceful_kill_timeout: Duration::from_secs(5),
            prepare_retry_interval: Duration::from_secs(3),
            ..self.options.runner.clone()
        };
        let job = self.prepare(self.job(&["echo ok"], &[]), &PayloadOptions::fresh());
        let report = self
            .run(&job, &runner, &Hooks::default(), &CancelHandle::new())
            .await?;
        let first = report
            .calls
            .iter()
            .find(|c| c.stage == ExecStage::Prepare)
            .ok_or("prepare was never called")?;
        match &first.exit {
            CallExit::Code(0) => return Err(PREPARE_TOO_FAST.into()),
            CallExit::Code(2) => {}
            other => {
                return Err(format!(
                    "prepare under SIGTERM ended with {}, want exit status 2 within 5 s",
                    other.go_text()
                ));
            }
        }
        expect_result(&report, &JobResult::Success)?;
        let want = [
            (ExecStage::Config, None),
            (ExecStage::Prepare, None),
            (ExecStage::Cleanup, None),
            (ExecStage::Config, None),
            (ExecStage::Prepare, None),
            (ExecStage::Run, Some(SubStage::PrepareScript)),
        ];
        check(report.call_kinds().starts_with(&want), || {
            format!(
                "calls {:?}, want them to start with {:?}",
                report.call_names(),
                names_of(&want)
            )
        })?;
        check(log_has(&report, b"Will be retried in 3s ..."), || {
            "no retry line in the log".into()
        })?;
        nothing_left(&job.marker).await
    }

    async fn cleanup_idempotent(&self) -> Result<(), String> {
        let job = self.prepare(self.job(&["echo ok"], &[]), &PayloadOptions::fresh());
        let alone =
            config_then_cleanup(&self.options.driver, &job.payload, &self.options.runner).await;
        let kinds: Vec<_> = alone.calls.iter().map(CallRecord::kind).collect();
        check(
            kinds == [(ExecStage::Config, None), (ExecStage::Cleanup, None)],
            || format!("calls {:?}", names_of(&kinds)),
        )?;
        for call in &alone.calls {
            check(call.exit == CallExit::Code(0), || {
                format!(
                    "{} without prepare ended with {}",
                    call.name(),
                    call.exit.go_text()
                )
            })?;
        }
        let runner = RunnerOptions {
            extra_cleanup_calls: 1,
            ..self.options.runner.clone()
        };
        let job = self.prepare(self.job(&["echo ok"], &[]), &PayloadOptions::fresh());
        let report = self
            .run(&job, &runner, &Hooks::default(), &CancelHandle::new())
            .await?;
        expect_result(&report, &JobResult::Success)?;
        let cleanups: Vec<&CallExit> = report
            .calls
            .iter()
            .filter(|c| c.stage == ExecStage::Cleanup)
            .map(|c| &c.exit)
            .collect();
        check(cleanups == [&CallExit::Code(0), &CallExit::Code(0)], || {
            format!("cleanup twice after a job ended with {cleanups:?}, want exit 0 twice")
        })
    }

    async fn parallel_jobs(&self) -> Result<(), String> {
        let script = [
            "echo \"$CI_JOB_ID\" > owner.txt",
            "sleep 2",
            "test \"$(cat owner.txt)\" = \"$CI_JOB_ID\"",
        ];
        let runs = (0..4u32).map(|slot| {
            let job = self.prepare(self.job(&script, &[]), &PayloadOptions::fresh());
            let runner = RunnerOptions {
                concurrent_id: slot,
                ..self.options.runner.clone()
            };
            async move {
                let report = self
                    .run(&job, &runner, &Hooks::default(), &CancelHandle::new())
                    .await;
                (job.payload.id, report)
            }
        });
        let results = join_all(runs.collect()).await;
        for (id, report) in results {
            let report = report?;
            expect_result(&report, &JobResult::Success).map_err(|e| format!("job {id}: {e}"))?;
        }
        Ok(())
    }

    async fn output_100mb(&self) -> Result<(), String> {
        const LAST: u64 = 12_500_000;
        let runner = RunnerOptions {
            log_cap: Some(64 * 1024),
            capture_build_stdout: true,
            ..self.options.runner.clone()
        };
        let job = self.prepare(
            self.job(&[&format!("seq 1 {LAST}")], &[]),
            &PayloadOptions::fresh(),
        );
        let report = self
            .run(&job, &runner, &Hooks::default(), &CancelHandle::new())
            .await?;
        expect_result(&report, &JobResult::Success)?;
        let mut expected = Vec::with_capacity(110_000_000);
        for n in 1..=LAST {
            expected.extend_from_slice(n.to_string().as_bytes());
            expected.push(b'\n');
        }
        let got = report.build_stdout.unwrap_or_default();
        check(got.len() >= expected.len(), || {
            format!(
                "build_script stdout is {} bytes, want at least {}",
                got.len(),
                expected.len()
            )
        })?;
        let tail = &got[got.len() - expected.len()..];
        check(fnv1a(tail) == fnv1a(&expected), || {
            let at = tail
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            format!(
                "the last {} bytes of stdout differ from `seq 1 {LAST}` (first difference at byte {at})",
                expected.len()
            )
        })
    }

    async fn non_utf8_output(&self) -> Result<(), String> {
        let (report, _) = self
            .run_simple(self.job(&["printf '\\377\\376\\200 ok\\n'"], &[]))
            .await?;
        expect_result(&report, &JobResult::Success)?;
        check(log_has(&report, b"\xff\xfe\x80 ok\n"), || {
            "the bytes ff fe 80 ' ok' did not reach the log unchanged".into()
        })
    }

    async fn overridden_job_id(&self) -> Result<(), String> {
        let a_options = PayloadOptions::fresh();
        let a = self.prepare(
            self.job(
                &[
                    "echo \"A-$CI_JOB_ID\" > shared.txt",
                    "echo \"ready $((6*7))\"",
                    "sleep 4",
                    "test \"$(cat shared.txt)\" = \"A-$CI_JOB_ID\"",
                ],
                &[],
            ),
            &a_options,
        );
        let mut b_job = self.job(&["echo intruder > shared.txt", "rm -f shared.txt"], &[]);
        b_job.variables.extend([
            ("CI_JOB_ID".to_string(), a_options.job_id.to_string()),
            (
                "CI_PROJECT_ID".to_string(),
                a_options.project_id.to_string(),
            ),
            ("CI_CONCURRENT_ID".to_string(), "0".to_string()),
        ]);
        let b = self.prepare(b_job, &PayloadOptions::fresh());
        let ready = Arc::new(tokio::sync::Notify::new());
        let hooks = Hooks {
            on_log: Some(on_output(b"ready 42", {
                let ready = ready.clone();
                move || ready.notify_one()
            })),
            ..Hooks::default()
        };
        let b_runner = RunnerOptions {
            concurrent_id: 1,
            ..self.options.runner.clone()
        };
        let a_cancel = CancelHandle::new();
        let run_a = self.run(&a, &self.options.runner, &hooks, &a_cancel);
        let run_b = async {
            // B starts once A is sleeping (bounded by the job bound of A itself).
            let _ = tokio::time::timeout(JOB_BOUND, ready.notified()).await;
            self.run(&b, &b_runner, &Hooks::default(), &CancelHandle::new())
                .await
        };
        let (a_report, b_report) = tokio::join!(run_a, run_b);
        let a_report = a_report?;
        let b_report = b_report?;
        check(cleanup_was_last(&b_report), || {
            "job B's cleanup did not run".into()
        })?;
        expect_result(&a_report, &JobResult::Success).map_err(|e| {
            format!("job A was disturbed by job B, which set A's CI_JOB_ID/CI_PROJECT_ID/CI_CONCURRENT_ID: {e}")
        })
    }

    async fn config_stdout_strict(&self) -> Result<(), String> {
        let job = self.prepare(self.job(&["echo ok"], &[]), &PayloadOptions::fresh());
        let report =
            config_then_cleanup(&self.options.driver, &job.payload, &self.options.runner).await;
        let config = report.calls.first().ok_or("config was never called")?;
        check(config.exit == CallExit::Code(0), || {
            format!("config ended with {}", config.exit.go_text())
        })?;
        ConfigOutput::parse_stdout(&report.config_stdout)
            .map_err(|e| format!("config stdout is not exactly one JSON value: {e}"))?;
        if !report.config_stdout.is_empty() {
            serde_json::from_slice::<serde_json::Value>(&report.config_stdout)
                .map_err(|e| format!("config stdout has bytes beyond one JSON value: {e}"))?;
        }
        Ok(())
    }
}

/// The attacks of the hostile group.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    /// Every entry of every shared directory swapped for a symlink to a host file, again and
    /// again while the job's later stages run.
    SymlinkSwap,
    /// Every FIFO it can reach flooded (and read from), and its own output too.
    Flood,
    /// Every process of its environment it can signal killed, the stage machinery included.
    KillEverything,
}

/// How long a hostile job may take, all stages together: its own work takes seconds, so
/// anything near this is a stage that did not end.
const HOSTILE_BOUND: Duration = Duration::from_secs(150);

/// A host file and directory that no job may change, and what they were before the job.
struct Canary {
    dir: tempfile::TempDir,
    before: (Vec<u8>, std::fs::Metadata),
}

impl Canary {
    fn new() -> Result<Canary, String> {
        let dir = tempfile::Builder::new()
            .prefix("drover-canary-")
            .tempdir()
            .map_err(|e| format!("canary: {e}"))?;
        let file = dir.path().join("file");
        std::fs::write(&file, format!("canary {}\n", random_hex(8)))
            .map_err(|e| format!("canary: {e}"))?;
        std::fs::create_dir(dir.path().join("dir")).map_err(|e| format!("canary: {e}"))?;
        let before = Canary::read(&file)?;
        Ok(Canary { dir, before })
    }

    fn file(&self) -> String {
        self.dir.path().join("file").display().to_string()
    }

    fn subdir(&self) -> String {
        self.dir.path().join("dir").display().to_string()
    }

    fn read(file: &std::path::Path) -> Result<(Vec<u8>, std::fs::Metadata), String> {
        let meta =
            std::fs::symlink_metadata(file).map_err(|e| format!("the canary file is gone: {e}"))?;
        let bytes = std::fs::read(file).map_err(|e| format!("canary: {e}"))?;
        Ok((bytes, meta))
    }

    /// Fails unless the file and the directory are exactly as they were.
    fn unchanged(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let (bytes, meta) = Canary::read(&self.dir.path().join("file"))?;
        let (old_bytes, old) = &self.before;
        check(
            &bytes == old_bytes
                && meta.file_type().is_file()
                && (
                    meta.mode(),
                    meta.uid(),
                    meta.gid(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.ino(),
                ) == (
                    old.mode(),
                    old.uid(),
                    old.gid(),
                    old.mtime(),
                    old.mtime_nsec(),
                    old.ino(),
                ),
            || {
                format!(
                    "the host file {} was changed through the driver",
                    self.file()
                )
            },
        )?;
        let mut entries: Vec<String> = std::fs::read_dir(self.dir.path())
            .map_err(|e| format!("canary: {e}"))?
            .chain(std::fs::read_dir(self.subdir()).map_err(|e| format!("canary: {e}"))?)
            .flatten()
            .map(|e| e.path().display().to_string())
            .collect();
        entries.sort();
        check(entries == [self.subdir(), self.file()], || {
            format!(
                "the driver made files in host directories through the job's symlinks: {entries:?}"
            )
        })
    }
}

/// Every `ERROR:` line of the log is one line a person can read, not a dump of what the job
/// wrote.
fn errors_are_short(report: &JobReport) -> Result<(), String> {
    for line in report.log.split(|b| *b == b'\n') {
        if let Some(at) = line.windows(6).position(|w| w == b"ERROR:") {
            let length = line.len() - at;
            check(length <= 600, || {
                format!(
                    "an error line of {length} bytes: {}...",
                    String::from_utf8_lossy(&line[at..at + 200])
                )
            })?;
        }
    }
    Ok(())
}

impl Suite<'_> {
    /// Whether the driver runs jobs on this host as itself: a job sees a file this process
    /// made in its temp dir, and has its mount namespace.
    async fn runs_jobs_on_this_host(&self) -> Result<bool, String> {
        let content = format!("probe-{}", random_hex(8));
        let probe = tempfile::NamedTempFile::new().map_err(|e| format!("probe: {e}"))?;
        std::fs::write(probe.path(), &content).map_err(|e| format!("probe: {e}"))?;
        let own = std::fs::read_link("/proc/self/ns/mnt").map_err(|e| format!("probe: {e}"))?;
        let script = [
            format!("cat {} 2>/dev/null || true", probe.path().display()),
            "echo \"namespace $(readlink /proc/self/ns/mnt)\"".to_owned(),
        ];
        let script: Vec<&str> = script.iter().map(String::as_str).collect();
        let (report, _) = self.run_simple(self.job(&script, &[])).await?;
        expect_result(&report, &JobResult::Success).map_err(|e| format!("probe job: {e}"))?;
        let namespace = format!("namespace {}", own.display());
        Ok(log_has(&report, content.as_bytes()) && log_has(&report, namespace.as_bytes()))
    }

    async fn hostile(&self, attack: Hostile) -> Result<Verdict, String> {
        if self.runs_jobs_on_this_host().await? {
            return Ok(Verdict::NotApplicable(
                "this driver runs jobs on the host as its own user (like GitLab's shell executor): nothing isolates them from the host, so there is no isolation to attack".into(),
            ));
        }
        let canary = Canary::new()?;
        let (script, after): (Vec<String>, &[&str]) = match attack {
            Hostile::SymlinkSwap => (
                vec![
                    SHARED_DIRS.into(),
                    SWAP.into(),
                    "echo \"shared with the host: $(shared_dirs | tr '\\n' ' ')\"".into(),
                    "swap".into(),
                    "( i=0; while [ $i -lt 3000 ]; do swap; i=$((i+1)); sleep 0.01; done ) >/dev/null 2>&1 &".into(),
                    "sleep 2".into(),
                    "echo \"swapped $((6*7))\"".into(),
                ],
                &["echo \"after $((6*7))\""],
            ),
            Hostile::Flood => (
                vec![
                    SHARED_DIRS.into(),
                    FLOOD.into(),
                    "sleep 2".into(),
                    "echo \"flooded $((6*7))\"".into(),
                ],
                &["echo \"after $((6*7))\""],
            ),
            Hostile::KillEverything => (
                vec![
                    "echo \"killing $((6*7))\"".into(),
                    "kill -9 -1".into(),
                    "sleep 5".into(),
                    "echo \"survived $((6*7))\"".into(),
                ],
                &["echo \"after $((6*7))\""],
            ),
        };
        let script: Vec<&str> = script.iter().map(String::as_str).collect();
        let mut job = self.job(&script, after);
        job.variables.extend([
            ("DROVER_CANARY_FILE".to_owned(), canary.file()),
            ("DROVER_CANARY_DIR".to_owned(), canary.subdir()),
        ]);
        let job = self.prepare(job, &PayloadOptions::fresh());
        let (hooks, cancel) = (Hooks::default(), CancelHandle::new());
        let run = self.run(&job, &self.options.runner, &hooks, &cancel);
        let report = tokio::time::timeout(HOSTILE_BOUND, run)
            .await
            .map_err(|_| format!("the job did not end within {} s", HOSTILE_BOUND.as_secs()))??;
        canary.unchanged()?;
        errors_are_short(&report)?;
        check(cleanup_was_last(&report), || {
            "cleanup_exec was not called last".into()
        })?;
        match attack {
            Hostile::SymlinkSwap => {
                check(log_has(&report, b"swapped 42"), || {
                    format!("the attack did not run: {}", report.log_text())
                })?;
            }
            Hostile::Flood => {}
            Hostile::KillEverything => {
                check(report.result != JobResult::Success, || {
                    "a job whose script was killed was reported a success".into()
                })?;
                check(log_has(&report, b"after 42"), || {
                    format!(
                        "after_script did not run after the stage machinery was killed: {}",
                        report.log_text()
                    )
                })?;
            }
        }
        nothing_left(&job.marker).await?;
        Ok(Verdict::Passed)
    }
}

/// Whether cleanup_exec was the job's last call: the runner defers it after every stage, and it
/// is bound by neither the job timeout nor a cancel (§1.5).
fn cleanup_was_last(report: &JobReport) -> bool {
    report.calls.last().map(|c| c.stage) == Some(ExecStage::Cleanup)
}

/// Calls by name for messages: `run build_script` reads better than `(Run, Some(BuildScript))`.
fn names_of(calls: &[(ExecStage, Option<SubStage>)]) -> Vec<String> {
    calls
        .iter()
        .map(|(stage, sub)| call_name(*stage, sub.as_ref()))
        .collect()
}

/// A log hook that runs `action` once, as soon as `needle` has appeared in the log.
fn on_output(
    needle: &'static [u8],
    action: impl Fn() + Send + Sync + 'static,
) -> crate::emulated::LogHook {
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let fired = Arc::new(AtomicBool::new(false));
    Arc::new(move |chunk: &[u8]| {
        if fired.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut seen) = seen.lock() else { return };
        seen.extend_from_slice(chunk);
        if seen.windows(needle.len()).any(|w| w == needle) {
            fired.store(true, Ordering::SeqCst);
            action();
        }
        // Only the tail can still complete a match.
        let keep = seen.len().saturating_sub(needle.len());
        seen.drain(..keep);
    })
}

/// Waits (bounded) until no process carries `marker` in its environment.
async fn nothing_left(marker: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_with_marker(marker);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "processes of the job are still running: {}",
                left.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `pid: cmdline` of every process whose environment holds `MARKER=<marker>`.
pub fn processes_with_marker(marker: &str) -> Vec<String> {
    let needle = format!("{MARKER_VARIABLE}={marker}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var.ends_with(needle.as_bytes()))
        {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push(format!("{pid}: {}", cmdline.trim()));
        }
    }
    found
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// 64-bit FNV-1a: enough to compare 100 MB without printing it.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
