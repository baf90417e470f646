//! Bad input: clear errors that name the file, column or position; no panics.

use std::process::Command;

use volley::prelude::*;

use crate::common::*;

fn err_of<T: std::fmt::Debug>(r: volley::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn missing_paths() {
    let c = ctx();
    let e = err_of(c.read_parquet("/no/such/dir/x.parquet"));
    assert!(e.contains("/no/such/dir/x.parquet"), "{e}");
    let e = err_of(c.read_csv("/tmp/*.no-such-extension-volley"));
    assert!(e.contains("no files found"), "{e}");
}

#[test]
fn corrupt_empty_and_non_parquet_files() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let not_parquet = dir.path().join("text.parquet");
    std::fs::write(&not_parquet, "this is not parquet at all, just some text").unwrap();
    let e = err_of(c.read_parquet(not_parquet.to_str().unwrap()));
    assert!(e.contains("text.parquet"), "{e}");

    let empty = dir.path().join("empty.parquet");
    std::fs::write(&empty, "").unwrap();
    let e = err_of(c.read_parquet(empty.to_str().unwrap()));
    assert!(e.contains("empty.parquet"), "{e}");

    // A truncated file: a good file cut in half.
    let good = dir.path().join("good");
    c.from_batches(vec![sample(10_000)])
        .unwrap()
        .write_parquet(good.to_str().unwrap())
        .unwrap();
    let part = std::fs::read_dir(&good)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(&part).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(c.read_parquet(cut.to_str().unwrap()));
    assert!(e.contains("cut.parquet"), "{e}");

    // Corrupt pages behind a valid footer: fails at read time, naming the file.
    let mut bad = bytes.clone();
    for b in bad.iter_mut().skip(8).take(bytes.len() / 2) {
        *b = 0x5a;
    }
    let badp = dir.path().join("pages.parquet");
    std::fs::write(&badp, &bad).unwrap();
    match c.read_parquet(badp.to_str().unwrap()) {
        Err(e) => assert!(e.to_string().contains("pages.parquet"), "{e}"),
        Ok(ds) => {
            let e = err_of(ds.collect());
            assert!(e.contains("pages.parquet"), "{e}");
        }
    }
}

#[test]
fn ragged_and_mistyped_csv() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let ragged = dir.path().join("ragged.csv");
    std::fs::write(&ragged, "a,b,c\n1,2,3\n4,5\n").unwrap();
    let e = match c.read_csv(ragged.to_str().unwrap()) {
        Err(e) => e.to_string(),
        Ok(ds) => err_of(ds.collect()),
    };
    assert!(e.contains("ragged.csv"), "{e}");

    let mistyped = dir.path().join("typed.csv");
    let mut body = String::from("a,b\n");
    for i in 0..2000 {
        body.push_str(&format!("{i},{i}\n"));
    }
    body.push_str("oops,1\n");
    std::fs::write(&mistyped, body).unwrap();
    let e = err_of(c.read_csv(mistyped.to_str().unwrap()).unwrap().collect());
    assert!(e.contains("typed.csv") && e.contains("oops"), "{e}");
    assert!(e.contains("at line 2002."), "{e}");
    assert_eq!(
        e.matches("typed.csv").count(),
        1,
        "the file named more than once: {e}"
    );

    // Through SQL, the line as an editor counts it (the header is line 1), also in a
    // large file (read whole: a quoted value may hold line breaks).
    let big = dir.path().join("big.csv");
    let mut body = String::from("id,v\n");
    for i in 0..300_000 {
        if i == 200_000 {
            body.push_str("200000,oops\n");
        } else {
            body.push_str(&format!("{i},{}\n", i * 2));
        }
    }
    std::fs::write(&big, body).unwrap();
    let e = sql_stderr(&format!("SELECT sum(v) FROM '{}'", big.display()));
    assert!(
        e.contains("big.csv") && e.contains("at line 200002."),
        "{e}"
    );
    // A row with a field too many, the same way.
    let ragged_big = dir.path().join("ragged_big.csv");
    let mut body = String::from("id,v\n");
    for i in 0..300_000 {
        body.push_str(&format!(
            "{i},{i}{}\n",
            if i == 250_000 { ",9" } else { "" }
        ));
    }
    std::fs::write(&ragged_big, body).unwrap();
    let e = sql_stderr(&format!("SELECT sum(v) FROM '{}'", ragged_big.display()));
    assert!(e.contains("fields for line 250002,"), "{e}");
    // The Dataset API counts the same way.
    let e = err_of(c.read_csv(big.to_str().unwrap()).unwrap().collect());
    assert!(
        e.contains("big.csv") && e.contains("at line 200002."),
        "{e}"
    );
    let e = sql_stderr(&format!("SELECT sum(a) FROM '{}'", mistyped.display()));
    assert!(
        e.contains("typed.csv") && e.contains("at line 2002."),
        "{e}"
    );
}

