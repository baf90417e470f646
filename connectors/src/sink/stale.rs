//! Staging folders left by writes whose process died.
//!
//! A write that ends, well or badly, removes its staging folder; a process killed
//! mid-write (`kill -9`, a job stopped by `volley stop`) cannot, and its hidden
//! `.NAME.volley-staging-ID` sibling of the destination stays. Each local staging folder
//! therefore holds an `owner` file naming the process that made it: its host, the
//! kernel's boot and the process-id namespace it ran in (two containers may share a
//! host name and a volume, each with its own process ids), its process id, and the
//! process's start time (so that a reused id is not taken for it). A later write to the
//! same destination removes the staging folders of this user whose owner ran in this
//! boot and namespace and is gone. Folders of other hosts (a shared file system),
//! users, namespaces or boots, of live processes, and without an owner file (one being
//! made right now) are left alone. A folder is renamed out of the way before it is
//! removed, so that a removal cut short is finished by the next write. Object-store
//! staging is not cleaned this way: there is no process to ask about.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The file in a staging folder that names its owner.
const OWNER_FILE: &str = "owner";

/// What a staging folder of a dead owner is renamed to before it is removed.
const ABANDONED: &str = "volley-abandoned-";

/// Where a process runs, as an owner file holds it: `host boot-id pid-namespace`.
fn this_place() -> Option<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!(
        "{} {} {}",
        host.trim(),
        boot.trim(),
        namespace.to_string_lossy()
    ))
}

/// When process `pid` started (clock ticks after boot: field 22 of `/proc/PID/stat`);
/// `Err` where the process does not exist.
fn start_time(pid: u32) -> std::io::Result<Option<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = stat.rfind(')').map(|at| &stat[at + 1..]).unwrap_or("");
    Ok(rest.split_whitespace().nth(19).and_then(|t| t.parse().ok()))
}

/// Marks `staging` (just made) as this process's.
pub(super) fn mark(staging: &Path) {
    let pid = std::process::id();
    let (Some(place), Ok(Some(started))) = (this_place(), start_time(pid)) else {
        return;
    };
    // Written whole under another name, then renamed: a reader never sees half.
    let partial = staging.join(format!(".{OWNER_FILE}"));
    if std::fs::write(&partial, format!("{place} {pid} {started}")).is_ok() {
        let _ = std::fs::rename(&partial, staging.join(OWNER_FILE));
    }
}

/// Whether the owner file `owner` (`host boot-id pid-namespace pid start-time`) names
/// a process of `place` that no longer runs.
fn owner_is_gone(owner: &str, place: &str) -> bool {
    let fields: Vec<&str> = owner.split_whitespace().collect();
    let [host, boot, namespace, pid, started] = fields[..] else {
        return false;
    };
    let (Ok(pid), Ok(started)) = (pid.parse::<u32>(), started.parse::<u64>()) else {
        return false;
    };
    if format!("{host} {boot} {namespace}") != place {
        return false;
    }
    match start_time(pid) {
        // Another process has the id now.
        Ok(Some(now)) => now != started,
        Ok(None) => false,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Removes the staging folders of `name` in `parent` whose owner ran on this host, in
/// this boot and process-id namespace, as this user, and no longer runs. Best effort:
/// what cannot be read or removed stays.
pub(super) fn remove_abandoned(parent: &Path, name: &str) {
    let Some(place) = this_place() else {
        return;
    };
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return;
    };
    let staging = format!(".{name}.volley-staging-");
    let abandoned = format!(".{name}.{ABANDONED}");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().to_string();
        let folder = entry.path();
        let mine = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !mine {
            continue;
        }
        if file_name.starts_with(&abandoned) {
            // A removal cut short.
            let _ = std::fs::remove_dir_all(&folder);
            continue;
        }
        let Some(id) = file_name.strip_prefix(&staging) else {
            continue;
        };
        let Ok(owner) = std::fs::read_to_string(folder.join(OWNER_FILE)) else {
            continue;
        };
        if owner_is_gone(&owner, &place) {
            let out_of_the_way = parent.join(format!("{abandoned}{id}"));
            if std::fs::rename(&folder, &out_of_the_way).is_ok() {
                let _ = std::fs::remove_dir_all(&out_of_the_way);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_of_gone_processes_here_are_removed() {
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
        assert!(live.join(OWNER_FILE).exists());
        let place = this_place().unwrap();
        let me = std::process::id();
        // This process's id, started at another time: a process that ran once.
        let gone = folder("gone", Some(format!("{place} {me} 1")));
        // Another boot, namespace or host: not this process's to judge.
        let elsewhere = folder("elsewhere", Some(format!("{place}-other {me} 1")));
        let unmarked = folder("unmarked", None);
        let cut_short = dir.path().join(format!(".out.{ABANDONED}x"));
        std::fs::create_dir(&cut_short).unwrap();
        let other_dest = dir.path().join(".other.volley-staging-x");
        std::fs::create_dir(&other_dest).unwrap();
        std::fs::write(other_dest.join(OWNER_FILE), format!("{place} {me} 1")).unwrap();

        remove_abandoned(dir.path(), "out");
        assert!(live.exists(), "this process's own staging was removed");
        assert!(!gone.exists(), "a dead process's staging was kept");
        assert!(!cut_short.exists(), "a removal cut short was not finished");
        assert!(elsewhere.exists(), "another place's staging was removed");
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
