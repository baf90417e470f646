//! A write whose task attempt was superseded (its node declared dead while it still
//! ran) must leave nothing at the destination, even when it goes on writing after the
//! commit: only the attempts the commit is given are moved into place.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt};
use volley_connectors::{RemotePart, StagedPart, WriteFormat, WriteJob, WriteOptions};

fn batch(start: i64, n: i64, city: &str) -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "x",
            Arc::new(Int64Array::from_iter_values(start..start + n)) as ArrayRef,
        ),
        (
            "city",
            Arc::new(StringArray::from(vec![city; n as usize])) as ArrayRef,
        ),
    ])
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs attempt `attempt` (its run's name) of `part` on a thread: it writes `first`, then waits until
/// told to go on, then writes `rest`. Returns the signal and the attempt's outcome.
fn slow_attempt(
    part: RemotePart,
    registry: Arc<dyn ObjectStoreRegistry>,
    scratch: std::path::PathBuf,
    attempt: &'static str,
    io: tokio::runtime::Handle,
    first: RecordBatch,
    rest: Vec<RecordBatch>,
) -> (
    mpsc::Sender<()>,
    mpsc::Receiver<()>,
    std::thread::JoinHandle<volley_common::Result<StagedPart>>,
) {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        let mut first = Some(first);
        let mut rest = rest.into_iter();
        let mut waited = false;
        let batches = std::iter::from_fn(move || {
            if let Some(b) = first.take() {
                return Some(Ok(b));
            }
            if !waited {
                // After the first batch: say so, and wait to be let go.
                waited = true;
                let _ = started_tx.send(());
                let _ = go_rx.recv();
            }
            rest.next().map(Ok)
        });
        part.write(batches, registry.as_ref(), &scratch, "00000", attempt, io)
    });
    (go_tx, started_rx, handle)
}

fn local_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push(e.strip_prefix(dir).unwrap().to_string_lossy().to_string());
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_superseded_attempt_leaves_nothing_in_a_local_destination() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let registry: Arc<dyn ObjectStoreRegistry> = Arc::new(DefaultObjectStoreRegistry::new());
    let mut options = WriteOptions::new(WriteFormat::Parquet);
    options.partition_by = vec!["city".into()];
    let job = WriteJob::try_new(
        dest.to_str().unwrap(),
        options,
        registry.as_ref(),
        Some(dir.path()),
        rt.handle().clone(),
    )
    .unwrap();
    let (part0, part1) = (job.remote_part(), job.remote_part());

    // Attempt 0 of part 0 starts, writes one batch, then is cut off (its node is
    // declared dead); attempt 1 of part 0 takes over and finishes, as does part 1.
    let (go, started, stale) = slow_attempt(
        part0.clone(),
        Arc::clone(&registry),
        dir.path().to_path_buf(),
        "0",
        rt.handle().clone(),
        batch(0, 100, "paris"),
        vec![batch(100, 100, "paris"), batch(200, 100, "lyon")],
    );
    started.recv().unwrap();
    let scratch = dir.path();
    let io = rt.handle().clone();
    let a1 = part0
        .write(
            vec![Ok(batch(0, 300, "paris"))].into_iter(),
            registry.as_ref(),
            scratch,
            "00000",
            "1",
            io.clone(),
        )
        .unwrap();
    let b0 = part1
        .write(
            vec![Ok(batch(300, 50, "nice"))].into_iter(),
            registry.as_ref(),
            scratch,
            "00001",
            "0",
            io.clone(),
        )
        .unwrap();
    let summary = job.commit(vec![a1.clone(), b0.clone()]).unwrap();
    assert_eq!(summary.rows, 350);
    let committed = local_files(&dest);
    assert_eq!(
        committed, summary.files,
        "exactly the accepted attempts' files"
    );

    // The superseded attempt goes on after the commit: it writes more rows and opens a
    // new partition folder. It must fail, and nothing of it may appear anywhere.
    go.send(()).unwrap();
    let outcome = stale.join().unwrap();
    assert!(
        outcome.is_err(),
        "a late attempt cannot stage after the commit: {outcome:?}"
    );
    part0
        .discard(registry.as_ref(), "00000", "0", io.clone())
        .unwrap();
    assert_eq!(
        local_files(&dest),
        committed,
        "the destination is unchanged"
    );
    let siblings: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n != "out")
        .collect();
    assert!(
        siblings.iter().all(|n| !n.contains("volley-staging")),
        "no staging left beside the destination: {siblings:?}"
    );
}

