//! A small subset of `.gitlab-ci.yml`: enough to describe the jobs a driver is tested with.
//!
//! Top level: optional `stages:`, global `variables:`, `default:` (image, services,
//! before_script, after_script, cache) and jobs. A job is any top-level key whose value is a map
//! with `script`; keys starting with `.` (templates) and the reserved keywords are not jobs.

use std::time::Duration;

use serde_norway::{Mapping, Value};
use thiserror::Error;

/// GitLab's default stage list, used when the file has no `stages:`.
const DEFAULT_STAGES: [&str; 5] = [".pre", "build", "test", "deploy", ".post"];

/// Top-level keys that are keywords, never job names.
const RESERVED: [&str; 11] = [
    "stages",
    "types",
    "variables",
    "default",
    "include",
    "workflow",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
];

/// Why a job file could not be read. Every message names the job and the field at fault.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum JobFileError {
    /// The text is not YAML, or its top level is not a map.
    #[error("not a valid job file: {0}")]
    Yaml(String),
    /// A field has the wrong shape.
    #[error("job {job:?}: field `{field}`: {reason}")]
    Field {
        /// The job's name, or `(top level)`.
        job: String,
        /// The field's name.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// `--job NAME` named no job of the file.
    #[error("no job named {0:?} in the file")]
    NoSuchJob(String),
}

/// A parsed job file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFile {
    /// The stage order.
    pub stages: Vec<String>,
    /// Global variables, in file order.
    pub variables: Vec<(String, String)>,
    /// The jobs, in file order.
    pub jobs: Vec<Job>,
}

/// One job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Job {
    /// The job's name (its top-level key).
    pub name: String,
    /// `stage`, default `test`.
    pub stage: String,
    /// `image`.
    pub image: Option<String>,
    /// `services`.
    pub services: Vec<ServiceSpec>,
    /// The job's own `variables`, in file order.
    pub variables: Vec<(String, String)>,
    /// `before_script`.
    pub before_script: Vec<String>,
    /// `script`.
    pub script: Vec<String>,
    /// `after_script`.
    pub after_script: Vec<String>,
    /// `cache`.
    pub cache: Option<CacheSpec>,
    /// `artifacts`.
    pub artifacts: Option<ArtifactsSpec>,
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `dependencies` (kept; pipelines are not run yet).
    pub dependencies: Option<Vec<String>>,
    /// `needs` (kept; pipelines are not run yet).
    pub needs: Vec<String>,
}

/// One entry of `services`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Image name.
    pub name: String,
    /// Alias, if any.
    pub alias: Option<String>,
    /// Entrypoint override.
    pub entrypoint: Option<Vec<String>>,
    /// Command override.
    pub command: Option<Vec<String>>,
    /// Service variables.
    pub variables: Vec<(String, String)>,
}

/// `cache`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// `key`, default `default`.
    pub key: String,
    /// `paths`.
    pub paths: Vec<String>,
    /// `when`: `on_success` (default), `on_failure` or `always`.
    pub when: String,
}

/// `artifacts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactsSpec {
    /// `paths`.
    pub paths: Vec<String>,
    /// `when`: `on_success` (default), `on_failure` or `always`.
    pub when: String,
}

impl JobFile {
    /// Parses the text of a job file.
    pub fn parse(text: &str) -> Result<JobFile, JobFileError> {
        let root: Value =
            serde_norway::from_str(text).map_err(|e| JobFileError::Yaml(e.to_string()))?;
        let Value::Mapping(root) = root else {
            return Err(JobFileError::Yaml("the top level is not a map".into()));
        };
        let top = Fields::new("(top level)", &root);
        let stages = match top.get("stages") {
            Some(_) => top.string_list("stages")?,
            None => DEFAULT_STAGES.iter().map(|s| s.to_string()).collect(),
        };
        let variables = top.variables("variables")?;
        let defaults = match top.get("default") {
            Some(Value::Mapping(map)) => Some(map),
            Some(_) => return Err(top.error("default", "expected a map")),
            None => None,
        };
        let mut jobs = Vec::new();
        for (key, value) in &root {
            let Some(name) = key.as_str() else { continue };
            if name.starts_with('.') || RESERVED.contains(&name) {
                continue;
            }
            let Value::Mapping(map) = value else { continue };
            if !map.contains_key("script") {
                continue;
            }
            jobs.push(parse_job(name, map, &root, defaults)?);
        }
        Ok(JobFile {
            stages,
            variables,
            jobs,
        })
    }

