//! The host side of a project's cache (§8): a directory per runner and project, that survives
//! the job's environment and that no other project's or runner's job reaches.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{Job, Result, ResultExt};

/// The cache directory of `job`'s project on this runner, `<root>/<runner>/p<project>`, named
/// from the trusted identity (§3.4), made if missing and private (0700, as is its runner's
/// directory). Mount it into the job's environment; [`hand_over`] it to the user the job runs
/// as.
pub fn project_dir(root: &Path, job: &Job) -> Result<PathBuf> {
    let runner_dir = root.join(job.names().runner());
    let dir = runner_dir.join(format!("p{}", job.identity().project_id));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .or_system(format_args!(
            "cannot create the cache dir {}",
            dir.display()
        ))?;
    for private in [&runner_dir, &dir] {
        std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o700))
            .or_system(format_args!("cannot set the mode of {}", private.display()))?;
    }
    Ok(dir)
}

/// Makes the cache directory `dir` the host user `uid`:`gid`'s, the one the job runs as (an
/// unprivileged container's root is an ordinary user on the host).
pub fn hand_over(dir: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    let current = std::fs::symlink_metadata(dir).or_system(dir.display())?;
    if (current.uid(), current.gid()) == (uid, gid) {
        return Ok(());
    }
    // The entry itself is the driver's: a job can change what is inside the directory (the
    // root of its mount), never the entry, and lchown never follows a symlink anyway.
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).or_system(format_args!(
        "cannot hand {} to the job's user",
        dir.display()
    ))
}
