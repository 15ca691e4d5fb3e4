//! Git repositories for jobs: one on this host served by the fake coordinator as the project's
//! repository, and a way for tests to make one.

use std::ffi::OsStr;
use std::path::Path;

use crate::coordinator::Coordinator;
use crate::payload::Source;

fn git(args: &[&OsStr]) -> Result<String, String> {
    let output = std::process::Command::new("git")
        .args(args)
        .output()
        .map_err(|err| format!("cannot run git: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "git {}: {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Serves the git repository at `checkout` (a work tree or a repository on this host) as the
/// project's repository, so get_sources fetches its current commit like from GitLab: a bare
/// copy in `work_dir`, prepared for git's "dumb" HTTP protocol.
pub fn serve_checkout(
    checkout: &Path,
    work_dir: &Path,
    coordinator: &Coordinator,
    project_path: &str,
) -> Result<Source, String> {
    let dir = checkout.as_os_str();
    let sha = git(&["-C".as_ref(), dir, "rev-parse".as_ref(), "HEAD".as_ref()])?;
    let branch = git(&[
        "-C".as_ref(),
        dir,
        "rev-parse".as_ref(),
        "--abbrev-ref".as_ref(),
        "HEAD".as_ref(),
    ])?;
    let bare = work_dir.join("repository.git");
    git(&[
        "clone".as_ref(),
        "--quiet".as_ref(),
        "--bare".as_ref(),
        dir,
        bare.as_os_str(),
    ])?;
    git(&[
        "-C".as_ref(),
        bare.as_os_str(),
        "update-server-info".as_ref(),
    ])?;
    coordinator.serve_repository(project_path, bare);
    Ok(Source {
        sha,
        git_ref: if branch == "HEAD" {
            "main".into()
        } else {
            branch
        },
    })
}

/// Makes `dir` a repository on branch `main` with one commit holding `files` (name, content).
pub fn commit_files(dir: &Path, files: &[(&str, &str)]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    for (name, content) in files {
        std::fs::write(dir.join(name), content).map_err(|err| format!("{name}: {err}"))?;
    }
    let d = dir.as_os_str();
    git(&[
        "-C".as_ref(),
        d,
        "init".as_ref(),
        "-q".as_ref(),
        "-b".as_ref(),
        "main".as_ref(),
    ])?;
    git(&["-C".as_ref(), d, "add".as_ref(), ".".as_ref()])?;
    git(&[
        "-C".as_ref(),
        d,
        "-c".as_ref(),
        "user.email=ci@example.com".as_ref(),
        "-c".as_ref(),
        "user.name=ci".as_ref(),
        "commit".as_ref(),
        "-qm".as_ref(),
        "first".as_ref(),
    ])?;
    Ok(())
}