    /// The jobs in the order GitLab would run them one by one: by stage, then file order.
    /// A job whose stage is not listed runs last.
    pub fn jobs_in_stage_order(&self) -> Vec<&Job> {
        let mut jobs: Vec<&Job> = self.jobs.iter().collect();
        jobs.sort_by_key(|job| {
            self.stages
                .iter()
                .position(|s| *s == job.stage)
                .unwrap_or(usize::MAX)
        });
        jobs
    }

    /// The job named `name`.
    pub fn job(&self, name: &str) -> Result<&Job, JobFileError> {
        self.jobs
            .iter()
            .find(|j| j.name == name)
            .ok_or_else(|| JobFileError::NoSuchJob(name.into()))
    }
}

fn parse_job(
    name: &str,
    map: &Mapping,
    root: &Mapping,
    defaults: Option<&Mapping>,
) -> Result<Job, JobFileError> {
    let f = Fields::new(name, map);
    // A job keyword falls back to `default:`, then to the legacy top-level keyword.
    let inherited = |key: &str| -> Option<Fields<'_>> {
        if f.get(key).is_some() {
            return Some(Fields::new(name, map));
        }
        defaults
            .filter(|d| d.contains_key(key))
            .or_else(|| root.get(key).map(|_| root))
            .map(|m| Fields::new(name, m))
    };
    let image = match inherited("image") {
        Some(src) => Some(src.image("image")?),
        None => None,
    };
    let services = match inherited("services") {
        Some(src) => src.services("services")?,
        None => Vec::new(),
    };
    let before_script = match inherited("before_script") {
        Some(src) => src.script("before_script")?,
        None => Vec::new(),
    };
    let after_script = match inherited("after_script") {
        Some(src) => src.script("after_script")?,
        None => Vec::new(),
    };
    let cache = match inherited("cache") {
        Some(src) => src.cache("cache")?,
        None => None,
    };
    Ok(Job {
        name: name.into(),
        stage: f.opt_string("stage")?.unwrap_or_else(|| "test".into()),
        image,
        services,
        variables: f.variables("variables")?,
        before_script,
        script: f.script("script")?,
        after_script,
        cache,
        artifacts: f.artifacts("artifacts")?,
        timeout: match f.opt_string("timeout")? {
            Some(text) => Some(
                parse_duration(&text)
                    .ok_or_else(|| f.error("timeout", &format!("{text:?} is not a duration")))?,
            ),
            None => None,
        },
        dependencies: match f.get("dependencies") {
            Some(_) => Some(f.string_list("dependencies")?),
            None => None,
        },
        needs: f.needs("needs")?,
    })
}

/// Typed access to one map's fields, producing errors that name the job and field.
struct Fields<'a> {
    job: &'a str,
    map: &'a Mapping,
}

impl<'a> Fields<'a> {
    fn new(job: &'a str, map: &'a Mapping) -> Self {
        Fields { job, map }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn error(&self, field: &str, reason: &str) -> JobFileError {
        JobFileError::Field {
            job: self.job.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>, JobFileError> {
        self.get(key)
            .map(|v| scalar(v).ok_or_else(|| self.error(key, "expected a string")))
            .transpose()
    }

    fn string_list(&self, key: &str) -> Result<Vec<String>, JobFileError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|v| scalar(v).ok_or_else(|| self.error(key, "expected a list of strings")))
                .collect(),
            Some(_) => Err(self.error(key, "expected a list of strings")),
        }
    }

    /// A script keyword: a string or a list of strings (nested lists are flattened, as GitLab
    /// does for YAML anchors).
    fn script(&self, key: &str) -> Result<Vec<String>, JobFileError> {
        fn flatten(value: &Value, out: &mut Vec<String>) -> bool {
            match value {
                Value::Sequence(items) => items.iter().all(|v| flatten(v, out)),
                other => scalar(other).map(|s| out.push(s)).is_some(),
            }
        }
        let mut lines = Vec::new();
        match self.get(key) {
            None => Ok(lines),
            Some(v) if flatten(v, &mut lines) => Ok(lines),
            Some(_) => Err(self.error(key, "expected a string or a list of strings")),
        }
    }

