//! A cgroup v2 per job: the one record of a job's processes that no process can leave by
//! forking, changing session or dropping a variable.
//!
//! The job's cgroup is a child of the driver's own (which is the runner's: every stage's
//! driver starts where the runner is), named after the job, so every stage finds it again
//! from the job's trusted name alone. It needs no controllers: `cgroup.procs` and `cgroup.kill`
//! (Linux 5.14) work without any, which is what lets it also work on a "hybrid" host, whose
//! cgroup2 hierarchy (`/sys/fs/cgroup/unified`) has none.
//!
//! A process is moved by writing its pid into a cgroup's `cgroup.procs`, which moves all of its
//! threads, and a child starts in its parent's cgroup. So the driver moves *itself* in just
//! before it starts a job process and back right after ([`JobCgroup::enter`],
//! [`JobCgroup::leave`]): the process begins inside, with no moment in which it could fork
//! outside. Moving needs write access to the `cgroup.procs` of both cgroups' common ancestor,
//! here the driver's own cgroup: root has it, another user only where that cgroup was delegated
//! to them (systemd's `Delegate=yes`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often to look whether a killed cgroup has emptied.
const POLL: Duration = Duration::from_millis(10);

/// The cgroup of one job; it may or may not exist yet.
#[derive(Debug, Clone)]
pub struct JobCgroup {
    /// The job's cgroup directory.
    dir: PathBuf,
    /// The driver's own cgroup directory, where the driver returns after a spawn.
    parent: PathBuf,
    /// The job's cgroup as `/proc/self/cgroup` names it, to tell whether the driver is in it.
    name: String,
}

impl JobCgroup {
    /// Where the cgroup of job `job` is, below this driver's own cgroup. The error says why
    /// there is none to use (no cgroup2 mount, a process outside the mounted hierarchy).
    pub fn locate(job: &str) -> Result<JobCgroup, String> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|err| format!("cannot read /proc/self/cgroup: {err}"))?;
        // The cgroup v2 line is `0::PATH`; v1 hierarchies have a non-zero id.
        let own = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or("this process is in no cgroup v2 hierarchy")?;
        let mounts = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|err| format!("cannot read /proc/self/mountinfo: {err}"))?;
        let parent = mounts
            .lines()
            .filter_map(cgroup2_mount)
            .find_map(|(root, mount)| {
                // A mount may show only a subtree (`root`) of the hierarchy.
                Path::new(own)
                    .strip_prefix(&root)
                    .ok()
                    .map(|below| mount.join(below))
            })
            .ok_or("no cgroup2 hierarchy holding this process is mounted")?;
        Ok(JobCgroup {
            dir: parent.join(job),
            parent,
            name: format!("{}/{job}", own.trim_end_matches('/')),
        })
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether it exists.
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// Creates it, unless it exists, and checks that the driver can use it. On error nothing is
    /// left behind that this call made.
    pub fn create(&self) -> io::Result<()> {
        let created = match fs::create_dir(&self.dir) {
            Ok(()) => true,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => false,
            Err(err) => return Err(err),
        };
        let usable = self.check();
        if usable.is_err() && created {
            let _ = fs::remove_dir(&self.dir);
        }
        usable
    }

    /// Checks that the driver can move in and out and that the kernel can kill the cgroup as
    /// a whole, so a stage never finds out only when its script is about to start.
    pub fn check(&self) -> io::Result<()> {
        if !self.dir.join("cgroup.kill").exists() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel has no cgroup.kill (Linux 5.14 or later has)",
            ));
        }
        self.enter()?;
        self.leave()
    }

    /// Moves the driver, all its threads, into the job's cgroup: what it starts now begins
    /// there.
    pub fn enter(&self) -> io::Result<()> {
        move_driver(&self.dir)
    }

    /// Moves the driver back into its own cgroup.
    pub fn leave(&self) -> io::Result<()> {
        move_driver(&self.parent)
    }

    /// Kills every process in the cgroup and waits up to `bound` for it to empty. Never kills
    /// the driver: should it still be inside (a failed [`leave`](Self::leave)), it leaves
    /// first, or gives up with an error, and the cleanup's driver kills them instead.
    pub fn kill(&self, bound: Duration) -> io::Result<()> {
        if self.holds_driver() {
            self.leave()?;
        }
        match fs::write(self.dir.join("cgroup.kill"), "1") {
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        }
        let deadline = Instant::now() + bound;
        while self.populated()? {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "processes in {} are still alive {} s after SIGKILL",
                        self.dir.display(),
                        bound.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Kills everything in the cgroup and removes it (with any cgroups a job made inside it),
    /// trying for up to `bound`. Nothing to remove is success.
    pub fn remove(&self, bound: Duration) -> io::Result<()> {
        if !self.exists() {
            return Ok(());
        }
        self.kill(bound)?;
        let deadline = Instant::now() + bound;
        loop {
            match remove_tree(&self.dir) {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
                // A process can still be on its way out, or a stage can be starting one.
                Err(_) if Instant::now() < deadline => {
                    let _ = self.kill(POLL);
                    std::thread::sleep(POLL);
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Whether a live process is in the cgroup or in one below it.
    fn populated(&self) -> io::Result<bool> {
        match fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(events) => Ok(events.lines().any(|line| line == "populated 1")),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn holds_driver(&self) -> bool {
        fs::read_to_string("/proc/self/cgroup").is_ok_and(|own| {
            own.lines()
                .any(|line| line.strip_prefix("0::") == Some(self.name.as_str()))
        })
    }
}

/// Writes the driver's pid into `cgroup/cgroup.procs`, which moves the whole process.
fn move_driver(cgroup: &Path) -> io::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", procs.display())))
}

/// Removes a cgroup and the cgroups below it, deepest first: `rmdir` is the only way to
/// remove one, and it refuses a cgroup that still has children.
fn remove_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// `(root, mount point)` of a cgroup2 mount, from one line of `/proc/self/mountinfo`:
/// `ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER-OPTIONS`.
fn cgroup2_mount(line: &str) -> Option<(PathBuf, PathBuf)> {
    let (mount, fs) = line.split_once(" - ")?;
    if fs.split(' ').next() != Some("cgroup2") {
        return None;
    }
    let mut fields = mount.split(' ').skip(3);
    let root = unescape(fields.next()?);
    let point = unescape(fields.next()?);
    Some((root, point))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for a backslash).
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts_only() {
        assert_eq!(
            cgroup2_mount(
                "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw"
            ),
            Some(("/".into(), "/sys/fs/cgroup/unified".into()))
        );
        assert_eq!(
            cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu"),
            None
        );
        assert_eq!(
            cgroup2_mount("50 1 0:40 /a\\040b /mnt/c\\134g rw - cgroup2 none rw"),
            Some(("/a b".into(), "/mnt/c\\g".into()))
        );
    }
}
