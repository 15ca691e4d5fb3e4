//! Finding a job's processes by a tag in their environment.
//!
//! The core kills each stage's process group when the stage ends, but a process can leave its
//! group (`setsid`, a daemonizing double fork) and survive it, invisible to the runner's kill
//! too (§6.3). Every process of a job inherits the tag variable, so cleanup finds them all.

use std::fs;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often to sweep: a process may fork between the read of `/proc` and the kill.
const SWEEPS: usize = 5;

/// SIGKILLs every process whose environment holds `key=value`, except this one.
pub fn kill_tagged(key: &str, value: &str) {
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