    fn variables(&self, key: &str) -> Result<Vec<(String, String)>, JobFileError> {
        let map = match self.get(key) {
            None => return Ok(Vec::new()),
            Some(Value::Mapping(map)) => map,
            Some(_) => return Err(self.error(key, "expected a map")),
        };
        map.iter()
            .map(|(k, v)| {
                let name = k
                    .as_str()
                    .ok_or_else(|| self.error(key, "variable names must be strings"))?;
                // `{value: ..., description: ...}` is GitLab's long form.
                let value = match v {
                    Value::Mapping(long) => long.get("value").and_then(scalar),
                    other => scalar(other),
                };
                let value = value.ok_or_else(|| {
                    self.error(
                        key,
                        &format!("variable {name}: expected a string or a number"),
                    )
                })?;
                Ok((name.to_owned(), value))
            })
            .collect()
    }

    fn image(&self, key: &str) -> Result<String, JobFileError> {
        match self.get(key) {
            Some(Value::Mapping(map)) => Fields::new(self.job, map)
                .opt_string("name")?
                .ok_or_else(|| self.error(key, "expected `name`")),
            Some(v) => scalar(v).ok_or_else(|| self.error(key, "expected a string or a map")),
            None => Err(self.error(key, "missing")),
        }
    }

    fn services(&self, key: &str) -> Result<Vec<ServiceSpec>, JobFileError> {
        self.list(key)?
            .iter()
            .map(|item| match item {
                Value::Mapping(map) => {
                    let s = Fields::new(self.job, map);
                    let words = |k: &str| -> Result<Option<Vec<String>>, JobFileError> {
                        match s.get(k) {
                            None => Ok(None),
                            Some(Value::Sequence(_)) => s.string_list(k).map(Some),
                            Some(v) => scalar(v)
                                .map(|one| Some(vec![one]))
                                .ok_or_else(|| self.error(key, &format!("{k}: expected a list"))),
                        }
                    };
                    Ok(ServiceSpec {
                        name: s
                            .opt_string("name")?
                            .ok_or_else(|| self.error(key, "a service needs `name`"))?,
                        alias: s.opt_string("alias")?,
                        entrypoint: words("entrypoint")?,
                        command: words("command")?,
                        variables: s.variables("variables")?,
                    })
                }
                other => scalar(other)
                    .map(|name| ServiceSpec {
                        name,
                        ..ServiceSpec::default()
                    })
                    .ok_or_else(|| self.error(key, "expected a string or a map")),
            })
            .collect()
    }

    /// A list field; absent means empty.
    fn list(&self, key: &str) -> Result<&'a [Value], JobFileError> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Sequence(items)) => Ok(items),
            Some(_) => Err(self.error(key, "expected a list")),
        }
    }

    fn sub_map(&self, key: &str) -> Result<Option<Fields<'a>>, JobFileError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Mapping(map)) => Ok(Some(Fields::new(self.job, map))),
            Some(_) => Err(self.error(key, "expected a map")),
        }
    }

    fn when(&self, parent: &str) -> Result<String, JobFileError> {
        let when = self
            .opt_string("when")?
            .unwrap_or_else(|| "on_success".into());
        match when.as_str() {
            "on_success" | "on_failure" | "always" => Ok(when),
            other => Err(self.error(
                &format!("{parent}:when"),
                &format!("{other:?} is not on_success, on_failure or always"),
            )),
        }
    }

    fn cache(&self, key: &str) -> Result<Option<CacheSpec>, JobFileError> {
        let Some(c) = self.sub_map(key)? else {
            return Ok(None);
        };
        Ok(Some(CacheSpec {
            key: c.opt_string("key")?.unwrap_or_else(|| "default".into()),
            paths: c.string_list("paths")?,
            when: c.when(key)?,
        }))
    }

    fn artifacts(&self, key: &str) -> Result<Option<ArtifactsSpec>, JobFileError> {
        let Some(a) = self.sub_map(key)? else {
            return Ok(None);
        };
        Ok(Some(ArtifactsSpec {
            paths: a.string_list("paths")?,
            when: a.when(key)?,
        }))
    }

    /// `needs`: job names, or maps with `job:`.
    fn needs(&self, key: &str) -> Result<Vec<String>, JobFileError> {
        self.list(key)?
            .iter()
            .map(|item| match item {
                Value::Mapping(map) => Fields::new(self.job, map)
                    .opt_string("job")?
                    .ok_or_else(|| self.error(key, "a map entry needs `job`")),
                other => scalar(other).ok_or_else(|| self.error(key, "expected job names")),
            })
            .collect()
    }
}

