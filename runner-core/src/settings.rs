//! Operator settings: a TOML file named with `--config PATH` (usable in `*_args`), overridden
//! by `DROVER_*` variables in the runner's own environment.
//!
//! Settings never come from job variables: those arrive prefixed `CUSTOM_ENV_` (§3.4) and are
//! user input. What a job may change is decided by the operator's [`Policy`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::policy::Policy;
use crate::{Error, Result};

/// Prefix of environment overrides: `DROVER_RUNNER_NAME=ci-1`, `DROVER_POLICY__MAX_CPUS=4`,
/// `DROVER_DRIVER__ROOT=/srv/jobs`. `__` separates table levels; values are read as TOML
/// (`4`, `true`, `["a", "b"]`) and otherwise taken as strings.
pub const ENV_PREFIX: &str = "DROVER_";

/// The top-level keys an override may name. The runner passes its whole environment on (§3.3),
/// so other `DROVER_*` variables (a test's, a wrapper's) are not settings and are left alone;
/// below these keys, a misspelt one is still an error.
const OVERRIDABLE: &[&str] = &[
    "runner_name",
    "builds_dir",
    "cache_dir",
    "gc_grace_secs",
    "cancel_grace_secs",
    "policy",
    "driver",
];

/// Settings every driver shares, plus the driver's own `[driver]` table.
#[derive(Debug, Clone)]
pub struct Settings<D> {
    /// The settings every driver shares.
    pub common: CommonSettings,
    /// The driver's own settings.
    pub driver: D,
}

impl<D> std::ops::Deref for Settings<D> {
    type Target = CommonSettings;

    fn deref(&self) -> &CommonSettings {
        &self.common
    }
}

/// The top-level keys of the settings file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonSettings {
    /// Names this runner in resource names and labels, so `gc` on one host never touches
    /// another runner's resources. Letters, digits and `-`.
    #[serde(default = "default_runner_name")]
    pub runner_name: String,
    /// Overrides the driver's builds dir (a path inside the job environment, §2).
    #[serde(default)]
    pub builds_dir: Option<String>,
    /// Overrides the driver's cache dir (a path inside the job environment, §8).
    #[serde(default)]
    pub cache_dir: Option<String>,
    /// Seconds a job's resources may outlive its timeout before `gc` treats them as leaked.
    #[serde(default = "default_gc_grace")]
    pub gc_grace_secs: u64,
    /// Seconds a run stage waits, after SIGTERM, for the driver to stop its work before the
    /// core gives up on it (§6.3: the runner's own wait is much longer).
    #[serde(default = "default_cancel_grace")]
    pub cancel_grace_secs: u64,
    /// What a job may ask for.
    #[serde(default)]
    pub policy: Policy,
    /// The driver's own table, read into the driver's type by [`Settings::load`].
    #[serde(default)]
    driver: toml::Table,
}

/// The shell a driver runs the runner's scripts with unless configured: `bash`, the runner's
/// default on Unix (§7). For `#[serde(default = "drover_core::settings::default_shell")]`.
pub fn default_shell() -> String {
    "bash".into()
}

fn default_runner_name() -> String {
    "default".into()
}

fn default_gc_grace() -> u64 {
    3600
}

fn default_cancel_grace() -> u64 {
    10
}

impl<D: DeserializeOwned> Settings<D> {
    /// Reads `path` (if any) and applies `DROVER_*` overrides from `env`.
    pub fn load(path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Settings<D>> {
        let mut table = match path {
            Some(path) => read_table(path)?,
            None => toml::Table::new(),
        };
        apply_env_overrides(&mut table, env)?;
        let origin = path.map_or_else(|| "settings".to_owned(), |p| p.display().to_string());
        let invalid = |section: &str, err: toml::de::Error| {
            Error::system(format!("{origin}: {section}{}", err.message()))
        };
        let mut common: CommonSettings = toml::Value::Table(table)
            .try_into()
            .map_err(|err| invalid("", err))?;
        let driver = toml::Value::Table(std::mem::take(&mut common.driver))
            .try_into()
            .map_err(|err| invalid("[driver]: ", err))?;
        common.validate()?;
        Ok(Settings { common, driver })
    }
}

impl CommonSettings {
    fn validate(&self) -> Result<()> {
        let name = &self.runner_name;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Error::system(format!(
                "runner_name {name:?} may only hold letters, digits and '-'"
            )));
        }
        self.policy.validate()
    }
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Error::system(format!(
            "cannot read operator settings {}: {err}",
            path.display()
        ))
    })?;
    text.parse::<toml::Table>()
        .map_err(|err| Error::system(format!("{}: {}", path.display(), err.message())))
}

fn apply_env_overrides(table: &mut toml::Table, env: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in env {
        let Some(path) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if !OVERRIDABLE.contains(&parts[0].as_str()) {
            continue;
        }
        let (last, tables) = parts.split_last().expect("split yields at least one part");
        let mut current = &mut *table;
        for part in tables {
            let entry = current
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = entry
                .as_table_mut()
                .ok_or_else(|| Error::system(format!("{key}: `{part}` is a value, not a table")))?;
        }
        current.insert(last.clone(), parse_env_value(value));
    }
    Ok(())
}

fn parse_env_value(value: &str) -> toml::Value {
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}

/// Where the settings file is: `--config PATH`, else `DROVER_CONFIG`.
pub fn settings_path(flag: Option<PathBuf>, env: &BTreeMap<String, String>) -> Option<PathBuf> {
    flag.or_else(|| {
        env.get("DROVER_CONFIG")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct DriverSettings {
        #[serde(default)]
        root: Option<String>,
        #[serde(default)]
        hook: Vec<String>,
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, "runner_name = \"a\"\n[driver]\nroot = \"/x\"\n").expect("write");
        let settings: Settings<DriverSettings> = Settings::load(
            Some(&path),
            &env(&[
                ("DROVER_RUNNER_NAME", "b"),
                ("DROVER_DRIVER__HOOK", "[\"sleep\", \"1\"]"),
                ("DROVER_POLICY__MAX_CPUS", "4"),
                ("DROVER_CONFIG", "/ignored"),
                ("DROVER_PODMAN_SOCKET", "/not/a/setting"),
                ("CUSTOM_ENV_DROVER_RUNNER_NAME", "job-cannot-set-this"),
            ]),
        )
        .expect("valid");
        assert_eq!(settings.runner_name, "b");
        assert_eq!(settings.driver.root.as_deref(), Some("/x"));
        assert_eq!(settings.driver.hook, ["sleep", "1"]);
        assert_eq!(settings.policy.max_cpus, Some(4.0));
    }

    #[test]
    fn an_unknown_key_is_named_with_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, "runer_name = \"a\"\n").expect("write");
        let err = Settings::<DriverSettings>::load(Some(&path), &env(&[])).expect_err("typo");
        let msg = err.to_string();
        assert!(
            msg.contains("drover.toml") && msg.contains("runer_name"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_file_says_which() {
        let err =
            Settings::<DriverSettings>::load(Some(Path::new("/nonexistent/d.toml")), &env(&[]))
                .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/d.toml"), "{err}");
    }

    #[test]
    fn a_bad_runner_name_is_refused() {
        let err = Settings::<DriverSettings>::load(None, &env(&[("DROVER_RUNNER_NAME", "a b")]))
            .expect_err("space");
        assert!(err.to_string().contains("runner_name"), "{err}");
    }
}
