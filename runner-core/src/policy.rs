//! The job-override policy: what a job's variables may change, within the operator's limits.
//!
//! Jobs ask through variables, which reach the driver as `CUSTOM_ENV_*` (§3.4):
//! `image:` (`CI_JOB_IMAGE`), `DROVER_CPUS`, `DROVER_MEMORY` and `DROVER_MOUNTS` (names of
//! mounts the operator offers). Anything the policy does not allow is refused with a message
//! naming the setting to change, never silently ignored.

use std::collections::BTreeMap;

use drover_protocol::JobEnv;
use serde::Deserialize;

use crate::{Error, Result};

/// Job variable asking for a number of CPUs, e.g. `1.5`.
pub const CPUS_VARIABLE: &str = "DROVER_CPUS";
/// Job variable asking for memory, e.g. `2GiB`.
pub const MEMORY_VARIABLE: &str = "DROVER_MEMORY";
/// Job variable naming operator-offered mounts, comma-separated.
pub const MOUNTS_VARIABLE: &str = "DROVER_MOUNTS";

/// The fewest CPUs a limit may give: container engines count CPUs in billionths, and a request
/// small enough to round to nothing would be no limit at all.
pub const MIN_CPUS: f64 = 0.01;
/// The least memory a limit may give (Docker's own lower bound): below it nothing starts.
pub const MIN_MEMORY_BYTES: u64 = 6 << 20;

/// The operator's `[policy]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Images a job may name, as globs (`*` within one path segment, `**` across segments).
    /// Empty: any image.
    #[serde(default)]
    pub allowed_images: Vec<String>,
    /// Image for jobs without `image:`.
    #[serde(default)]
    pub default_image: Option<String>,
    /// CPUs a job gets unless it asks otherwise.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory a job gets unless it asks otherwise (`512MiB`, `2G`).
    #[serde(default)]
    pub memory: Option<String>,
    /// Upper bound for `DROVER_CPUS`; unset: jobs may not ask.
    #[serde(default)]
    pub max_cpus: Option<f64>,
    /// Upper bound for `DROVER_MEMORY`; unset: jobs may not ask.
    #[serde(default)]
    pub max_memory: Option<String>,
    /// Mounts a job may ask for by name in `DROVER_MOUNTS`.
    #[serde(default)]
    pub mounts: BTreeMap<String, Mount>,
    /// Images a job's `services:` may name, as globs; unset: `allowed_images` applies to them
    /// too. A service runs beside the job with the same reach, so it is never unchecked.
    #[serde(default)]
    pub allowed_services: Option<Vec<String>>,
    /// CPUs of each service container; unset: `cpus`.
    #[serde(default)]
    pub service_cpus: Option<f64>,
    /// Memory of each service container; unset: `memory`.
    #[serde(default)]
    pub service_memory: Option<String>,
    /// CPUs of the helper container (git, cache and artifacts); unset: `cpus`.
    #[serde(default)]
    pub helper_cpus: Option<f64>,
    /// Memory of the helper container; unset: `memory`.
    #[serde(default)]
    pub helper_memory: Option<String>,
}

/// The CPU and memory limits of a container beside the job (a service, the helper).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// CPUs.
    pub cpus: Option<f64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
}

/// A host path offered to jobs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Path on the host (or backend).
    pub source: String,
    /// Path inside the job environment.
    pub target: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// What the job gets, after the policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// The image, or `None` when neither the job nor the operator named one.
    pub image: Option<String>,
    /// CPUs.
    pub cpus: Option<f64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Mounts the job asked for.
    pub mounts: Vec<Mount>,
}

impl Resources {
    /// The image, or the one-line error a container or VM driver gives when neither the job
    /// nor the operator named one.
    pub fn required_image(&self) -> Result<String> {
        self.image.clone().ok_or_else(|| {
            Error::system("the job names no image and the operator set no policy.default_image")
        })
    }
}

