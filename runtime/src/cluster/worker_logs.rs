//! Worker output kept on each node: one file per worker process (its stdout and stderr)
//! in the job's folder, and an index of where in those files each task's output begins
//! and ends and which worker hosts which actor, so that `volley logs --task` or
//! `--actor` can cut out one task's or actor's output. The head asks the nodes
//! ([`super::proto::LogQuery`]) and gathers their answers.
//!
//! The index (`workers.tsv`) is appended to as the agent hands out tasks, so it costs
//! one short write per task and nothing while tasks run. Offsets are the worker file's
//! length at hand-out and at the task's report; workers' standard output is
//! line-buffered, so a task's lines are in the file when it reports.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use volley_common::{Result, ResultExt};

use super::proto::{LogQuery, LogSection};

/// The most bytes of one section sent in one answer (its end).
const MAX_SECTION: u64 = 8 << 20;

/// The most output bytes of one node's answer, and of the head's answer gathering the
/// nodes': well inside a gRPC message's 256 MiB, however many workers wrote.
pub(crate) const MAX_NODE_ANSWER: u64 = 48 << 20;
pub(crate) const MAX_ANSWER: u64 = 160 << 20;

/// Cuts `sections` to at most `most` bytes of output in all: the section holding most
/// keeps its end, halved, until they fit (what is cut counts as skipped, as the head
/// of a section past [`MAX_SECTION`] does).
pub(crate) fn fit(sections: &mut [LogSection], most: u64) {
    let mut total: u64 = sections.iter().map(|s| s.data.len() as u64).sum();
    while total > most {
        let Some(big) = sections.iter_mut().max_by_key(|s| s.data.len()) else {
            return;
        };
        let cut = big.data.len().div_ceil(2);
        big.data.drain(..cut);
        big.skipped += cut as u64;
        total -= cut as u64;
    }
}

const INDEX: &str = "workers.tsv";

/// The output file of `worker` in job folder `dir`.
pub(crate) fn worker_log(dir: &Path, worker: &str) -> PathBuf {
    dir.join(format!("{worker}.log"))
}

