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