#[test]
fn a_superseded_attempt_leaves_nothing_in_an_object_store_destination() {
    let rt = runtime();
    let scratch = tempfile::tempdir().unwrap();
    let registry = Arc::new(DefaultObjectStoreRegistry::new());
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let url = url::Url::parse("memory://bucket/").unwrap();
    registry.register_store(&url, Arc::clone(&store));
    let registry: Arc<dyn ObjectStoreRegistry> = registry;
    let io = rt.handle().clone();
    let job = WriteJob::try_new(
        "memory://bucket/data/out",
        WriteOptions::new(WriteFormat::Parquet),
        registry.as_ref(),
        Some(scratch.path()),
        io.clone(),
    )
    .unwrap();
    let part0 = job.remote_part();
    let (go, started, stale) = slow_attempt(
        part0.clone(),
        Arc::clone(&registry),
        scratch.path().to_path_buf(),
        "0",
        io.clone(),
        batch(0, 100, "paris"),
        vec![batch(100, 100, "paris")],
    );
    started.recv().unwrap();
    let a1 = part0
        .write(
            vec![Ok(batch(0, 200, "paris"))].into_iter(),
            registry.as_ref(),
            scratch.path(),
            "00000",
            "1",
            io.clone(),
        )
        .unwrap();
    let summary = job.commit(vec![a1]).unwrap();
    let list = |prefix: &str| -> Vec<String> {
        let store = Arc::clone(&store);
        let prefix = object_store::path::Path::from(prefix);
        let mut v: Vec<String> = rt
            .block_on(async move {
                store
                    .list(Some(&prefix))
                    .map_ok(|m| m.location.to_string())
                    .try_collect::<Vec<_>>()
                    .await
            })
            .unwrap();
        v.sort();
        v
    };
    let committed = list("data/out");
    assert_eq!(
        committed,
        summary
            .files
            .iter()
            .map(|f| format!("data/out/{f}"))
            .collect::<Vec<_>>()
    );
    // The late attempt goes on after the commit: it finds the staging's marker gone
    // and fails without uploading (nothing in staging for it to clean up, even if it
    // never learns it was superseded).
    go.send(()).unwrap();
    let late = stale.join().unwrap();
    let e = late.unwrap_err().to_string();
    assert!(e.contains("staging") && e.contains("is gone"), "{e}");
    assert_eq!(list(""), committed, "nothing else anywhere in the bucket");
}