/// The last `n` non-empty lines of the file at `path` (at most its last 4 KiB), joined
/// by " / "; empty if it cannot be read.
pub(crate) fn last_lines(path: &Path, n: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut tail = Vec::new();
    let _ = f.read_to_end(&mut tail);
    let text = String::from_utf8_lossy(&tail);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

fn length(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn clean(field: &str) -> String {
    field.replace(['\t', '\n', '\r'], " ")
}

fn append(dir: &Path, fields: &[&str]) {
    let line = fields
        .iter()
        .map(|f| clean(f))
        .collect::<Vec<_>>()
        .join("\t")
        + "\n";
    // Best effort: a log index that cannot be written costs only `volley logs --task`.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(INDEX))
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Notes that `worker` starts task `task` (attempt `attempt`, named `name`).
pub(crate) fn note_task(dir: &Path, task: &str, attempt: u32, name: &str, worker: &str) {
    let at = length(&worker_log(dir, worker));
    append(
        dir,
        &[
            "T",
            task,
            &attempt.to_string(),
            name,
            worker,
            &at.to_string(),
        ],
    );
}

/// Notes that `worker` reported task `task`.
pub(crate) fn note_task_end(dir: &Path, task: &str, attempt: u32, worker: &str) {
    let at = length(&worker_log(dir, worker));
    append(
        dir,
        &["E", task, &attempt.to_string(), worker, &at.to_string()],
    );
}

/// Notes that `worker` hosts incarnation `incarnation` of actor `actor`.
pub(crate) fn note_actor(dir: &Path, actor: &str, incarnation: u32, worker: &str) {
    append(dir, &["A", actor, &incarnation.to_string(), worker]);
}

/// One task attempt as the index has it.
struct TaskRun {
    task: String,
    attempt: String,
    name: String,
    worker: String,
    start: u64,
    end: Option<u64>,
}

/// The sections of job folder `dir` that `query` asks for. `alive` says whether a
/// worker of this node still runs.
pub(crate) fn read_sections(
    dir: &Path,
    node: &str,
    query: &LogQuery,
    alive: &dyn Fn(&str) -> bool,
) -> Result<Vec<LogSection>> {
    let index = std::fs::read_to_string(dir.join(INDEX)).unwrap_or_default();
    let mut runs: Vec<TaskRun> = Vec::new();
    let mut actors: Vec<(String, String, String)> = Vec::new();
    for line in index.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["T", task, attempt, name, worker, start] => runs.push(TaskRun {
                task: task.to_string(),
                attempt: attempt.to_string(),
                name: name.to_string(),
                worker: worker.to_string(),
                start: start.parse().unwrap_or(0),
                end: None,
            }),
            ["E", task, attempt, worker, end] => {
                if let Some(r) = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.task == *task && r.attempt == *attempt && r.worker == *worker)
                {
                    r.end = end.parse().ok();
                }
            }
            ["A", actor, incarnation, worker] => actors.push((
                actor.to_string(),
                incarnation.to_string(),
                worker.to_string(),
            )),
            _ => {}
        }
    }
    let mut out = Vec::new();
    // No task or actor named: every worker's whole output, and for a listing every task
    // and actor too.
    let all = query.task.is_empty() && query.actor_id.is_empty();
    if !query.task.is_empty() || (all && query.list) {
        let q = query.task.as_str();
        for r in runs.iter().filter(|r| {
            q.is_empty()
                || r.task == q
                || r.name == q
                || r.task.rsplit_once(':').is_some_and(|(_, t)| t == q)
        }) {
            let path = worker_log(dir, &r.worker);
            let open = r.end.is_none() && alive(&r.worker);
            let end = r.end.unwrap_or_else(|| length(&path));
            let name = if r.name.is_empty() {
                String::new()
            } else {
                format!("{} ", r.name)
            };
            let title = format!(
                "task {name}{} attempt {} on {node} (worker {})",
                r.task, r.attempt, r.worker
            );
            let seen = query.seen.get(&title).copied();
            out.push(section(&path, title, r.start, end, open, query.list, seen)?);
        }
    }
    if !query.actor_id.is_empty() || (all && query.list) {
        let q = query.actor_id.as_str();
        for (actor, incarnation, worker) in actors.iter().filter(|(a, _, _)| {
            q.is_empty() || a == q || a.rsplit_once(':').is_some_and(|(_, a)| a == q)
        }) {
            let path = worker_log(dir, worker);
            let title =
                format!("actor {actor} incarnation {incarnation} on {node} (worker {worker})");
            let seen = query.seen.get(&title).copied();
            out.push(section(
                &path,
                title,
                0,
                length(&path),
                alive(worker),
                query.list,
                seen,
            )?);
        }
    }
    if all {
        let mut workers: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        let w = name.strip_suffix(".log")?;
                        (w != "driver").then(|| w.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        workers.sort();
        for w in workers {
            let path = worker_log(dir, &w);
            let title = format!("worker {w} on {node}");
            let seen = query.seen.get(&title).copied();
            out.push(section(
                &path,
                title,
                0,
                length(&path),
                alive(&w),
                query.list,
                seen,
            )?);
        }
    }
    Ok(out)
}

/// Bytes `start..end` of `path` (at most the last [`MAX_SECTION`] of them), past the
/// `seen` bytes of the section a follower has (all of them again, marked `restarted`,
/// if the file is shorter than that: it was made anew).
fn section(
    path: &Path,
    title: String,
    start: u64,
    end: u64,
    open: bool,
    list: bool,
    seen: Option<u64>,
) -> Result<LogSection> {
    let end = end.max(start);
    let bytes = end - start;
    let restarted = seen.is_some_and(|s| start.saturating_add(s) > length(path));
    let seen = seen.filter(|_| !restarted);
    let from = if list {
        end
    } else {
        let tail = start.max(end.saturating_sub(MAX_SECTION));
        seen.map_or(tail, |s| tail.max(start.saturating_add(s).min(end)))
    };
    let mut data = vec![0u8; (end - from) as usize];
    if !data.is_empty() {
        let read = |data: &mut Vec<u8>| -> std::io::Result<()> {
            let mut f = std::fs::File::open(path)?;
            f.seek(SeekFrom::Start(from))?;
            let mut n = 0;
            while n < data.len() {
                let r = f.read(&mut data[n..])?;
                if r == 0 {
                    break;
                }
                n += r;
            }
            data.truncate(n);
            Ok(())
        };
        read(&mut data).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(LogSection {
        title,
        data,
        skipped: from - start,
        bytes,
        open,
        restarted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_cut_to_fit_keeping_each_sections_end() {
        let section = |n: usize| LogSection {
            title: format!("{n}"),
            data: (0..n).map(|i| (i % 251) as u8).collect(),
            bytes: n as u64,
            ..Default::default()
        };
        let mut all = vec![section(1000), section(100), section(10)];
        fit(&mut all, 400);
        let sizes: Vec<usize> = all.iter().map(|s| s.data.len()).collect();
        assert!(sizes.iter().sum::<usize>() <= 400, "{sizes:?}");
        assert_eq!(sizes[1..], [100, 10]);
        assert_eq!(all[0].skipped as usize + all[0].data.len(), 1000);
        assert_eq!(*all[0].data.last().unwrap(), (999 % 251) as u8);
    }

    fn write(dir: &Path, worker: &str, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(worker_log(dir, worker))
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn query(task: &str, actor: &str) -> LogQuery {
        LogQuery {
            job_id: "j".into(),
            task: task.into(),
            actor_id: actor.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_follower_gets_only_the_bytes_it_has_not_seen() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "n1-w1", "boot\n");
        note_task(d, "j:t-1", 0, "Slow", "n1-w1");
        write(d, "n1-w1", "one\n");
        let alive = |_: &str| true;
        let first = read_sections(d, "n1", &query("t-1", ""), &alive).unwrap();
        assert_eq!(first[0].data, b"one\n");
        let title = first[0].title.clone();
        write(d, "n1-w1", "two\n");
        let mut q = query("t-1", "");
        q.seen.insert(title.clone(), 4);
        let next = read_sections(d, "n1", &q, &alive).unwrap();
        assert_eq!(next[0].data, b"two\n");
        assert_eq!((next[0].skipped, next[0].bytes), (4, 8));
        q.seen.insert(title, 8);
        let idle = read_sections(d, "n1", &q, &alive).unwrap();
        assert!(idle[0].data.is_empty() && idle[0].skipped == 8 && idle[0].open);
        // A whole worker's section whose file is made anew, shorter: all of it again.
        let mut w = query("", "");
        w.seen.insert("worker n1-w1 on n1".into(), 13);
        let none_new = read_sections(d, "n1", &w, &alive).unwrap();
        assert!(none_new[0].data.is_empty() && !none_new[0].restarted);
        std::fs::File::create(worker_log(d, "n1-w1")).unwrap();
        write(d, "n1-w1", "x\n");
        let again = read_sections(d, "n1", &w, &alive).unwrap();
        assert!(again[0].restarted);
        assert_eq!(
            (again[0].data.as_slice(), again[0].skipped),
            (&b"x\n"[..], 0)
        );
    }

    #[test]
    fn cuts_each_tasks_output_out_of_its_workers_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "n1-w1", "worker starting\n");
        note_task(d, "j:t-1", 0, "Numbers", "n1-w1");
        write(d, "n1-w1", "one\n");
        note_task_end(d, "j:t-1", 0, "n1-w1");
        note_task(d, "j:t-2", 0, "Sum", "n1-w1");
        write(d, "n1-w1", "two\n");
        note_task_end(d, "j:t-2", 0, "n1-w1");
        note_task(d, "j:t-3", 1, "Numbers", "n1-w2");
        write(d, "n1-w2", "three, still running\n");
        note_actor(d, "j:a-1", 0, "n1-w3");
        write(d, "n1-w3", "actor says hi\n");
        let alive = |w: &str| w != "n1-w1";

        let by_id = read_sections(d, "n1", &query("t-2", ""), &alive).unwrap();
        assert_eq!(by_id.len(), 1);
        assert_eq!(by_id[0].data, b"two\n");
        assert!(!by_id[0].open);
        assert!(
            by_id[0].title.contains("Sum j:t-2 attempt 0 on n1"),
            "{}",
            by_id[0].title
        );

        let by_name = read_sections(d, "n1", &query("Numbers", ""), &alive).unwrap();
        let texts: Vec<&[u8]> = by_name.iter().map(|s| s.data.as_slice()).collect();
        assert_eq!(texts, vec![&b"one\n"[..], &b"three, still running\n"[..]]);
        assert_eq!(
            by_name.iter().map(|s| s.open).collect::<Vec<_>>(),
            vec![false, true]
        );

        let actor = read_sections(d, "n1", &query("", "a-1"), &alive).unwrap();
        assert_eq!(actor[0].data, b"actor says hi\n");
        assert!(actor[0].open);

        let all = read_sections(d, "n1", &query("", ""), &alive).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].data, b"worker starting\none\ntwo\n");

        let mut list = query("Numbers", "");
        list.list = true;
        let listed = read_sections(d, "n1", &list, &alive).unwrap();
        assert!(listed.iter().all(|s| s.data.is_empty()));
        assert_eq!(listed[0].bytes, 4);
        assert_eq!(listed.len(), 2);
        let mut everything = query("", "");
        everything.list = true;
        // Three task runs, one actor, three workers.
        assert_eq!(
            read_sections(d, "n1", &everything, &alive).unwrap().len(),
            7
        );
        assert!(read_sections(d, "n1", &query("t-9", ""), &alive)
            .unwrap()
            .is_empty());
    }
}
