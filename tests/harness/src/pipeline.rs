//! A small pipeline: the jobs of one file in stage order, with the artifacts a job uploads
//! handed to the jobs that depend on it, through the fake coordinator, the way GitLab does
//! (payload `dependencies`, §4.1 row 4, §8). The cache passes between jobs through the
//! driver's `cache_dir`, since all jobs belong to one project.

use std::collections::BTreeMap;

use crate::coordinator::Coordinator;
use crate::job::{Job, JobFile};
use crate::payload::{
    ArtifactsFile, PayloadDependency, PayloadOptions, Source, job_payload, next_job_id,
};
use crate::real::{self, RealRunner};
use crate::{CancelHandle, Driver, Hooks, JobReport, JobResult, RunnerOptions, run_job};

/// Who plays GitLab Runner.
#[derive(Debug, Clone)]
pub enum RunnerMode {
    /// drover's emulation of the runner.
    Emulated(RunnerOptions),
    /// The user's `gitlab-runner run-single`.
    Real(RealRunner),
}

/// What one job of the pipeline came to.
#[derive(Debug)]
pub enum PipelineOutcome {
    /// It ran; the report holds its result and log.
    Finished(JobReport),
    /// It did not run, and why.
    Skipped(String),
    /// The runner itself could not run it (e.g. `gitlab-runner` crashed).
    Broken(String),
}

/// One job of the pipeline.
#[derive(Debug)]
pub struct PipelineJob {
    /// Its name.
    pub name: String,
    /// What came of it.
    pub outcome: PipelineOutcome,
}

impl PipelineJob {
    /// The GitLab result, for a job that ran.
    pub fn result(&self) -> Option<&JobResult> {
        match &self.outcome {
            PipelineOutcome::Finished(report) => Some(&report.result),
            _ => None,
        }
    }
}

/// Runs `jobs` (in the order given, normally stage order) against `driver`.
///
/// A job depends on the jobs named in its `dependencies:`, else its `needs:`, else every job of
/// an earlier stage; those of them that uploaded artifacts are in its payload, so the runner's
/// `download_artifacts` fetches them from the coordinator. Once a job fails, jobs of later
/// stages are skipped, as GitLab does; a cancel skips everything after the current job.
#[allow(clippy::too_many_arguments)] // each is one thing the caller chose; a struct would only rename them
pub async fn run_pipeline(
    file: &JobFile,
    jobs: &[&Job],
    driver: &Driver,
    mode: &RunnerMode,
    coordinator: &Coordinator,
    source: Option<&Source>,
    hooks: &Hooks,
    cancel: &CancelHandle,
) -> Vec<PipelineJob> {
    let pipeline_id = next_job_id();
    let mut finished: BTreeMap<&str, (PayloadDependency, &str)> = BTreeMap::new();
    let mut failed_stage: Option<&str> = None;
    let cancelled = cancel.subscribe();
    let mut outcomes = Vec::new();
    for job in jobs {
        let skip = if *cancelled.borrow() > 0 {
            Some("the pipeline was canceled".to_owned())
        } else {
            failed_stage
                .filter(|stage| *stage != job.stage)
                .map(|stage| format!("a job of stage {stage} failed"))
        };
        if let Some(reason) = skip {
            outcomes.push(PipelineJob {
                name: job.name.clone(),
                outcome: PipelineOutcome::Skipped(reason),
            });
            continue;
        }
        let options = PayloadOptions {
            pipeline_id,
            server_url: coordinator.url(),
            dependencies: dependencies_of(job, jobs, &finished),
            source: source.cloned(),
            ..PayloadOptions::fresh()
        };
        let payload = job_payload(job, &file.variables, &options);
        let report = match mode {
            RunnerMode::Emulated(runner_options) => {
                // The emulated runner's artifact commands talk to the coordinator directly.
                coordinator.register(&payload);
                Ok(run_job(driver, &payload, runner_options, hooks, cancel).await)
            }
            RunnerMode::Real(runner) => {
                real::run_job(runner, coordinator, driver, &payload, hooks, cancel).await
            }
        };
        let outcome = match report {
            Ok(report) => {
                if report.result != JobResult::Success {
                    failed_stage.get_or_insert(&job.stage);
                }
                let artifacts_file = coordinator
                    .artifacts(payload.id)
                    .map(|bytes| ArtifactsFile {
                        filename: "artifacts.zip".into(),
                        size: bytes.len() as u64,
                    });
                let dependency = PayloadDependency {
                    id: payload.id,
                    name: job.name.clone(),
                    token: payload.token.clone(),
                    artifacts_file,
                };
                finished.insert(&job.name, (dependency, &job.stage));
                PipelineOutcome::Finished(report)
            }
            Err(err) => {
                failed_stage.get_or_insert(&job.stage);
                PipelineOutcome::Broken(err)
            }
        };
        outcomes.push(PipelineJob {
            name: job.name.clone(),
            outcome,
        });
    }
    outcomes
}

fn dependencies_of(
    job: &Job,
    jobs: &[&Job],
    finished: &BTreeMap<&str, (PayloadDependency, &str)>,
) -> Vec<PayloadDependency> {
    let stage_index = |stage: &str| jobs.iter().position(|j| j.stage == stage);
    let wanted: Vec<&str> = match (&job.dependencies, job.needs.is_empty()) {
        (Some(names), _) => names.iter().map(String::as_str).collect(),
        (None, false) => job.needs.iter().map(String::as_str).collect(),
        (None, true) => finished
            .iter()
            .filter(|(_, (_, stage))| stage_index(stage) < stage_index(&job.stage))
            .map(|(name, _)| *name)
            .collect(),
    };
    wanted
        .into_iter()
        .filter_map(|name| finished.get(name).map(|(dependency, _)| dependency.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, stage: &str) -> Job {
        Job {
            name: name.into(),
            stage: stage.into(),
            ..Job::default()
        }
    }

    fn done(name: &str, id: u64, artifacts: bool) -> PayloadDependency {
        PayloadDependency {
            id,
            name: name.into(),
            token: format!("token-{id}"),
            artifacts_file: artifacts.then(|| ArtifactsFile {
                filename: "artifacts.zip".into(),
                size: 1,
            }),
        }
    }

    #[test]
    fn dependencies_default_to_earlier_stages_else_needs_else_the_named_ones() {
        let (a, b, c) = (job("a", "build"), job("b", "build"), job("t", "test"));
        let jobs = [&a, &b, &c];
        let mut finished = BTreeMap::new();
        finished.insert("a", (done("a", 1, true), "build"));
        finished.insert("b", (done("b", 2, false), "build"));
        let names =
            |deps: Vec<PayloadDependency>| deps.into_iter().map(|d| d.name).collect::<Vec<_>>();

        assert_eq!(names(dependencies_of(&c, &jobs, &finished)), ["a", "b"]);
        // A job of the same stage does not depend on its neighbours.
        assert!(dependencies_of(&b, &jobs, &finished).is_empty());
        let needs = Job {
            needs: vec!["b".into()],
            ..c.clone()
        };
        assert_eq!(names(dependencies_of(&needs, &jobs, &finished)), ["b"]);
        let named = Job {
            dependencies: Some(vec!["a".into()]),
            needs: vec!["b".into()],
            ..c.clone()
        };
        assert_eq!(names(dependencies_of(&named, &jobs, &finished)), ["a"]);
        let none = Job {
            dependencies: Some(Vec::new()),
            ..c.clone()
        };
        assert!(dependencies_of(&none, &jobs, &finished).is_empty());
    }
}
