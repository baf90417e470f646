//! Hostile files through every path that reads them: `volley sql` with a quoted path and
//! with `--table`, SQL inside a program, and the Dataset API. Each case must fail (a
//! non-zero exit or an `Err`) with the file's name in the message, never panic, and
//! leave nothing at the output.

use std::path::{Path, PathBuf};
use std::process::Command;

use volley::prelude::*;

use crate::common::*;

/// A corrupt or misleading file, and what else its error must say.
struct Case {
    name: &'static str,
    path: PathBuf,
    /// Other words the message must hold (both files and types for a clash).
    also: Vec<String>,
}

/// Writes the corpus into `dir`.
fn corpus(dir: &Path) -> Vec<Case> {
    let c = ctx();
    let good = dir.join("good.parquet");
    c.from_batches(vec![sample(20_000)])
        .unwrap()
        .write_parquet_file(&good)
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let mut cases = Vec::new();
    let mut add = |name: &'static str, file: &str, data: Vec<u8>, also: Vec<String>| {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, data).unwrap();
        cases.push(Case { name, path, also });
    };
    add(
        "truncated Parquet",
        "truncated.parquet",
        bytes[..bytes.len() / 2].to_vec(),
        vec![],
    );
    let mut magic = bytes.clone();
    let n = magic.len();
    magic[n - 4..].copy_from_slice(b"XXXX");
    add("bad magic", "badmagic.parquet", magic, vec![]);
    add(
        "not Parquet at all",
        "text.parquet",
        b"hello, this is not parquet\n".repeat(10),
        vec![],
    );
    add("zero bytes", "empty.parquet", vec![], vec!["empty".into()]);
    // Corrupt Snappy pages behind a valid footer: found while decoding.
    let mut pages = bytes.clone();
    for i in (100..bytes.len() / 2).step_by(7) {
        pages[i] = 0x5a;
    }
    add("corrupt pages", "pages.parquet", pages, vec![]);
    let mut csv = String::from("id,name\n");
    for i in 0..5000 {
        csv.push_str(&format!("{i},n{i}\n"));
    }
    csv.push_str("abc,late\n");
    add(
        "text in an integer column",
        "mistyped.csv",
        csv.into_bytes(),
        vec!["abc".into()],
    );
    add(
        "bad JSON",
        "bad.json",
        b"{\"a\": 1}\n{\"a\": 2\n{\"a\": 3}\n".to_vec(),
        vec![],
    );
    let mut late_json = String::new();
    for i in 0..3000 {
        late_json.push_str(&format!("{{\"a\": {i}}}\n"));
    }
    late_json.push_str("{\"a\": \n");
    add(
        "bad JSON after the rows types are read from",
        "late.json",
        late_json.into_bytes(),
        vec![],
    );
    // Two files of one folder whose `id` columns clash.
    let clash = dir.join("clash");
    std::fs::create_dir_all(&clash).unwrap();
    c.range(10)
        .write_parquet_file(&clash.join("a.parquet"))
        .unwrap();
    c.range(10)
        .with_column(
            "id",
            volley::datafusion::prelude::cast(col("id"), volley::arrow::datatypes::DataType::Utf8),
        )
        .unwrap()
        .write_parquet_file(&clash.join("b.parquet"))
        .unwrap();
    cases.push(Case {
        name: "clashing schemas",
        path: clash.clone(),
        also: vec![
            clash.join("a.parquet").display().to_string(),
            clash.join("b.parquet").display().to_string(),
            "Int64".into(),
            "Utf8".into(),
        ],
    });
    cases
}

trait WriteFile {
    fn write_parquet_file(&self, path: &Path) -> volley::Result<()>;
}

impl WriteFile for Dataset {
    /// One Parquet file at `path`.
    fn write_parquet_file(&self, path: &Path) -> volley::Result<()> {
        self.write(path.to_str().unwrap(), volley::WriteFormat::Parquet)
            .single_file()
            .run()
            .map(|_| ())
    }
}

/// The name an error must carry: the file, or for a folder of clashing files, the
/// folder's files (checked through `also`).
fn must_name(case: &Case) -> String {
    case.path.display().to_string()
}

fn check_message(case: &Case, how: &str, message: &str) {
    assert!(
        !message.contains("panicked") && !message.contains("RUST_BACKTRACE"),
        "{} via {how}: a panic: {message}",
        case.name
    );
    assert!(
        message.contains(&must_name(case)),
        "{} via {how}: the message does not name {}: {message}",
        case.name,
        must_name(case)
    );
    for w in &case.also {
        assert!(
            message.contains(w.as_str()),
            "{} via {how}: the message lacks `{w}`: {message}",
            case.name
        );
    }
}

/// Nothing at `out`, and no staging left beside it.
fn nothing_written(case: &Case, how: &str, out: &Path) {
    assert!(
        !out.exists(),
        "{} via {how}: {} was written",
        case.name,
        out.display()
    );
    let litter: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("volley-staging"))
        .collect();
    assert!(litter.is_empty(), "{} via {how}: {litter:?}", case.name);
}

