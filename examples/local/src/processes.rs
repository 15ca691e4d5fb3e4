//! Which processes belong to a job, so that none outlives the stage that started it.
//!
//! The core kills each command's process group when the command ends (§6.1), but a job's
//! process can leave its group (`setsid`, a daemonizing double fork) and survive it, invisible
//! to the runner's kill too (§6.3). So each stage also tracks the job's processes by something
//! they cannot shed, and kills whatever is left of them when the stage ends:
//!
//! - a cgroup v2 of the job's own ([`crate::cgroup`]) where the driver may create one: every
//!   process a stage starts begins in it, and so does everything that process starts, whatever
//!   its session, group, parent or environment;
//! - else the stage's driver becomes a *child subreaper*: a descendant orphaned by its parent's
//!   exit (the point of a double fork) is re-parented to the driver instead of to init, so all
//!   the processes a stage started stay the driver's descendants, and it kills them all before
//!   it exits.
//!
//! Neither holds against a job that means to get out: a job runs as the driver's user, which
//! may move a process out of the job's cgroup (the driver does it to itself), and can ask a
//! process outside the job to start one (a user's systemd, `at`, a terminal multiplexer's
//! server). A subreaper that is itself SIGKILLed (the runner's force kill, §6.1) kills nothing,
//! and its orphans go to init; only for those, cleanup still kills every process whose
//! environment holds the job's tag variable, which `env -u` sheds.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use drover_core::{Error, JobCommand, Result, progress};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::cgroup::JobCgroup;

/// Every process of a job carries this variable, so that cleanup can still find the ones a
/// SIGKILLed subreaper could not (see the module docs).
pub const JOB_TAG: &str = "DROVER_LOCAL_JOB";

/// How long the end of a stage waits for the job's killed processes to be gone.
const STAGE_KILL_BOUND: Duration = Duration::from_secs(2);

/// How long cleanup tries to empty and remove the job's cgroup.
const CLEANUP_KILL_BOUND: Duration = Duration::from_secs(5);

/// How many times to sweep for tagged processes: one may fork between the read of `/proc` and
/// the kill.
const SWEEPS: usize = 5;

/// The pause between two sweeps for descendants: SIGKILLed processes take a moment to exit.
const SWEEP_PAUSE: Duration = Duration::from_millis(5);

/// How a job's processes are tracked: the `process_tracking` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tracking {
    /// A cgroup of the job's own where the driver can create one, else the subreaper.
    #[default]
    Auto,
    /// A cgroup of the job's own; prepare fails where there can be none.
    Cgroup,
    /// The subreaper, also where a cgroup could be made: e.g. under a systemd unit whose
    /// cgroup was not delegated (`Delegate=yes`), which systemd expects no one else to divide.
    Subreaper,
}

/// One stage's hold on the job's processes: the commands it starts through
/// [`track`](Self::track) are the job's, and when it is dropped (the stage returned, or the
/// core abandoned it after a cancel) every process of the job still alive is killed.
#[derive(Debug)]
pub struct StageProcesses {
    /// The job's cgroup; `None` when the stage's driver is a subreaper instead.
    cgroup: Option<JobCgroup>,
}

impl StageProcesses {
    /// For prepare: creates the job's cgroup (one left by an earlier attempt is reused) or,
    /// where there can be none, makes the driver a subreaper. Says in the job log which.
    pub fn create(job: &str, tracking: Tracking) -> Result<StageProcesses> {
        if tracking == Tracking::Subreaper {
            progress!(
                "Job processes are tracked as descendants of the driver (process_tracking = \"subreaper\")"
            );
            return StageProcesses::subreaper();
        }
        let created = JobCgroup::locate(job).and_then(|cgroup| match cgroup.create() {
            Ok(()) => Ok(cgroup),
            Err(err) => Err(format!("cannot create {}: {err}", cgroup.dir().display())),
        });
        match created {
            Ok(cgroup) => {
                progress!(
                    "Job processes are tracked in cgroup {}",
                    cgroup.dir().display()
                );
                Ok(StageProcesses {
                    cgroup: Some(cgroup),
                })
            }
            Err(why) if tracking == Tracking::Cgroup => Err(Error::system(format!(
                "process_tracking = \"cgroup\", but {why}"
            ))),
            Err(why) => {
                progress!("Job processes are tracked as descendants of the driver: {why}");
                StageProcesses::subreaper()
            }
        }
    }

    /// For run: the cgroup prepare created or, where prepare could create none, the
    /// subreaper.
    pub fn open(job: &str, tracking: Tracking) -> Result<StageProcesses> {
        if tracking == Tracking::Subreaper {
            return StageProcesses::subreaper();
        }
        let usable = JobCgroup::locate(job).and_then(|cgroup| {
            if !cgroup.exists() {
                return Err(format!("{} does not exist", cgroup.dir().display()));
            }
            match cgroup.check() {
                Ok(()) => Ok(cgroup),
                Err(err) => Err(format!("cannot use {}: {err}", cgroup.dir().display())),
            }
        });
        match usable {
            Ok(cgroup) => Ok(StageProcesses {
                cgroup: Some(cgroup),
            }),
            Err(why) if tracking == Tracking::Cgroup => Err(Error::system(format!(
                "process_tracking = \"cgroup\", but {why}"
            ))),
            // Prepare said so in the job log already.
            Err(_) => StageProcesses::subreaper(),
        }
    }

