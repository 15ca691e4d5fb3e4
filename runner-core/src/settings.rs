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

mod de;

use de::{Loc, Node, NodeDe};

/// Prefix of environment overrides: `DROVER_RUNNER_NAME=ci-1`, `DROVER_POLICY__MAX_CPUS=4`,
/// `DROVER_DRIVER__ROOT=/srv/jobs`. `__` separates table levels and keys are lowercased. A
/// value is read as the type of the setting it names: as written for a string, parsed for a
/// number, `true`/`false` or a variant name, TOML array syntax (`["a", "b"]`) for a list; a
/// table is set key by key.
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

/// The longest `runner_name`: it goes into every resource name,
/// `drover-<runner>-p<project>-j<job>`, and LXD's instance names and hostnames stop at 63
/// characters, which leaves room for 12-digit project and 14-digit job ids.
pub const MAX_RUNNER_NAME: usize = 24;

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

/// The top-level keys of the settings file, except the driver's `[driver]` table.
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
    /// Never read here: [`Settings::load`] reads `[driver]` into the driver's type. Declared
    /// so that the message for a misspelt top-level key lists `driver` too.
    #[serde(default, rename = "driver")]
    _driver: serde::de::IgnoredAny,
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
    ///
    /// An override takes the type of the setting it names (`DROVER_RUNNER_NAME=42` is the
    /// name "42"); lists use TOML array syntax. Errors name the file's key path or the
    /// variable and never show the value, which may be a secret.
    pub fn load(path: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Settings<D>> {
        let mut root = match path {
            Some(path) => read_table(path)?,
            None => BTreeMap::new(),
        };
        apply_env_overrides(&mut root, env)?;
        let origin = path.map_or_else(|| "settings".to_owned(), |p| p.display().to_string());
        let top = Loc::root();
        // The driver's table has the driver's type, unknown to the core: read it on its own.
        let driver = root.remove("driver").unwrap_or_else(Node::empty_table);
        let driver_loc = top.child("driver", &driver);
        let root = Node::Table {
            entries: root,
            created_by: None,
        };
        let common =
            CommonSettings::deserialize(NodeDe::new(root, top, &origin)).map_err(Error::system)?;
        let driver =
            D::deserialize(NodeDe::new(driver, driver_loc, &origin)).map_err(Error::system)?;
        common.validate()?;
        Ok(Settings { common, driver })
    }
}

impl CommonSettings {
    fn validate(&self) -> Result<()> {
        let name = &self.runner_name;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            // Not quoted: no settings error shows a value.
            return Err(Error::system(
                "runner_name may only hold letters, digits and '-'",
            ));
        }
        if name.len() > MAX_RUNNER_NAME {
            return Err(Error::system(format!(
                "runner_name is longer than {MAX_RUNNER_NAME} characters; resource names hold it (LXD's stop at 63)"
            )));
        }
        self.policy.validate()
    }
}

fn read_table(path: &Path) -> Result<BTreeMap<String, Node>> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Error::system(format!(
            "cannot read operator settings {}: {err}",
            path.display()
        ))
    })?;
    // `err.message()` without toml's source snippet: the snippet could show a secret.
    let table = text.parse::<toml::Table>().map_err(|err| {
        let line = err.span().map(|span| {
            let before = text.as_bytes().get(..span.start).unwrap_or_default();
            before.iter().filter(|&&b| b == b'\n').count() + 1
        });
        match line {
            Some(line) => Error::system(format!(
                "{}: line {line}: {}",
                path.display(),
                err.message()
            )),
            None => Error::system(format!("{}: {}", path.display(), err.message())),
        }
    })?;
    Ok(table
        .into_iter()
        .map(|(key, value)| (key, Node::from_toml(value)))
        .collect())
}