#[test]
fn hostile_files_on_the_sql_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_volley");
    for (i, case) in corpus(dir.path()).iter().enumerate() {
        let file = case.path.display().to_string();
        let quoted = if case.path.is_dir() {
            format!("{file}/")
        } else {
            file.clone()
        };
        let runs = [
            (
                "a quoted path",
                vec![
                    "sql".to_string(),
                    format!("SELECT * FROM '{quoted}'"),
                    "--output".into(),
                ],
            ),
            (
                "--table",
                vec![
                    "sql".to_string(),
                    "SELECT * FROM t".into(),
                    "--table".into(),
                    format!("t={quoted}"),
                    "--output".into(),
                ],
            ),
        ];
        for (j, (how, mut args)) in runs.into_iter().enumerate() {
            let out = outs.path().join(format!("out-{i}-{j}.parquet"));
            args.push(out.display().to_string());
            let run = Command::new(bin)
                .args(&args)
                .env_remove("VOLLEY_ADDRESS")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert!(
                !run.status.success(),
                "{} via {how}: exit 0; stderr: {stderr}",
                case.name
            );
            assert!(
                stderr.starts_with("volley: error:") && stderr.lines().count() == 1,
                "{} via {how}: not one error line: {stderr}",
                case.name
            );
            check_message(case, how, &stderr);
            nothing_written(case, how, &out);
        }
    }
}

#[test]
fn hostile_files_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let c = ctx();
    for (i, case) in corpus(dir.path()).iter().enumerate() {
        let path = case.path.display().to_string();
        let ext = case.path.extension().and_then(|e| e.to_str()).unwrap_or("");
        // The Dataset API: the reader of the file's format; reading and writing.
        let read = match ext {
            "csv" => c.read_csv(path.as_str()),
            "json" => c.read_json(path.as_str()),
            _ => c.read_parquet(path.as_str()),
        };
        let out = outs.path().join(format!("api-{i}"));
        let message = match read {
            Err(e) => e.to_string(),
            Ok(ds) => match ds.write_parquet(out.to_str().unwrap()) {
                Ok(s) => panic!("{}: the Dataset API wrote {} rows", case.name, s.rows),
                Err(e) => e.to_string(),
            },
        };
        check_message(case, "the Dataset API", &message);
        nothing_written(case, "the Dataset API", &out);
        // SQL in a program, with the file as a table.
        let table = if case.path.is_dir() {
            format!("{path}/")
        } else {
            path.clone()
        };
        let message = match c.sql_with_files("SELECT * FROM t", &[("t", table.as_str())]) {
            Err(e) => e.to_string(),
            Ok(ds) => match ds.collect() {
                Ok(b) => panic!("{}: SQL read {} rows", case.name, total_rows(&b)),
                Err(e) => e.to_string(),
            },
        };
        check_message(case, "Context::sql_with_files", &message);
    }
}

#[test]
fn an_empty_variable_is_unset_and_a_bad_one_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_volley");
    // `VOLLEY_ADDRESS=` means no cluster: the query runs here.
    let out = Command::new(bin)
        .args(["sql", "SELECT 41 + 1 AS answer", "--format", "csv"])
        .env("VOLLEY_ADDRESS", "")
        .env("VOLLEY_TOKEN", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("42"));
    // A program that calls `volley::init()` and the free functions.
    let input = dir.path().join("in");
    ctx()
        .range(1000)
        .with_column("x", col("id"))
        .unwrap()
        .write_parquet(input.to_str().unwrap())
        .unwrap();
    let pipeline = std::path::Path::new(bin)
        .parent()
        .unwrap()
        .join("examples/cluster_pipeline");
    let out = Command::new(&pipeline)
        .arg(&input)
        .arg(dir.path().join("out"))
        .env("VOLLEY_ADDRESS", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("on this machine"));
    // An invalid value: one line naming the variable, no panic, nothing written.
    for (var, value) in [
        ("VOLLEY_EXEC_MEMORY_LIMIT", "lots"),
        ("VOLLEY_ADDRESS", "127.0.0.1:1"),
    ] {
        let out_dir = dir.path().join(format!("bad-{var}"));
        let run = Command::new(&pipeline)
            .arg(&input)
            .arg(&out_dir)
            .env(var, value)
            .env("VOLLEY_TOKEN", "0123")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{var}={value}: {stderr}");
        assert!(
            !stderr.contains("panicked") && stderr.trim().lines().count() == 1,
            "{var}={value}: {stderr}"
        );
        assert!(
            stderr.contains(var) || stderr.contains(value),
            "{var}={value}: {stderr}"
        );
        assert!(!out_dir.exists());
    }
}

/// Every example and binary answers `--help` with its usage (and does no work), and
/// refuses an unknown flag.
#[test]
fn programs_answer_help_and_refuse_unknown_flags() {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_volley"));
    let examples = bin.parent().unwrap().join("examples");
    let mut programs: Vec<(String, Vec<&str>)> = vec![
        (bin.display().to_string(), vec![]),
        (bin.display().to_string(), vec!["sql"]),
        (bin.display().to_string(), vec!["job", "submit"]),
    ];
    for name in [
        "quickstart",
        "bench_workloads",
        "bench_cluster",
        "bench_tune",
        "cluster_pipeline",
        "cluster_tasks",
        "train_mlp",
        "train_lm",
    ] {
        programs.push((examples.join(name).display().to_string(), vec![]));
    }
    programs.push((
        examples.join("bench_workloads").display().to_string(),
        vec!["compare"],
    ));
    for (program, sub) in &programs {
        let run = |extra: &str| {
            let start = std::time::Instant::now();
            let out = Command::new(program)
                .args(sub)
                .arg(extra)
                .env_remove("VOLLEY_ADDRESS")
                .output()
                .unwrap_or_else(|e| panic!("{program}: {e}"));
            (out, start.elapsed())
        };
        let (help, took) = run("--help");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            help.status.success() && text.contains("Usage:"),
            "{program} {sub:?} --help: {text} {}",
            String::from_utf8_lossy(&help.stderr)
        );
        assert!(
            took < std::time::Duration::from_secs(20),
            "{program} --help took {took:?}: did it run its work?"
        );
        let (bad, _) = run("--no-such-flag");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(
            !bad.status.success() && err.contains("--no-such-flag"),
            "{program} {sub:?} --no-such-flag: {err}"
        );
    }
}
