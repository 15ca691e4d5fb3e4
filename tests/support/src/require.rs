//! A backend test without its backend. On a developer's machine it skips with one line saying
//! how to set the backend up; where `DROVER_REQUIRE` names the backend (`.ci/run` sets
//! `DROVER_REQUIRE=podman,docker,lxd,libvirt`) it fails, so a broken setup or detection can never turn a
//! suite into silent passes.

use std::io::Write;
use std::path::PathBuf;

use drover_harness::real::{GITLAB_RUNNER_BIN, find_gitlab_runner};

/// Comma-separated backends whose tests must run: `podman`, `docker`, `lxd`, `libvirt`, `ec2`,
/// `gitlab-runner`.
pub const DROVER_REQUIRE: &str = "DROVER_REQUIRE";

/// Whether `DROVER_REQUIRE` names `backend`.
pub fn required(backend: &str) -> bool {
    std::env::var(DROVER_REQUIRE)
        .is_ok_and(|list| list.split(',').any(|name| name.trim() == backend))
}

/// `found`, or — when `backend` is missing (`Err` says why and how to set it up) — `None` after
/// one line saying `test` is skipped; a panic instead when `DROVER_REQUIRE` names `backend`.
pub fn backend<T>(backend: &str, test: &str, found: Result<T, String>) -> Option<T> {
    // Straight to stderr, not `eprintln!`: the test harness captures that and would hide the
    // one line that says a test did not really run.
    skip_or_fail(
        required(backend),
        backend,
        test,
        found,
        &mut std::io::stderr().lock(),
    )
}

fn skip_or_fail<T>(
    required: bool,
    backend: &str,
    test: &str,
    found: Result<T, String>,
    skip_line: &mut impl Write,
) -> Option<T> {
    match found {
        Ok(found) => Some(found),
        Err(why) if required => panic!("{test}: {DROVER_REQUIRE} names {backend}, but {why}"),
        Err(why) => {
            let _ = writeln!(skip_line, "skipped {test}: {why}");
            None
        }
    }
}

/// For a real-runner test: the GitLab Runner binary the `drover` CLI would use
/// (`$GITLAB_RUNNER_BIN`, else `gitlab-runner` on PATH), or `None` after one line (CI has no
/// runner binary; `gitlab-runner` in `DROVER_REQUIRE` makes its absence a failure).
pub fn gitlab_runner(test: &str) -> Option<PathBuf> {
    let found = find_gitlab_runner(None).ok_or_else(|| {
        format!("no GitLab Runner binary (set {GITLAB_RUNNER_BIN} to run the real-runner tests)")
    });
    backend("gitlab-runner", test, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_backend_skips_with_one_line_unless_it_is_required() {
        let mut line = Vec::new();
        assert_eq!(skip_or_fail(false, "lxd", "t", Ok(7), &mut line), Some(7));
        assert_eq!(skip_or_fail(true, "lxd", "t", Ok(7), &mut line), Some(7));
        assert!(line.is_empty());
        let missing = Err("no LXD".to_owned());
        assert_eq!(
            skip_or_fail::<u8>(false, "lxd", "t", missing, &mut line),
            None
        );
        assert_eq!(String::from_utf8_lossy(&line), "skipped t: no LXD\n");
    }

    #[test]
    #[should_panic(expected = "t: DROVER_REQUIRE names lxd, but no LXD")]
    fn a_required_backend_that_is_missing_fails_the_test() {
        skip_or_fail::<u8>(true, "lxd", "t", Err("no LXD".into()), &mut Vec::new());
    }
}