fn apply_env_overrides(
    root: &mut BTreeMap<String, Node>,
    env: &BTreeMap<String, String>,
) -> Result<()> {
    for (variable, value) in env {
        let Some(path) = variable.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let written: Vec<&str> = path.split("__").collect();
        let keys: Vec<String> = written.iter().map(|k| k.to_ascii_lowercase()).collect();
        let Some((last, tables)) = keys.split_last() else {
            continue;
        };
        if !keys
            .first()
            .is_some_and(|top| OVERRIDABLE.contains(&top.as_str()))
        {
            continue;
        }
        let mut current = &mut *root;
        for (depth, key) in tables.iter().enumerate() {
            let entry = current.entry(key.clone()).or_insert_with(|| Node::Table {
                entries: BTreeMap::new(),
                created_by: Some(format!("{ENV_PREFIX}{}", written[..=depth].join("__"))),
            });
            current = match entry {
                Node::Table { entries, .. } => entries,
                _ => {
                    return Err(Error::system(format!(
                        "{variable}: `{key}` is a value, not a table"
                    )));
                }
            };
        }
        current.insert(
            last.clone(),
            Node::Text {
                raw: value.clone(),
                variable: Some(variable.clone()),
            },
        );
    }
    Ok(())
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
        #[serde(default)]
        pull_policy: Option<PullPolicy>,
        #[serde(default)]
        debug: bool,
        #[serde(default)]
        idle_count: Option<u32>,
        #[serde(default)]
        registries: BTreeMap<String, Credentials>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum PullPolicy {
        Always,
        IfNotPresent,
        Never,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Credentials {
        username: String,
        password: String,
    }

    fn settings_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    fn load_error(path: Option<&Path>, pairs: &[(&str, &str)]) -> String {
        Settings::<DriverSettings>::load(path, &env(pairs))
            .expect_err("invalid")
            .to_string()
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
    fn a_runner_name_too_long_for_resource_names_is_refused() {
        let long = "a".repeat(MAX_RUNNER_NAME + 1);
        let err = Settings::<DriverSettings>::load(None, &env(&[("DROVER_RUNNER_NAME", &long)]))
            .expect_err("too long");
        assert!(err.to_string().contains("longer than 24"), "{err}");
        let fits = "a".repeat(MAX_RUNNER_NAME);
        assert!(
            Settings::<DriverSettings>::load(None, &env(&[("DROVER_RUNNER_NAME", &fits)])).is_ok()
        );
    }

    #[test]
    fn a_bad_runner_name_is_refused() {
        let err = Settings::<DriverSettings>::load(None, &env(&[("DROVER_RUNNER_NAME", "a b")]))
            .expect_err("space");
        assert!(err.to_string().contains("runner_name"), "{err}");
    }

    #[test]
    fn an_all_digit_override_of_a_string_stays_a_string() {
        let settings: Settings<DriverSettings> = Settings::load(
            None,
            &env(&[
                ("DROVER_RUNNER_NAME", "42"),
                ("DROVER_DRIVER__ROOT", "007"),
                ("DROVER_DRIVER__REGISTRIES__EXAMPLE__USERNAME", "1000"),
                ("DROVER_DRIVER__REGISTRIES__EXAMPLE__PASSWORD", "123456"),
            ]),
        )
        .expect("valid");
        assert_eq!(settings.runner_name, "42");
        assert_eq!(settings.driver.root.as_deref(), Some("007"));
        let example = &settings.driver.registries["example"];
        assert_eq!(
            (example.username.as_str(), example.password.as_str()),
            ("1000", "123456")
        );
    }

    #[test]
    fn overrides_take_the_type_of_their_setting() {
        let (_dir, path) = settings_file(
            "[policy]\nmax_cpus = 2\n[policy.mounts.data]\nsource = \"/srv\"\ntarget = \"/data\"\n",
        );
        let settings: Settings<DriverSettings> = Settings::load(
            Some(&path),
            &env(&[
                ("DROVER_BUILDS_DIR", "/builds"),
                ("DROVER_GC_GRACE_SECS", " 60 "),
                ("DROVER_POLICY__CPUS", "1.5"),
                ("DROVER_POLICY__MAX_CPUS", "4"),
                (
                    "DROVER_POLICY__ALLOWED_IMAGES",
                    "[\"debian:*\", \"alpine:3\"]",
                ),
                ("DROVER_POLICY__MOUNTS__DATA__READ_ONLY", "true"),
                ("DROVER_POLICY__MOUNTS__CACHE__SOURCE", "/var/cache"),
                ("DROVER_POLICY__MOUNTS__CACHE__TARGET", "/cache"),
                ("DROVER_DRIVER__PULL_POLICY", "if-not-present"),
                ("DROVER_DRIVER__DEBUG", "true"),
                ("DROVER_DRIVER__IDLE_COUNT", "3"),
            ]),
        )
        .expect("valid");
        assert_eq!(settings.builds_dir.as_deref(), Some("/builds"));
        assert_eq!(settings.cache_dir, None);
        assert_eq!(settings.gc_grace_secs, 60);
        assert_eq!(settings.policy.cpus, Some(1.5));
        assert_eq!(settings.policy.max_cpus, Some(4.0));
        assert_eq!(settings.policy.allowed_images, ["debian:*", "alpine:3"]);
        let data = &settings.policy.mounts["data"];
        assert_eq!((data.source.as_str(), data.read_only), ("/srv", true));
        assert_eq!(settings.policy.mounts["cache"].target, "/cache");
        assert_eq!(settings.driver.pull_policy, Some(PullPolicy::IfNotPresent));
        assert!(settings.driver.debug);
        assert_eq!(settings.driver.idle_count, Some(3));
    }

    #[test]
    fn a_bad_override_names_the_variable_and_not_the_value() {
        for (variable, value, wanted) in [
            ("DROVER_POLICY__MAX_CPUS", "s3cr3t", "expected a number"),
            (
                "DROVER_GC_GRACE_SECS",
                "98127364598127364598127364",
                "expected a whole number, 0 or more",
            ),
            (
                "DROVER_DRIVER__IDLE_COUNT",
                "-7777",
                "expected a whole number from 0 to",
            ),
            (
                "DROVER_DRIVER__DEBUG",
                "yes-please",
                "expected true or false",
            ),
            (
                "DROVER_DRIVER__PULL_POLICY",
                "hunter2",
                "unknown variant, expected one of",
            ),
            ("DROVER_DRIVER__HOOK", "not-a-list", "expected an array"),
            (
                "DROVER_DRIVER__HOOK",
                "[\"ok\", 31337]",
                "expected a string, found an integer",
            ),
        ] {
            let msg = load_error(None, &[(variable, value)]);
            assert!(msg.starts_with(variable), "{msg}");
            assert!(msg.contains(wanted), "{msg}");
            for secret in [
                "s3cr3t",
                "9812736",
                "7777",
                "yes-please",
                "hunter2",
                "not-a-list",
                "31337",
            ] {
                assert!(!msg.contains(secret), "{msg}");
            }
        }
        let msg = load_error(None, &[("DROVER_DRIVER__HOOK", "[\"ok\", 31337]")]);
        assert!(msg.starts_with("DROVER_DRIVER__HOOK[1]: "), "{msg}");
    }

    #[test]
    fn a_wrong_type_in_the_file_names_the_key_path_and_not_the_value() {
        let (_dir, path) =
            settings_file("[driver.registries.example]\nusername = \"u\"\npassword = 123456\n");
        let msg = load_error(Some(&path), &[]);
        assert!(
            msg.ends_with(
                "drover.toml: driver.registries.example.password: expected a string, found an integer"
            ),
            "{msg}"
        );
        assert!(!msg.contains("123456"), "{msg}");

        let (_dir, path) = settings_file("[policy]\nmax_cpus = \"four\"\n");
        let msg = load_error(Some(&path), &[]);
        assert!(
            msg.ends_with("drover.toml: policy.max_cpus: expected a number, found a string"),
            "{msg}"
        );
        assert!(!msg.contains("four"), "{msg}");

        let (_dir, path) = settings_file("[driver]\npull_policy = \"sometimes-secret\"\n");
        let msg = load_error(Some(&path), &[]);
        assert!(msg.contains("driver.pull_policy: unknown variant"), "{msg}");
        assert!(!msg.contains("sometimes-secret"), "{msg}");
    }

    #[test]
    fn a_missing_key_names_its_table() {
        let (_dir, path) = settings_file("[driver.registries.example]\nusername = \"u\"\n");
        let msg = load_error(Some(&path), &[]);
        assert!(
            msg.ends_with("drover.toml: driver.registries.example: missing field `password`"),
            "{msg}"
        );
        let msg = load_error(None, &[("DROVER_POLICY__MOUNTS__DATA__SOURCE", "/srv")]);
        assert!(
            msg.starts_with("DROVER_POLICY__MOUNTS__DATA__*: missing field `target`"),
            "{msg}"
        );
    }

    #[test]
    fn a_toml_syntax_error_gives_the_line_without_the_text() {
        let (_dir, path) = settings_file("runner_name = \"a\"\n[driver]\nroot = sw0rdfish\n");
        let msg = load_error(Some(&path), &[]);
        assert!(msg.contains("drover.toml: line 3: "), "{msg}");
        assert!(!msg.contains("sw0rdfish"), "{msg}");
    }

    #[test]
    fn unknown_keys_under_an_overridable_table_are_still_errors() {
        let msg = load_error(None, &[("DROVER_POLICY__MAX_CPU", "4")]);
        assert!(
            msg.starts_with("DROVER_POLICY__MAX_CPU: unknown field `max_cpu`"),
            "{msg}"
        );
        let msg = load_error(None, &[("DROVER_DRIVER__ROOTS", "/x")]);
        assert!(
            msg.starts_with("DROVER_DRIVER__ROOTS: unknown field `roots`"),
            "{msg}"
        );
        let (_dir, path) = settings_file("[driver]\nroots = \"/x\"\n");
        let msg = load_error(Some(&path), &[]);
        assert!(
            msg.contains("drover.toml: driver: unknown field `roots`"),
            "{msg}"
        );
    }

    #[test]
    fn a_table_cannot_be_set_by_one_variable() {
        let msg = load_error(None, &[("DROVER_POLICY", "{ max_cpus = 4 }")]);
        assert!(
            msg.starts_with("DROVER_POLICY: a table cannot be set by one variable"),
            "{msg}"
        );
        assert!(!msg.contains("max_cpus = 4"), "{msg}");
        let msg = load_error(None, &[("DROVER_RUNNER_NAME__X", "a")]);
        assert_eq!(
            msg,
            "DROVER_RUNNER_NAME__*: expected a string, found a table"
        );
        let msg = load_error(
            None,
            &[("DROVER_RUNNER_NAME", "a"), ("DROVER_RUNNER_NAME__X", "b")],
        );
        assert_eq!(
            msg,
            "DROVER_RUNNER_NAME__X: `runner_name` is a value, not a table"
        );
    }

    #[test]
    fn a_bad_runner_name_is_not_quoted() {
        let msg = load_error(None, &[("DROVER_RUNNER_NAME", "top secret")]);
        assert!(!msg.contains("top secret"), "{msg}");
    }
}