/// A YAML scalar as GitLab reads it: strings as they are, numbers and booleans as their text.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses a GitLab duration such as `30s`, `10m`, `1h 30m`, `2 minutes` or `90` (seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            "w" | "week" | "weeks" => 604_800,
            _ => return None,
        };
        total = total.checked_add(number.checked_mul(factor)?)?;
        rest = rest[unit_len..].trim_start_matches([' ', ',']);
        rest = rest.strip_prefix("and ").unwrap_or(rest).trim_start();
    }
    Some(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_gitlab_forms() {
        for (text, secs) in [
            ("30s", 30),
            ("10m", 600),
            ("1h 30m", 5400),
            ("1h30m", 5400),
            ("2 minutes", 120),
            ("90", 90),
            ("1 hour and 5 minutes", 3900),
        ] {
            assert_eq!(
                parse_duration(text),
                Some(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in ["", "abc", "5 fortnights", "m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn jobs_defaults_and_order() {
        let file = JobFile::parse(
            r#"
stages: [build, test]
variables: {GLOBAL: "1", NUM: 5}
.template: {script: [echo no]}
default:
  image: alpine
test-job:
  script: echo test
  after_script: [echo after]
build-job:
  stage: build
  image: {name: "debian:12"}
  services: [postgres, {name: redis, alias: cache, command: [redis-server]}]
  variables: {A: b, N: 3}
  before_script: [echo before]
  script: [echo a, echo b]
  cache: {paths: [vendor/]}
  artifacts: {paths: [out/], when: always}
  timeout: 1h 30m
  needs: [x, {job: y}]
"#,
        )
        .expect("valid");
        assert_eq!(file.stages, ["build", "test"]);
        assert_eq!(file.variables[1], ("NUM".into(), "5".into()));
        let names: Vec<&str> = file
            .jobs_in_stage_order()
            .iter()
            .map(|j| j.name.as_str())
            .collect();
        assert_eq!(names, ["build-job", "test-job"]);
        let build = file.job("build-job").expect("present");
        assert_eq!(build.image.as_deref(), Some("debian:12"));
        assert_eq!(build.services[1].alias.as_deref(), Some("cache"));
        assert_eq!(
            build.cache.as_ref().map(|c| c.key.as_str()),
            Some("default")
        );
        assert_eq!(
            build.artifacts.as_ref().map(|a| a.when.as_str()),
            Some("always")
        );
        assert_eq!(build.timeout, Some(Duration::from_secs(5400)));
        assert_eq!(build.needs, ["x", "y"]);
        let test = file.job("test-job").expect("present");
        assert_eq!(test.stage, "test");
        assert_eq!(test.image.as_deref(), Some("alpine"));
        assert_eq!(test.script, ["echo test"]);
    }

    #[test]
    fn errors_name_the_job_and_field() {
        let err = JobFile::parse("j:\n  script: echo\n  timeout: soon\n").expect_err("bad");
        let text = err.to_string();
        assert!(text.contains("\"j\"") && text.contains("timeout"), "{text}");
        let err = JobFile::parse("j:\n  script: {a: b}\n").expect_err("bad");
        assert!(err.to_string().contains("`script`"), "{err}");
        let err = JobFile::parse("j:\n  script: x\n  variables: [a]\n").expect_err("bad");
        assert!(err.to_string().contains("`variables`"), "{err}");
        assert!(matches!(JobFile::parse("- a"), Err(JobFileError::Yaml(_))));
    }
}