/// Two runs of one attempt number (a head that restarted numbers a task's attempts
/// from 0 again while a node still runs the old attempt 0) stage apart: the old run
/// does not clobber the accepted one's files, and a run never reuses a folder.
#[test]
fn runs_of_one_attempt_number_stage_apart() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let registry: Arc<dyn ObjectStoreRegistry> = Arc::new(DefaultObjectStoreRegistry::new());
    let job = WriteJob::try_new(
        dest.to_str().unwrap(),
        WriteOptions::new(WriteFormat::Parquet),
        registry.as_ref(),
        Some(dir.path()),
        rt.handle().clone(),
    )
    .unwrap();
    let part = job.remote_part();
    let io = rt.handle().clone();
    let (go, started, old) = slow_attempt(
        part.clone(),
        Arc::clone(&registry),
        dir.path().to_path_buf(),
        "0-node-1-100",
        io.clone(),
        batch(0, 100, "paris"),
        vec![batch(100, 100, "paris")],
    );
    started.recv().unwrap();
    let new = part
        .write(
            vec![Ok(batch(0, 200, "lyon"))].into_iter(),
            registry.as_ref(),
            dir.path(),
            "00000",
            "0-node-2-200",
            io.clone(),
        )
        .unwrap();
    // A run whose folder exists is refused, not let into it.
    let again = part.write(
        vec![Ok(batch(0, 1, "nice"))].into_iter(),
        registry.as_ref(),
        dir.path(),
        "00000",
        "0-node-2-200",
        io.clone(),
    );
    assert!(
        again.unwrap_err().to_string().contains("exists already"),
        "a second run in one folder"
    );
    // The old run finishes its file before the commit; only the accepted run is moved.
    go.send(()).unwrap();
    let old = old.join().unwrap().unwrap();
    assert_eq!(
        old.summary.rows, 200,
        "the old run wrote its own file whole"
    );
    let summary = job.commit(vec![new.clone()]).unwrap();
    assert_eq!(summary.rows, 200);
    assert_eq!(local_files(&dest), new.summary.files);
}

/// A write that refuses an existing destination looks again when it commits: what
/// another writer put there meanwhile is neither replaced nor joined.
#[test]
fn a_destination_written_meanwhile_is_left_to_its_writer() {
    let rt = runtime();
    let io = rt.handle().clone();
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStoreRegistry> = Arc::new(DefaultObjectStoreRegistry::new());
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let memory = Arc::new(DefaultObjectStoreRegistry::new());
    memory.register_store(
        &url::Url::parse("memory://bucket/").unwrap(),
        Arc::clone(&store),
    );
    let memory: Arc<dyn ObjectStoreRegistry> = memory;
    // (destination, single file, what the other writer puts there, where)
    let folder = dir.path().join("folder");
    let file = dir.path().join("one.csv");
    let cases: Vec<(String, bool, Box<dyn Fn()>, &Arc<dyn ObjectStoreRegistry>)> = vec![
        (
            folder.to_str().unwrap().to_string(),
            false,
            Box::new(|| {
                std::fs::create_dir(&folder).unwrap();
                std::fs::write(folder.join("theirs.csv"), "x\n1\n").unwrap();
            }),
            &local,
        ),
        (
            file.to_str().unwrap().to_string(),
            true,
            Box::new(|| std::fs::write(&file, "x\n1\n").unwrap()),
            &local,
        ),
        (
            "memory://bucket/data/out".to_string(),
            false,
            Box::new(|| {
                let store = Arc::clone(&store);
                rt.block_on(async move {
                    let at = object_store::path::Path::from("data/out/theirs.csv");
                    store.put(&at, "x\n1\n".into()).await.unwrap();
                });
            }),
            &memory,
        ),
    ];
    for (dest, single, other_writer, registry) in cases {
        let mut options = WriteOptions::new(WriteFormat::Csv);
        options.single_file = single;
        let job = WriteJob::try_new(
            &dest,
            options,
            registry.as_ref(),
            Some(dir.path()),
            io.clone(),
        )
        .unwrap();
        let part = job
            .remote_part()
            .write(
                vec![Ok(batch(0, 10, "paris"))].into_iter(),
                registry.as_ref(),
                dir.path(),
                "00000",
                "0",
                io.clone(),
            )
            .unwrap();
        other_writer();
        let e = job.commit(vec![part]).unwrap_err().to_string();
        assert!(e.contains("written meanwhile"), "{dest}: {e}");
    }
    assert_eq!(local_files(&folder), ["theirs.csv"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x\n1\n");
    let listed: Vec<String> = rt
        .block_on(async {
            store
                .list(None)
                .map_ok(|m| m.location.to_string())
                .try_collect::<Vec<_>>()
                .await
        })
        .unwrap();
    assert_eq!(listed, ["data/out/theirs.csv"]);
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("volley"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