    fn subreaper() -> Result<StageProcesses> {
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|err| Error::system(format!("cannot become a child subreaper: {err}")))?;
        Ok(StageProcesses { cgroup: None })
    }

    /// Makes `command` one of the job's processes: it starts inside the job's cgroup. A
    /// subreaper needs nothing: whatever the driver starts is its descendant.
    pub fn track<'a>(&self, command: &'a mut JobCommand) -> &'a mut JobCommand {
        let Some(cgroup) = &self.cgroup else {
            return command;
        };
        let (enter, leave) = (cgroup.clone(), cgroup.clone());
        command.around_spawn(move || enter.enter(), move || leave.leave())
    }
}

impl Drop for StageProcesses {
    fn drop(&mut self) {
        // Blocking, for at most STAGE_KILL_BOUND, is fine: the stage is over, and the core has
        // nothing else to run on this thread.
        let killed = match &self.cgroup {
            Some(cgroup) => cgroup.kill(STAGE_KILL_BOUND).map_err(|err| err.to_string()),
            None => match kill_descendants(STAGE_KILL_BOUND) {
                0 => Ok(()),
                left => Err(format!("{left} processes did not die of SIGKILL")),
            },
        };
        if let Err(err) = killed {
            progress!(
                "WARNING: processes of the job may outlive the stage ({err}); cleanup kills them"
            );
        }
    }
}

/// For cleanup and gc: kills every process of job `job` that can still be found, its cgroup
/// first, then the tagged ones, and removes its cgroup.
pub fn kill_job(job: &str) -> Result<()> {
    let removed = match JobCgroup::locate(job) {
        Ok(cgroup) => cgroup.remove(CLEANUP_KILL_BOUND).map_err(|err| {
            Error::system(format!("cannot remove {}: {err}", cgroup.dir().display()))
        }),
        // No cgroup2 here, so prepare made none either.
        Err(_) => Ok(()),
    };
    kill_tagged(JOB_TAG, job);
    removed
}

/// SIGKILLs every live descendant of this process, sweeping again until none is left or
/// `bound` has passed, and returns how many were left. Again, because a process may fork
/// between the read of `/proc` and the kill: its child, orphaned by the kill, is re-parented
/// to this subreaper and found by the next sweep.
fn kill_descendants(bound: Duration) -> usize {
    let deadline = Instant::now() + bound;
    loop {
        let descendants = live_descendants();
        if descendants.is_empty() || Instant::now() >= deadline {
            return descendants.len();
        }
        for pid in descendants {
            // ESRCH: it died meanwhile, which is what we want.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(SWEEP_PAUSE);
    }
}

/// The live (not zombie) descendants of this process.
fn live_descendants() -> Vec<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for pid in pids() {
        // A zombie is dead already, and has no children: they were re-parented when it died.
        match parent_and_state(pid) {
            Some((_, 'Z' | 'X')) | None => {}
            Some((parent, _)) => children.entry(parent).or_default().push(pid),
        }
    }
    let mut found = Vec::new();
    let mut next = i32::try_from(std::process::id())
        .into_iter()
        .collect::<Vec<_>>();
    while let Some(pid) = next.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            found.push(child);
            next.push(child);
        }
    }
    found
}

/// The parent and state of `pid`, from `/proc/PID/stat`: `PID (COMM) STATE PPID ...`, where
/// COMM may hold spaces and parentheses, so the fields start after the last `)`.
fn parent_and_state(pid: i32) -> Option<(i32, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, fields) = stat.rsplit_once(')')?;
    let mut fields = fields.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((parent, state))
}

/// SIGKILLs every process whose environment holds `key=value`, except this one.
fn kill_tagged(key: &str, value: &str) {
    let needle = format!("{key}={value}");
    let me = std::process::id();
    for _ in 0..SWEEPS {
        let tagged: Vec<i32> = pids()
            .filter(|&pid| u32::try_from(pid).is_ok_and(|pid| pid != me))
            .filter(|pid| carries(*pid, &needle))
            .collect();
        if tagged.is_empty() {
            return;
        }
        for pid in tagged {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

fn carries(pid: i32, needle: &str) -> bool {
    // Unreadable (another user's, or already gone) means not ours to kill.
    fs::read(format!("/proc/{pid}/environ"))
        .map(|environ| {
            environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes())
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_parent_and_state_past_a_command_with_parentheses() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let (parent, state) = parent_and_state(me).expect("own stat");
        assert_eq!(
            parent,
            i32::try_from(std::os::unix::process::parent_id()).expect("ppid")
        );
        assert!(state.is_ascii_uppercase(), "{state}");
    }

    #[test]
    fn tracking_names_are_lowercase() {
        let tracking: Tracking = serde_json::from_str("\"subreaper\"").expect("parse");
        assert_eq!(tracking, Tracking::Subreaper);
    }
}