#[test]
fn invalid_json() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let p = dir.path().join("bad.json");
    std::fs::write(&p, "{\"a\": 1}\n{\"a\": \n").unwrap();
    let e = match c.read_json(p.to_str().unwrap()) {
        Err(e) => e.to_string(),
        Ok(ds) => err_of(ds.collect()),
    };
    assert!(e.contains("bad.json"), "{e}");

    // A value of the wrong type, and a line that is not JSON, deep in a file read in
    // parts: the error names the line, counted from the file's start, through the
    // Dataset API and SQL alike.
    let big = dir.path().join("big.json");
    let mut body = String::new();
    for i in 0..300_000 {
        match i {
            150_000 => body.push_str("{\"id\": 150000, \"v\": \"oops\"}\n"),
            _ => body.push_str(&format!("{{\"id\": {i}, \"v\": {}}}\n", i * 2)),
        }
    }
    std::fs::write(&big, &body).unwrap();
    let e = err_of(c.read_json(big.to_str().unwrap()).unwrap().collect());
    assert!(
        e.contains("big.json") && e.contains("oops") && e.contains("at line 150001"),
        "{e}"
    );
    let e = sql_stderr(&format!("SELECT sum(v) FROM '{}'", big.display()));
    assert!(
        e.contains("big.json") && e.contains("at line 150001"),
        "{e}"
    );

    let broken = dir.path().join("broken.json");
    std::fs::write(
        &broken,
        "{\"a\": 1}\n{\"a\": 2}\n{\"a\": 3,,}\n{\"a\": 4}\n",
    )
    .unwrap();
    // Here the schema's inference meets it first.
    let e = match c.read_json(broken.to_str().unwrap()) {
        Err(e) => e.to_string(),
        Ok(ds) => err_of(ds.collect()),
    };
    assert!(
        e.contains("broken.json") && e.contains("at line 3 column"),
        "{e}"
    );
}