impl Policy {
    pub(crate) fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("memory", &self.memory),
            ("max_memory", &self.max_memory),
            ("service_memory", &self.service_memory),
            ("helper_memory", &self.helper_memory),
        ] {
            if let Some(value) = value {
                let bytes = parse_memory(value)
                    .map_err(|e| Error::system(format!("policy.{name}: {e}")))?;
                if bytes < MIN_MEMORY_BYTES {
                    return Err(Error::system(format!(
                        "policy.{name} is below the least memory a job can run in, {} MiB",
                        MIN_MEMORY_BYTES >> 20
                    )));
                }
            }
        }
        for (name, value) in [
            ("cpus", self.cpus),
            ("max_cpus", self.max_cpus),
            ("service_cpus", self.service_cpus),
            ("helper_cpus", self.helper_cpus),
        ] {
            if value.is_some_and(|cpus| !cpus_in_range(cpus, f64::MAX)) {
                return Err(Error::system(format!(
                    "policy.{name} must be a number of CPUs of at least {MIN_CPUS}"
                )));
            }
        }
        Ok(())
    }

    /// The limits of service `image`, if the policy lets jobs run it; the error names the
    /// setting that refused it.
    pub fn service(&self, image: &str) -> Result<Limits> {
        let (allowed, setting) = match &self.allowed_services {
            Some(list) => (list, "policy.allowed_services"),
            None => (&self.allowed_images, "policy.allowed_images"),
        };
        if !allowed.is_empty() && !allowed.iter().any(|glob| glob_matches(glob, image)) {
            return Err(Error::system(format!(
                "service image {image:?} is not allowed by the operator's {setting} ({}); use one of those or ask the operator to add it",
                allowed.join(", ")
            )));
        }
        self.limits(self.service_cpus, self.service_memory.as_deref())
    }

    /// The limits of the helper container.
    pub fn helper(&self) -> Result<Limits> {
        self.limits(self.helper_cpus, self.helper_memory.as_deref())
    }

    fn limits(&self, cpus: Option<f64>, memory: Option<&str>) -> Result<Limits> {
        let memory = memory.or(self.memory.as_deref());
        Ok(Limits {
            cpus: cpus.or(self.cpus),
            memory_bytes: memory
                .map(parse_memory)
                .transpose()
                .map_err(Error::system)?,
        })
    }

    /// Decides the job's resources from what it asked for.
    pub fn resolve(&self, env: &JobEnv) -> Result<Resources> {
        Ok(Resources {
            image: self.image(env)?,
            cpus: self.cpus(env)?,
            memory_bytes: self.memory(env)?,
            mounts: self.mounts(env)?,
        })
    }

    fn image(&self, env: &JobEnv) -> Result<Option<String>> {
        let Some(image) = env.requested_image() else {
            return Ok(self.default_image.clone());
        };
        if self.allowed_images.is_empty()
            || self
                .allowed_images
                .iter()
                .any(|glob| glob_matches(glob, image))
        {
            return Ok(Some(image.to_owned()));
        }
        Err(Error::system(format!(
            "image {image:?} is not allowed by the operator's policy.allowed_images ({}); use one of those or ask the operator to add it",
            self.allowed_images.join(", ")
        )))
    }

    fn cpus(&self, env: &JobEnv) -> Result<Option<f64>> {
        let Some(asked) = env.variable(CPUS_VARIABLE) else {
            return Ok(self.cpus);
        };
        let max = self
            .max_cpus
            .ok_or_else(|| refused(CPUS_VARIABLE, "policy.max_cpus"))?;
        match asked.trim().parse::<f64>() {
            Ok(cpus) if cpus_in_range(cpus, max) => Ok(Some(cpus)),
            _ => Err(Error::system(format!(
                "{CPUS_VARIABLE}={asked:?} must be a number of CPUs from {MIN_CPUS} to {max} (policy.max_cpus)"
            ))),
        }
    }

    fn memory(&self, env: &JobEnv) -> Result<Option<u64>> {
        let default = self
            .memory
            .as_deref()
            .map(parse_memory)
            .transpose()
            .map_err(Error::system)?;
        let Some(asked) = env.variable(MEMORY_VARIABLE) else {
            return Ok(default);
        };
        let max_text = self
            .max_memory
            .as_deref()
            .ok_or_else(|| refused(MEMORY_VARIABLE, "policy.max_memory"))?;
        let max = parse_memory(max_text).map_err(Error::system)?;
        match parse_memory(asked) {
            Ok(bytes) if (MIN_MEMORY_BYTES..=max).contains(&bytes) => Ok(Some(bytes)),
            _ => Err(Error::system(format!(
                "{MEMORY_VARIABLE}={asked:?} must be a size like 512MiB or 2G, from {} MiB to {max_text} (policy.max_memory)",
                MIN_MEMORY_BYTES >> 20
            ))),
        }
    }

    fn mounts(&self, env: &JobEnv) -> Result<Vec<Mount>> {
        let Some(asked) = env.variable(MOUNTS_VARIABLE) else {
            return Ok(Vec::new());
        };
        asked
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| {
                self.mounts.get(name).cloned().ok_or_else(|| {
                    let offered: Vec<&str> = self.mounts.keys().map(String::as_str).collect();
                    Error::system(format!(
                        "{MOUNTS_VARIABLE} names {name:?}, which the operator does not offer (policy.mounts: {})",
                        if offered.is_empty() { "none".to_owned() } else { offered.join(", ") }
                    ))
                })
            })
            .collect()
    }
}

