//! Staging folders left by writes whose process died.
//!
//! A write that ends, well or badly, removes its staging folder; a process killed
//! mid-write (`kill -9`, a job stopped by `volley stop`) cannot, and its hidden
//! `.NAME.volley-staging-ID` sibling of the destination stays. Each local staging folder
//! therefore holds an `owner` file naming the process that made it (host, process id
//! and the process's start time, so that a reused id is not taken for it), and a later
//! write to the same destination removes the staging folders whose owner ran on this
//! host and is gone. Folders of other hosts (a shared file system), of live processes,
//! and without an owner file (one being made right now) are left alone. Object-store
//! staging is not cleaned this way: there is no process to ask about.

use std::path::Path;

/// The file in a staging folder that names its owner.
const OWNER_FILE: &str = "owner";

/// This process as an owner file holds it: `host pid start-time`; `None` where the
/// system does not say (not Linux).
fn this_process() -> Option<String> {
    let pid = std::process::id();
    Some(format!("{} {pid} {}", host()?, start_time(pid)?))
}

fn host() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_string())
}

/// When process `pid` started (clock ticks after boot: field 22 of `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Marks `staging` (just made) as this process's.
pub(super) fn mark(staging: &Path) {
    if let Some(owner) = this_process() {
        // Written whole under another name, then renamed: a reader never sees half.
        let partial = staging.join(format!(".{OWNER_FILE}"));
        if std::fs::write(&partial, owner).is_ok() {
            let _ = std::fs::rename(&partial, staging.join(OWNER_FILE));
        }
    }
}

/// Removes the staging folders of `name` in `parent` whose owner ran on this host and
/// no longer runs. Best effort: what cannot be read or removed stays.
pub(super) fn remove_abandoned(parent: &Path, name: &str) {
    let Some(host) = host() else {
        return;
    };
    let prefix = format!(".{name}.volley-staging-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let folder = entry.path();
        let Ok(owner) = std::fs::read_to_string(folder.join(OWNER_FILE)) else {
            continue;
        };
        let mut fields = owner.split_whitespace();
        let (Some(h), Some(pid), Some(started)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(pid), Ok(started)) = (pid.parse::<u32>(), started.parse::<u64>()) else {
            continue;
        };
        if h == host && start_time(pid) != Some(started) {
            let _ = std::fs::remove_dir_all(&folder);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_of_gone_processes_on_this_host_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let folder = |id: &str, owner: Option<String>| {
            let f = dir.path().join(format!(".out.volley-staging-{id}"));
            std::fs::create_dir(&f).unwrap();
            std::fs::write(f.join("part-0.parquet"), b"x").unwrap();
            if let Some(o) = owner {
                std::fs::write(f.join(OWNER_FILE), o).unwrap();
            }
            f
        };
        let live = folder("live", None);
        mark(&live);
        let h = host().unwrap();
        // A process id that ran once: this one, with another start time.
        let gone = folder("gone", Some(format!("{h} {} 1", std::process::id())));
        let elsewhere = folder("elsewhere", Some(format!("{h}-other 999999 1")));
        let unmarked = folder("unmarked", None);
        let other_dest = dir.path().join(".other.volley-staging-x");
        std::fs::create_dir(&other_dest).unwrap();
        std::fs::write(other_dest.join(OWNER_FILE), format!("{h} 999999 1")).unwrap();

        remove_abandoned(dir.path(), "out");
        assert!(live.exists(), "this process's own staging was removed");
        assert!(!gone.exists(), "a dead process's staging was kept");
        assert!(elsewhere.exists(), "another host's staging was removed");
        assert!(
            unmarked.exists(),
            "a staging folder without an owner was removed"
        );
        assert!(
            other_dest.exists(),
            "another destination's staging was removed"
        );
    }
}