#[test]
fn incompatible_schemas_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    c.range(10).write_parquet(a.to_str().unwrap()).unwrap();
    c.range(10)
        .with_column(
            "id",
            volley::datafusion::prelude::cast(col("id"), volley::arrow::datatypes::DataType::Utf8),
        )
        .unwrap()
        .write_parquet(b.to_str().unwrap())
        .unwrap();
    let files: Vec<String> = [&a, &b]
        .iter()
        .map(|d| {
            std::fs::read_dir(d)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path()
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let e = err_of(c.read_parquet(files.clone()));
    assert!(
        e.contains("column `id` is Int64") && e.contains("but Utf8"),
        "{e}"
    );
    assert!(e.contains(&files[0]) && e.contains(&files[1]), "{e}");
}

#[test]
fn unknown_columns_and_bad_sql() {
    let c = ctx();
    let ds = c.range(10);
    let e = err_of(ds.select(&["nope"]));
    assert!(e.contains("nope") && e.contains("id"), "{e}");
    let e = err_of(ds.filter(col("missing").gt(lit(1))));
    assert!(e.contains("missing"), "{e}");
    let e = err_of(ds.with_column("x", col("id") + lit("abc")));
    assert!(!e.is_empty());
    let e = err_of(c.sql("SELEC * FROM t", &[("t", &ds)]));
    assert!(e.contains("SELEC"), "{e}");
    let e = err_of(c.sql("SELECT nope FROM t", &[("t", &ds)]));
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn a_division_by_zero_names_the_division() {
    let c = ctx();
    let ds = c.range(10);
    let e = err_of(
        c.sql("SELECT sum(id / (id - id)) AS s FROM t", &[("t", &ds)])
            .and_then(|d| d.collect()),
    );
    assert!(
        e.contains("dividing by zero in `t.id / (t.id - t.id)`") && e.contains("Divide by zero"),
        "{e}"
    );
    let e = err_of(
        ds.with_column("x", col("id") / (col("id") - col("id")))
            .and_then(|d| d.collect()),
    );
    // A Dataset's step names the column it computes.
    assert!(
        e.contains("computing column `x`") && e.contains("Divide by zero"),
        "{e}"
    );
    // Several that may be zero: each is named, since Arrow's error does not say which;
    // a division by a constant other than zero is not.
    let e = err_of(
        c.sql(
            "SELECT id / 2 AS half, id / (id - id) AS a, id % (id - 1) AS r FROM t",
            &[("t", &ds)],
        )
        .and_then(|d| d.collect()),
    );
    assert!(
        e.contains("dividing by zero in one of `t.id / (t.id - t.id)`, `t.id % (t.id - Int64(1))`"),
        "{e}"
    );
    // A Dataset read as a table: its step's error says where; the query adds nothing.
    let bad = ds
        .with_column("x", col("id") / (col("id") - col("id")))
        .unwrap();
    let e = err_of(
        c.sql("SELECT x / (id + 1) AS y FROM t", &[("t", &bad)])
            .and_then(|d| d.collect()),
    );
    assert!(
        e.contains("computing column `x`") && !e.contains("dividing by zero in"),
        "{e}"
    );
    // A cast of a value its type cannot hold names the casts written (a file read by
    // its path shows its columns unqualified).
    let e = err_of(
        c.sql(
            "SELECT CAST(id * 100 AS TINYINT) AS b, CAST(1 AS INT) AS one FROM t",
            &[("t", &ds)],
        )
        .and_then(|d| d.collect()),
    );
    assert!(
        e.contains("casting in `CAST(t.id * Int64(100) AS Int8)`") && e.contains("Cast error"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v.csv");
    std::fs::write(&file, "v\n1\n2\n300\n").unwrap();
    let e = err_of(
        c.sql(
            &format!("SELECT CAST(v AS TINYINT) FROM '{}'", file.display()),
            &[],
        )
        .and_then(|d| d.collect()),
    );
    assert!(e.contains("casting in `CAST(v AS Int8)`"), "{e}");
}

#[test]
fn user_function_errors_and_panics_name_the_function() {
    let c = ctx();
    let e = err_of(
        c.range(10)
            .map_batches("explodes", |_b| panic!("kaboom"), MapOptions::default())
            .collect(),
    );
    assert!(e.contains("explodes") && e.contains("kaboom"), "{e}");
    // A function that returns the cancellation error while nothing stops the run:
    // its batches were dropped as if the run were stopping, and the run succeeded
    // without them.
    let e = err_of(
        c.range(10)
            .map_batches(
                "quits",
                |_b| Err(volley::VolleyError::Cancelled),
                MapOptions::default(),
            )
            .collect(),
    );
    assert!(
        e.contains("cancelled while its execution was running"),
        "{e}"
    );
}

#[test]
fn cli_prints_one_line_and_exits_non_zero() {
    let bin = env!("CARGO_BIN_EXE_volley");
    let out = Command::new(bin)
        .args(["sql", "SELECT * FROM '/no/such/file.parquet'"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("volley: error:"), "{err}");
    assert!(err.lines().count() <= 3, "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = Command::new(bin).args(["sql", "SELEC 1"]).output().unwrap();
    assert!(!out.status.success());
    // The parser's sentence, said once, without the enum it travels in.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sql parser error: Expected: an SQL statement, found: SELEC")
            && !err.contains("ParserError(")
            && err.matches("error:").count() == 2,
        "{err}"
    );

    // A bad setting in the environment: the variable, the key and what it takes, once.
    let out = Command::new(bin)
        .args(["sql", "SELECT 1"])
        .env("VOLLEY_EXEC_BATCH_SIZE", "abc")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("VOLLEY_EXEC_BATCH_SIZE: invalid configuration: volley.exec.batch_size = `abc`: expected a row count")
            && err.matches("invalid configuration").count() == 1,
        "{err}"
    );
}

/// `volley sql` with `--output` (`-o`) and several statements, from the command line.
/// What `volley sql QUERY` (in one process) says on stderr.
fn sql_stderr(query: &str) -> String {
    String::from_utf8_lossy(&volley_sql(&[query]).stderr).to_string()
}

fn volley_sql(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_volley"))
        .arg("sql")
        .args(args)
        .env_remove("VOLLEY_ADDRESS")
        .output()
        .unwrap()
}

/// A SQL `COPY` into a folder that takes no new files fails naming it (the local
/// object store retried its staged file without end: the command spun at full CPU).
#[test]
fn a_copy_into_a_folder_that_takes_no_files_fails_naming_it() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["sql", "COPY (SELECT 1 AS a) TO '/proc/volley-copy.parquet'"])
        .env_remove("VOLLEY_ADDRESS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the COPY did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot write into /proc"),
        "{err}"
    );
}

/// A write whose process is killed leaves its staging folder; the next write to the
/// same destination removes it (its owner is gone), and leaves a live writer's alone.
#[test]
fn a_killed_writers_staging_is_removed_by_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.parquet");
    let staging = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".out.parquet.volley-staging-"))
            .collect()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args([
            "sql",
            "SELECT id, id * 2 AS twice FROM range(400000000) t(id)",
            "-o",
            out.to_str().unwrap(),
        ])
        .env_remove("VOLLEY_ADDRESS")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let began = std::time::Instant::now();
    // Its owner file is the last thing a new staging folder gets.
    while !staging().iter().any(|s| s.join("owner").exists()) {
        assert!(
            began.elapsed() < std::time::Duration::from_secs(60),
            "no staging folder appeared"
        );
        assert!(child.try_wait().unwrap().is_none(), "the write ended first");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = staging();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(!out.exists());

    // A live process's staging (this test's) stays.
    let live = dir.path().join(".out.parquet.volley-staging-live");
    std::fs::create_dir(&live).unwrap();
    let read = |p: &str| std::fs::read_to_string(p).unwrap().trim().to_string();
    let stat = read("/proc/self/stat");
    let started = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .to_string();
    let namespace = std::fs::read_link("/proc/self/ns/pid").unwrap();
    std::fs::write(
        live.join("owner"),
        format!(
            "{} {} {} {} {started}",
            read("/proc/sys/kernel/hostname"),
            read("/proc/sys/kernel/random/boot_id"),
            namespace.display(),
            std::process::id()
        ),
    )
    .unwrap();

    let done = volley_sql(&["SELECT 1 AS one", "-o", out.to_str().unwrap()]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(out.is_file());
    assert_eq!(
        staging(),
        vec![live],
        "the killed write's staging is still there"
    );
}

/// A single-file output never replaces a folder (nor what it holds), and a result
/// without rows still makes its file, with the result's columns.
#[test]
fn sql_output_keeps_folders_and_writes_results_without_rows() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("precious.csv");
    std::fs::create_dir_all(folder.join("sub")).unwrap();
    std::fs::write(folder.join("keep.txt"), "important").unwrap();
    let out = volley_sql(&["SELECT 1 AS a", "-o", folder.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is a folder"), "{err}");
    assert_eq!(
        std::fs::read_to_string(folder.join("keep.txt")).unwrap(),
        "important"
    );
    let litter: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "precious.csv")
        .collect();
    assert!(litter.is_empty(), "{litter:?}");

    let empty = "SELECT 1 AS a, 'x' AS b WHERE 1 = 0";
    let csv = dir.path().join("empty.csv");
    let out = volley_sql(&[empty, "-o", csv.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&csv).unwrap().trim(), "a,b");
    let parquet = dir.path().join("empty.parquet");
    let out = volley_sql(&[empty, "-o", parquet.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = ctx().read_parquet(parquet.to_str().unwrap()).unwrap();
    let names: Vec<String> = back
        .schema()
        .unwrap()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(back.count().unwrap(), 0);
    // On stdout too: the header of a result without rows.
    let out = volley_sql(&[empty, "--format", "csv"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "a,b");
    let out = volley_sql(&[empty]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| a | b |"), "{table}");
}

/// Statements before the last run in order, to their end: an INSERT's rows are there
/// for the next, a COPY writes, and a failing query fails the command.
#[test]
fn several_sql_statements_run_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let copied = dir.path().join("copied.csv");
    let query = format!(
        "CREATE TABLE t (a INT); INSERT INTO t VALUES (1), (2), (3); \
         COPY (SELECT a * 10 AS b FROM t) TO '{}' STORED AS CSV; \
         SELECT count(*) AS n, sum(a) AS s FROM t",
        copied.display()
    );
    let out = volley_sql(&[&query, "--format", "csv"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "n,s\n3,6");
    let text = std::fs::read_to_string(&copied).unwrap();
    assert_eq!(text.lines().collect::<Vec<_>>(), ["b", "10", "20", "30"]);

    // Explained, nothing runs: statements that write are refused, those that only
    // change the session take effect, the last one's INSERT or COPY is planned.
    std::fs::remove_file(&copied).unwrap();
    let out = volley_sql(&[&query, "--explain"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("in statement 2") && err.contains("writes or makes data"),
        "{err}"
    );
    assert!(!copied.exists());
    let only_the_last = format!(
        "SET datafusion.execution.batch_size = 100; CREATE TABLE t (a INT); \
         CREATE VIEW v AS SELECT a FROM t; COPY (SELECT a FROM v) TO '{}' STORED AS CSV",
        copied.display()
    );
    let out = volley_sql(&[&only_the_last, "--explain"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!copied.exists());
    let out = volley_sql(&[
        "CREATE TABLE u AS SELECT 1 AS a; SELECT a FROM u",
        "--explain",
    ]);
    assert!(!out.status.success());
    let analyzed = format!(
        "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{}' STORED AS CSV",
        copied.display()
    );
    let out = volley_sql(&[&analyzed, "--explain"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("EXPLAIN ANALYZE"),
        "{err}"
    );
    assert!(!copied.exists());

    // A syntax error anywhere runs nothing.
    let typo = format!(
        "COPY (SELECT 1 AS a) TO '{}' STORED AS CSV; SELEC 2",
        copied.display()
    );
    let out = volley_sql(&[&typo]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("SELEC"), "{err}");
    assert!(!copied.exists());
    // The parser's dialect is the one set before a statement: MySQL reads "hi" as a
    // string, the default (generic) dialect as a column.
    let csv = |query: &str| {
        let out = volley_sql(&[query, "--format", "csv"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        csv("SET datafusion.sql_parser.dialect = 'MySQL'; SELECT \"hi\" AS x"),
        "x\nhi"
    );
    let out = volley_sql(&["SELECT \"hi\" AS x"]);
    assert!(!out.status.success());
    // What only the dialect set can read is read in it (a backslash escape).
    assert_eq!(
        csv("SET datafusion.sql_parser.dialect = 'MySQL'; SELECT 'it\\'s' AS x; SELECT 1 AS y"),
        "y\n1"
    );
    // A parse error's line and column are the script's, not counted from the `;`
    // before the statement.
    let out =
        volley_sql(&["SET datafusion.sql_parser.dialect = 'MySQL';\nSELECT 1;\n  SELECT 2 FROM ,"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Line: 3, Column: 17"),
        "{err}"
    );
    let out = volley_sql(&["SET datafusion.sql_parser.dialect = 'Klingon'; SELECT 1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Klingon"), "{err}");

    // Runtime settings would not reach the executor: refused, named, with what sets
    // them instead.
    for q in [
        "SET datafusion.runtime.memory_limit = '1M'; SELECT 1",
        "RESET datafusion.runtime.temp_directory; SELECT 1",
    ] {
        let out = volley_sql(&[q]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{q}: {err}");
        assert!(
            err.contains("datafusion.runtime.") && err.contains("--memory-limit"),
            "{err}"
        );
    }
    // Counts DataFusion's operators reserve memory by, outside the budget: refused
    // (a trillion rows per batch ended the process allocating 8 TB; 100,000 partitions
    // filled the machine's memory grouping 20,000 rows).
    for (q, why) in [
        (
            "SET datafusion.execution.batch_size = 1000000000000; \
             SELECT x % 7, count(*) FROM (VALUES (1), (2)) t(x) GROUP BY 1",
            "volley runs at most 1048576 rows per batch",
        ),
        (
            "SET datafusion.execution.target_partitions TO 100000; \
             SELECT x % 7, count(*) FROM (VALUES (1), (2)) t(x) GROUP BY 1",
            "volley runs at most 1024 partitions",
        ),
    ] {
        let out = volley_sql(&[q]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("in statement 1") && err.contains(why),
            "{q}: {err}"
        );
    }
    assert_eq!(
        csv("SET datafusion.execution.batch_size = 1048576; \
             SET datafusion.execution.target_partitions = 1024; \
             SELECT x % 2 AS k, count(*) AS n FROM (VALUES (1), (2), (3)) t(x) GROUP BY 1 \
             ORDER BY 1"),
        "k,n\n0,1\n1,2"
    );

    let out = volley_sql(&["SELECT 1 / 0; SELECT 2 AS b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("in statement 1") && err.contains("Divide by zero"),
        "{err}"
    );
}

/// Options and values the command cannot use say which one, before anything runs.
#[test]
fn sql_options_and_columns_it_cannot_use_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let fails = |args: &[&str], why: &str| {
        let out = volley_sql(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!err.contains("filing a bug report"), "{args:?}: {err}");
    };
    fails(
        &["SELECT 1", "--memory-limit", "0"],
        "expected a byte size above 0",
    );
    fails(
        &["SELECT 1", "--table", "=x.parquet"],
        "--table =x.parquet: expected NAME=PATH",
    );
    fails(
        &["SELECT 1", "--spill-dir", "/nonexistent/spill"],
        "the spill folder /nonexistent/spill",
    );
    fails(
        &["SELECT make_array(1, 2) AS l", "--format", "csv"],
        "column `l` is List(Int64), which CSV cannot hold",
    );
    let csv = dir.path().join("l.csv");
    fails(
        &["SELECT make_array(1, 2) AS l", "-o", csv.to_str().unwrap()],
        "column `l` is List(Int64), which CSV cannot hold",
    );
    assert!(!csv.exists());
    // A user's type mistake is not a bug to report to DataFusion.
    fails(
        &["SELECT sum(s) FROM (SELECT 'a' AS s)"],
        "No function matches",
    );
    fails(
        &["SELECT 1", "--memory-limit", "lots"],
        "volley.exec.memory_limit = `lots`: expected a byte size",
    );
    fails(&["SELECT 1", "--memory-limit", "lots"], "--memory-limit: ");
    // Settings from the environment: a runtime of infinitely many CPUs, a budget of
    // nothing, splits of no bytes.
    for (var, value, key) in [
        ("VOLLEY_RUNTIME_NUM_CPUS", "inf", "volley.runtime.num_cpus"),
        ("VOLLEY_RUNTIME_MEMORY", "0", "volley.runtime.memory"),
        ("VOLLEY_READ_SPLIT_BYTES", "0", "volley.read.split_bytes"),
        (
            "VOLLEY_EXEC_BATCH_SIZE",
            "1000000000000",
            "volley.exec.batch_size",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_volley"))
            .args(["sql", "SELECT 1"])
            .env_remove("VOLLEY_ADDRESS")
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value}: {err}");
        assert!(
            err.contains(&format!("{key} = `{value}`")) && !err.contains("panicked"),
            "{var}={value}: {err}"
        );
    }
}

/// `volley start`'s durations are checked before anything starts: one too large for a
/// duration, or below the least that works, is refused with the flag named.
#[test]
fn start_refuses_durations_it_cannot_use() {
    let home = tempfile::tempdir().unwrap();
    let head: &[&str] = &["--head", "--port", "0", "--http-port", "0"];
    let node: &[&str] = &["--address", "127.0.0.1:9", "--token", "x"];
    for (start, flag, value) in [
        (head, "--node-timeout", "inf"),
        (head, "--node-timeout", "0"),
        (head, "--package-cache", "lots"),
        (node, "--drain-timeout", "1e20"),
        (node, "--head-patience", "NaN"),
        (node, "--num-gpus", "4294967295"),
    ] {
        let args: Vec<&str> = start.iter().copied().chain([flag, value]).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_volley"))
            .arg("start")
            .args(&args)
            .env("VOLLEY_HOME", home.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let stopped = Command::new(env!("CARGO_BIN_EXE_volley"))
            .arg("stop")
            .env("VOLLEY_HOME", home.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains(flag) && !err.contains("panicked") && !err.contains("did not start"),
            "{args:?}: {err}"
        );
        let stopped = String::from_utf8_lossy(&stopped.stdout);
        assert!(
            !stopped.contains("stopped 1"),
            "{args:?} started something: {stopped}"
        );
    }
}

/// Options a Dataset cannot use are refused with what was asked, or made harmless:
/// nothing hangs or panics.
#[test]
fn dataset_options_it_cannot_use() {
    let c = ctx();
    // A batch size of 0 set in the options directly runs as batches of one row.
    let options = MapOptions {
        batch_size: Some(0),
        ..MapOptions::default()
    };
    let ds = c.range(10).map_batches("one_row", Ok, options);
    assert_eq!(ds.count().unwrap(), 10);
    // A negative CPU share would hand CPUs back to the runtime.
    let e = err_of(
        c.range(10)
            .map_batches("greedy", Ok, MapOptions::default().with_num_cpus(-1.0))
            .collect(),
    );
    assert!(e.contains("`greedy` asks for -1 CPUs"), "{e}");
    // Each worker of a stateful transform is a thread: a count no system starts
    // (which panicked starting them) is refused.
    let e = err_of(
        c.range(10)
            .map_batches_stateful(
                "crowd",
                || Ok(|b: RecordBatch| -> volley::Result<RecordBatch> { Ok(b) }),
                MapOptions::default()
                    .with_num_cpus(0.0)
                    .with_concurrency(usize::MAX),
            )
            .collect(),
    );
    assert!(
        e.contains("`crowd` asks for 18446744073709551615 concurrent workers: at most 4096"),
        "{e}"
    );
    // Part counts past what any plan holds.
    for e in [
        c.range(10).split(usize::MAX).err(),
        c.range(10).repartition(usize::MAX).err(),
        c.range(10).streaming_split(usize::MAX, false).err(),
    ] {
        let e = e.expect("refused").to_string();
        assert!(e.contains("at most 1048576"), "{e}");
    }
    // Ids past Int64.
    let e = err_of(c.range(u64::MAX).collect());
    assert!(e.contains("at most 9223372036854775807 rows"), "{e}");
    assert_eq!(c.range(u64::MAX).limit(3).count().unwrap(), 3);
    // One file cannot also be one per partition value.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("one.parquet");
    let e = c
        .range(10)
        .write(out.to_str().unwrap(), volley::WriteFormat::Parquet)
        .single_file()
        .partition_by(&["id"])
        .run()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("single-file write cannot be partitioned by [id]"),
        "{e}"
    );
    assert!(!out.exists());
    // One read is of one store: paths on two are refused, naming both.
    let local = dir.path().join("local");
    c.range(3).write_parquet(local.to_str().unwrap()).unwrap();
    let e = c
        .read_parquet(vec![
            local.to_str().unwrap().to_string(),
            "s3://other-bucket/data/".to_string(),
        ])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("are on different stores") && e.contains("s3://other-bucket"),
        "{e}"
    );
    // A partition column's name becomes a folder's: one that would put files outside
    // it, or in a folder reads skip, is refused before anything is written.
    for (name, why) in [
        ("..", "hidden folder"),
        ("km/h", "cannot name a folder"),
        ("a=b", "cannot name a folder"),
        ("_hidden", "hidden folder"),
    ] {
        let parts = dir.path().join("parts");
        let e = c
            .range(10)
            .with_column(name, col("id"))
            .unwrap()
            .write(parts.to_str().unwrap(), volley::WriteFormat::Parquet)
            .partition_by(&[name])
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("partition column `{name}`")) && e.contains(why),
            "{e}"
        );
        assert!(!parts.exists());
    }
}

/// Files in other folders than the rest of a partitioned folder are refused with both
/// names, by the Dataset API and SQL alike: they used to be left out of the read
/// without a word when they were not among the first ten files listed.
#[test]
fn files_outside_a_folders_partition_layout_are_refused_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let parts = dir.path().join("parts");
    let parts_path = parts.to_str().unwrap();
    c.range(120)
        .with_column("k", col("id") % lit(12i64))
        .unwrap()
        .write(parts_path, volley::WriteFormat::Parquet)
        .partition_by(&["k"])
        .run()
        .unwrap();
    assert_eq!(c.read_parquet(parts_path).unwrap().count().unwrap(), 120);
    let a_file = std::fs::read_dir(parts.join("k=0"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // A file beside the `k=` folders, and one in a folder of another key, each listed
    // after the first ten files.
    for (stray, layout) in [
        ("zz.parquet", "no partition folders"),
        ("zz=1/a.parquet", "partition folders zz"),
    ] {
        let stray = parts.join(stray);
        std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
        std::fs::copy(&a_file, &stray).unwrap();
        let e = err_of(c.read_parquet(parts_path));
        assert!(
            e.contains("different partition folders")
                && e.contains("parts/k=0/")
                && e.contains("under partition folders k but")
                && e.contains(stray.to_str().unwrap())
                && e.contains(layout),
            "{e}"
        );
        let e = err_of(c.sql_with_files("SELECT count(*) FROM t", &[("t", parts_path)]));
        assert!(e.contains("different partition folders"), "{e}");
        std::fs::remove_file(&stray).unwrap();
    }
    // Paths read together have one layout too.
    let e = err_of(c.read_parquet(vec![
        parts_path.to_string(),
        a_file.to_str().unwrap().to_string(),
    ]));
    assert!(e.contains("different partition folders"), "{e}");
}