/// Whether `cpus` is a number of CPUs a limit can give: finite, at least [`MIN_CPUS`].
fn cpus_in_range(cpus: f64, max: f64) -> bool {
    cpus.is_finite() && (MIN_CPUS..=max).contains(&cpus)
}

fn refused(variable: &str, setting: &str) -> Error {
    Error::system(format!(
        "the job sets {variable}, but the operator does not let jobs change it (set {setting} to allow it)"
    ))
}

/// Parses `1024`, `512M`, `512MiB`, `2G`, `2GB` (binary multiples, as container engines do).
pub fn parse_memory(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512MiB or 2G"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{text:?} has an unknown unit {unit:?}")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Matches `text` against a glob where `*` stays within one `/`-separated segment and `**`
/// crosses segments, as the docker executor's `allowed_images` does.
pub fn glob_matches(glob: &str, text: &str) -> bool {
    fn matches(glob: &[u8], text: &[u8]) -> bool {
        match glob {
            [] => text.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=text.len()).any(|i| matches(rest, &text[i..])),
            [b'*', rest @ ..] => (0..=text.len())
                .take_while(|&i| i == 0 || text[i - 1] != b'/')
                .any(|i| matches(rest, &text[i..])),
            [g, rest @ ..] => text.first() == Some(g) && matches(rest, &text[1..]),
        }
    }
    matches(glob.as_bytes(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(vars: &[(&str, &str)]) -> JobEnv {
        let mut env: BTreeMap<String, String> = [
            ("BUILD_FAILURE_EXIT_CODE", "1"),
            ("SYSTEM_FAILURE_EXIT_CODE", "2"),
            ("JOB_RESPONSE_FILE", "/r.json"),
        ]
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
        for (k, v) in vars {
            env.insert(format!("CUSTOM_ENV_{k}"), (*v).into());
        }
        JobEnv::from_map(&env).expect("valid env")
    }

    #[test]
    fn globs_follow_path_segments() {
        assert!(glob_matches("debian:*", "debian:12"));
        assert!(glob_matches("localhost/*", "localhost/app:1"));
        assert!(!glob_matches("localhost/*", "localhost/team/app"));
        assert!(glob_matches("localhost/**", "localhost/team/app"));
        assert!(!glob_matches("debian:*", "evil/debian:12"));
    }

    #[test]
    fn an_image_off_the_allow_list_is_refused_naming_the_list() {
        let policy = Policy {
            allowed_images: vec!["debian:*".into()],
            ..Policy::default()
        };
        let err = policy
            .resolve(&job(&[("CI_JOB_IMAGE", "alpine:3")]))
            .expect_err("refused");
        assert!(
            err.to_string().contains("policy.allowed_images (debian:*)"),
            "{err}"
        );
        let ok = policy
            .resolve(&job(&[("CI_JOB_IMAGE", "debian:12")]))
            .expect("allowed");
        assert_eq!(ok.image.as_deref(), Some("debian:12"));
    }

    #[test]
    fn without_image_the_default_applies() {
        let policy = Policy {
            default_image: Some("debian:12".into()),
            ..Policy::default()
        };
        assert_eq!(
            policy.resolve(&job(&[])).expect("ok").image.as_deref(),
            Some("debian:12")
        );
    }

    #[test]
    fn resource_overrides_need_a_cap_and_stay_under_it() {
        let closed = Policy {
            cpus: Some(1.0),
            ..Policy::default()
        };
        let err = closed
            .resolve(&job(&[("DROVER_CPUS", "2")]))
            .expect_err("no cap");
        assert!(err.to_string().contains("policy.max_cpus"), "{err}");
        assert_eq!(closed.resolve(&job(&[])).expect("default").cpus, Some(1.0));

        let open = Policy {
            max_cpus: Some(4.0),
            max_memory: Some("4GiB".into()),
            ..Policy::default()
        };
        let ok = open
            .resolve(&job(&[("DROVER_CPUS", "2.5"), ("DROVER_MEMORY", "512M")]))
            .expect("within caps");
        assert_eq!((ok.cpus, ok.memory_bytes), (Some(2.5), Some(512 << 20)));
        assert!(open.resolve(&job(&[("DROVER_CPUS", "8")])).is_err());
        assert!(open.resolve(&job(&[("DROVER_MEMORY", "8G")])).is_err());
        assert!(open.resolve(&job(&[("DROVER_MEMORY", "lots")])).is_err());
    }

    #[test]
    fn requests_below_the_floors_are_refused() {
        let open = Policy {
            max_cpus: Some(4.0),
            max_memory: Some("4GiB".into()),
            ..Policy::default()
        };
        for cpus in ["0.0000000001", "0", "-1", "NaN", "inf", "1e-3"] {
            let err = open
                .resolve(&job(&[("DROVER_CPUS", cpus)]))
                .expect_err(cpus);
            assert!(err.to_string().contains("from 0.01 to 4"), "{cpus}: {err}");
        }
        assert_eq!(
            open.resolve(&job(&[("DROVER_CPUS", "0.01")]))
                .expect("floor")
                .cpus,
            Some(0.01)
        );
        for memory in ["1", "5MiB", "0"] {
            assert!(
                open.resolve(&job(&[("DROVER_MEMORY", memory)])).is_err(),
                "{memory}"
            );
        }
        let tiny = Policy {
            cpus: Some(1e-10),
            ..Policy::default()
        };
        assert!(tiny.validate().is_err());
    }

    #[test]
    fn services_go_through_an_allow_list_and_get_limits_of_their_own() {
        let policy = Policy {
            allowed_images: vec!["debian:*".into()],
            cpus: Some(2.0),
            memory: Some("1GiB".into()),
            service_memory: Some("256MiB".into()),
            ..Policy::default()
        };
        let err = policy.service("evil/miner:1").expect_err("refused");
        assert!(
            err.to_string().contains("policy.allowed_images (debian:*)"),
            "{err}"
        );
        let limits = policy.service("debian:12").expect("allowed");
        assert_eq!(limits.cpus, Some(2.0));
        assert_eq!(limits.memory_bytes, Some(256 << 20));
        let own_list = Policy {
            allowed_services: Some(vec!["redis:*".into()]),
            ..policy.clone()
        };
        assert!(own_list.service("redis:7").is_ok());
        assert!(own_list.service("debian:12").is_err());
        assert_eq!(policy.helper().expect("helper").memory_bytes, Some(1 << 30));
    }

    #[test]
    fn only_offered_mounts_can_be_asked_for() {
        let policy = Policy {
            mounts: BTreeMap::from([(
                "datasets".into(),
                Mount {
                    source: "/srv/data".into(),
                    target: "/data".into(),
                    read_only: true,
                },
            )]),
            ..Policy::default()
        };
        let ok = policy
            .resolve(&job(&[("DROVER_MOUNTS", "datasets")]))
            .expect("offered");
        assert_eq!(ok.mounts[0].target, "/data");
        let err = policy
            .resolve(&job(&[("DROVER_MOUNTS", "datasets,/etc")]))
            .expect_err("not offered");
        assert!(err.to_string().contains("\"/etc\""), "{err}");
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("1024"), Ok(1024));
        assert_eq!(parse_memory("2GiB"), Ok(2 << 30));
        assert_eq!(parse_memory("2g"), Ok(2 << 30));
        assert!(parse_memory("2 parsecs").is_err());
        assert!(parse_memory("").is_err());
    }
}
