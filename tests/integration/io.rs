//! Reading and writing files.

use std::sync::Arc;

use volley::arrow::array::{Array, AsArray, RecordBatch};
use volley::crates::connectors::WriteFormat;
use volley::prelude::*;
use volley::Compression;

use crate::common::*;

#[test]
fn parquet_csv_json_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let ds = c.from_batches(vec![sample(1000), sample(500)]).unwrap();
    for (fmt, read) in [("parquet", 0), ("csv", 1), ("json", 2)] {
        let path = dir.path().join(fmt);
        let path = path.to_str().unwrap();
        let summary = match fmt {
            "parquet" => ds.write_parquet(path),
            "csv" => ds.write_csv(path),
            _ => ds.write_json(path),
        }
        .unwrap();
        assert_eq!(summary.rows, 1500);
        let back = match read {
            0 => c.read_parquet(path),
            1 => c.read_csv(path),
            _ => c.read_json(path),
        }
        .unwrap();
        assert_eq!(back.count().unwrap(), 1500, "{fmt}");
        let ids: i64 = i64_column(&back.collect().unwrap(), "id")
            .into_iter()
            .flatten()
            .sum();
        assert_eq!(
            ids,
            (0..1000i64).sum::<i64>() + (0..500i64).sum::<i64>(),
            "{fmt}"
        );
    }
}

/// A task writing to many more partition values than it keeps files open closes some
/// and opens new files for their later rows: every row reads back.
#[test]
fn a_write_to_many_partition_values_keeps_few_files_open_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let out = dir.path().join("many");
    let out = out.to_str().unwrap();
    // 100 values in every batch of a task's 200,000 rows: more values than files it
    // keeps open, yet a file per value (the rows of the others wait in memory), not
    // one per value per batch.
    // 200,000 rows, `k` of 100 values, one task, as CSV partitioned by `k`.
    let write_by_k = |out: &str, max_rows: Option<usize>| {
        let write = c
            .range(200_000)
            .with_column("k", col("id") % lit(100i64))
            .unwrap()
            .repartition(1)
            .unwrap()
            .write(out, WriteFormat::Csv)
            .partition_by(&["k"]);
        match max_rows {
            Some(n) => write.max_rows_per_file(n),
            None => write,
        }
        .run()
        .unwrap()
    };
    let summary = write_by_k(out, None);
    assert_eq!(summary.rows, 200_000);
    assert_eq!(summary.files.len(), 100, "{:?}", &summary.files[..5]);
    let back = c.read_csv(out).unwrap();
    assert_eq!(back.count().unwrap(), 200_000);
    let seven = back.filter(col("k").eq(lit("7"))).unwrap();
    assert_eq!(seven.count().unwrap(), 2000);
    let sum = back.aggregate([agg::sum("id")]).unwrap().collect().unwrap();
    assert_eq!(
        i64_column(&sum, "sum(id)"),
        vec![Some(199_999 * 200_000 / 2)]
    );
    // Cut at a row count too: 2,000 rows a value in files of 500, in the order written.
    let out = dir.path().join("cut");
    let summary = write_by_k(out.to_str().unwrap(), Some(500));
    assert_eq!(summary.files.len(), 400);
    let mut seven: Vec<_> = summary
        .files
        .iter()
        .filter(|f| f.starts_with("k=7/"))
        .collect();
    seven.sort();
    let mut ids = Vec::new();
    for f in seven {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        let rows: Vec<i64> = text.lines().skip(1).map(|l| l.parse().unwrap()).collect();
        assert_eq!(rows.len(), 500, "{f}");
        ids.extend(rows);
    }
    assert_eq!(ids, (0..2000).map(|i| 7 + 100 * i).collect::<Vec<i64>>());
}

/// Rows held for a partition value count their own strings, not the whole batch's a
/// view column shares: a file per value still.
#[test]
fn held_rows_of_view_strings_count_their_own_bytes() {
    use volley::arrow::array::{ArrayRef, Int64Array, StringViewArray};
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let batches: Vec<RecordBatch> = (0..25)
        .map(|b| {
            let ids: Vec<i64> = (b * 8192..(b + 1) * 8192).collect();
            let k = Int64Array::from_iter_values(ids.iter().map(|i| i % 100));
            let s: StringViewArray = ids.iter().map(|i| Some(format!("{i:0>100}"))).collect();
            RecordBatch::try_from_iter([
                ("k", Arc::new(k) as ArrayRef),
                ("s", Arc::new(s) as ArrayRef),
            ])
            .unwrap()
        })
        .collect();
    let out = dir.path().join("views");
    let summary = c
        .from_batches(batches)
        .unwrap()
        .repartition(1)
        .unwrap()
        .write(out.to_str().unwrap(), WriteFormat::Csv)
        .partition_by(&["k"])
        .run()
        .unwrap();
    assert_eq!(summary.rows, 25 * 8192);
    assert_eq!(summary.files.len(), 100);
}

#[test]
fn compressed_and_partitioned_writes() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let ds = c.from_batches(vec![sample(3000)]).unwrap();
    let out = dir.path().join("parts");
    let out = out.to_str().unwrap();
    ds.write(out, WriteFormat::Parquet)
        .partition_by(&["name"])
        .compression(Compression::Zstd)
        .run()
        .unwrap();
    for v in ["n0", "n1", "n2"] {
        assert!(std::path::Path::new(out).join(format!("name={v}")).is_dir());
    }
    // Hive folders come back as a column, and filters on it prune folders.
    let back = c.read_parquet(out).unwrap();
    assert!(back.schema().unwrap().field_with_name("name").is_ok());
    assert_eq!(
        back.filter(col("name").eq(lit("n1")))
            .unwrap()
            .count()
            .unwrap(),
        1000
    );

    // Values that need escaping in a folder name read back as written.
    let tags = dir.path().join("tags");
    c.range(30)
        .sql(
            "t",
            "SELECT id, CASE id % 6 WHEN 0 THEN 'a/b' WHEN 1 THEN 'x:y' WHEN 2 THEN '50%' \
             WHEN 3 THEN 'a\"b' WHEN 4 THEN '[x]*|' ELSE 'p=q~' END AS tag FROM t",
        )
        .unwrap()
        .write(tags.to_str().unwrap(), WriteFormat::Parquet)
        .partition_by(&["tag"])
        .run()
        .unwrap();
    // Also filtered on: the filtered value's folder is found.
    for tag in ["a/b", "x:y", "50%", "a\"b", "[x]*|", "p=q~"] {
        let back = c.read_parquet(tags.to_str().unwrap()).unwrap();
        let matching = back.filter(col("tag").eq(lit(tag))).unwrap();
        assert_eq!(matching.count().unwrap(), 5, "{tag}");
    }

    // Files of at most so many rows, however big the blocks written.
    let capped = dir.path().join("capped");
    ds.write(capped.to_str().unwrap(), WriteFormat::Parquet)
        .max_rows_per_file(700)
        .run()
        .unwrap();
    let mut sizes = Vec::new();
    for f in std::fs::read_dir(&capped).unwrap() {
        let f = f.unwrap().path();
        sizes.push(
            c.read_parquet(f.to_str().unwrap())
                .unwrap()
                .count()
                .unwrap(),
        );
    }
    sizes.sort();
    assert_eq!(sizes, [200, 700, 700, 700, 700], "rows per file");

    let gz = dir.path().join("csvgz");
    ds.write(gz.to_str().unwrap(), WriteFormat::Csv)
        .compression(Compression::Gzip)
        .run()
        .unwrap();
    let file = std::fs::read_dir(&gz)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(file.to_str().unwrap().ends_with(".csv.gz"));
    assert_eq!(
        c.read_csv(gz.to_str().unwrap()).unwrap().count().unwrap(),
        3000
    );
}

#[test]
fn failed_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let out = dir.path().join("out");
    let ds = c.range(100_000).map_batches(
        "fails_late",
        |b: RecordBatch| {
            let first = b
                .column(0)
                .as_any()
                .downcast_ref::<volley::arrow::array::Int64Array>()
                .unwrap()
                .value(0);
            if first > 50_000 {
                return Err(VolleyError::execution("boom"));
            }
            Ok(b)
        },
        MapOptions::default(),
    );
    let err = ds
        .write_parquet(out.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("fails_late") && err.contains("boom"), "{err}");
    assert!(!out.exists());
    // no staging left beside it either
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // existing destinations are refused unless asked
    std::fs::create_dir(&out).unwrap();
    let err = c
        .range(10)
        .write_parquet(out.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    c.range(10)
        .write(out.to_str().unwrap(), WriteFormat::Parquet)
        .mode(WriteMode::Overwrite)
        .run()
        .unwrap();
    assert_eq!(
        c.read_parquet(out.to_str().unwrap())
            .unwrap()
            .count()
            .unwrap(),
        10
    );
    // What this context read before is read again as it is now: a second overwrite
    // (other files), through a plain read, a relational plan and SQL.
    c.range(20)
        .write(out.to_str().unwrap(), WriteFormat::Parquet)
        .mode(WriteMode::Overwrite)
        .run()
        .unwrap();
    let again = c.read_parquet(out.to_str().unwrap()).unwrap();
    assert_eq!(again.count().unwrap(), 20);
    assert_eq!(again.sort(["id"]).unwrap().count().unwrap(), 20);
    let query = format!("SELECT count(*) AS n FROM '{}'", out.display());
    let n = c.sql(&query, &[]).unwrap().collect_batch().unwrap();
    assert_eq!(
        n.column(0)
            .as_any()
            .downcast_ref::<volley::arrow::array::Int64Array>()
            .unwrap()
            .value(0),
        20
    );
}

#[test]
fn projection_and_limit_pushdown() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let path = dir.path().join("big.parquet");
    // one file of many row groups
    {
        let file = std::fs::File::create(&path).unwrap();
        let b = sample(200_000);
        let props = volley::datafusion::parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(10_000))
            .build();
        let mut w =
            volley::datafusion::parquet::arrow::ArrowWriter::try_new(file, b.schema(), Some(props))
                .unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
    }
    let ds = c.read_parquet(path.to_str().unwrap()).unwrap();
    let limited = ds.select(&["id"]).unwrap().limit(10);
    let explain = limited.explain().unwrap();
    assert!(
        explain.contains("projection=[id]") && explain.contains("limit=10"),
        "{explain}"
    );
    let batches = limited.collect().unwrap();
    assert_eq!(total_rows(&batches), 10);
    assert_eq!(batches[0].num_columns(), 1);
    // The reader stopped early: far fewer rows decoded than the file holds.
    let stats = limited.stats().unwrap();
    assert!(stats.operators[0].rows_out <= 20_000, "{stats}");

    // filters prune row groups: ids are sorted, so `id < 100` reads one row group
    let few = ds.filter(col("id").lt(lit(100i64))).unwrap();
    assert!(few.explain().unwrap().contains("filters=[id < Int64(100)]"));
    assert_eq!(few.count().unwrap(), 100);
}

#[test]
fn large_parquet_files_split_into_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx_with(|cfg| cfg.set("volley.read.split_bytes", "64KiB").unwrap());
    let path = dir.path().join("f.parquet");
    {
        let file = std::fs::File::create(&path).unwrap();
        let b = sample(300_000);
        let props = volley::datafusion::parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(20_000))
            .build();
        let mut w =
            volley::datafusion::parquet::arrow::ArrowWriter::try_new(file, b.schema(), Some(props))
                .unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
    }
    let ds = c.read_parquet(path.to_str().unwrap()).unwrap();
    assert_eq!(ds.count().unwrap(), 300_000);
    let stats = ds.stats().unwrap();
    assert!(stats.operators[0].tasks > 1, "{stats}");
}

#[test]
fn text_binary_and_ipc() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let text = dir.path().join("a.txt");
    std::fs::write(&text, "first line\nsecond\nthird\n").unwrap();
    let ds = c.read_text(text.to_str().unwrap()).unwrap();
    assert_eq!(ds.count().unwrap(), 3);
    // Compressed text files are decompressed, whichever codec wrote them.
    for (codec, ext) in [(Compression::Gzip, ".gz"), (Compression::Zstd, ".zst")] {
        let out = dir.path().join(format!("lines{ext}"));
        c.range(50)
            .write(out.to_str().unwrap(), WriteFormat::Csv)
            .compression(codec)
            .run()
            .unwrap();
        let lines = c.read_text(out.to_str().unwrap()).unwrap();
        let batch = lines.collect_batch().unwrap();
        let text = batch.column(0).as_string::<i32>();
        assert_eq!(text.len(), 51, "{ext}: a header and 50 rows");
        assert_eq!(text.value(0), "id", "{ext}");
        assert!(text.iter().any(|l| l == Some("49")), "{ext}");
        // A file of two compressed members (as parallel compressors write them) reads
        // whole.
        let part = std::fs::read_dir(&out)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let once = std::fs::read(&part).unwrap();
        let twice = dir.path().join(format!("twice.txt{ext}"));
        std::fs::write(&twice, [once.clone(), once].concat()).unwrap();
        let lines = c.read_text(twice.to_str().unwrap()).unwrap();
        assert_eq!(lines.count().unwrap(), 102, "{ext}");
        std::fs::remove_file(&twice).unwrap();
    }
    // Read as it arrives, in batches: line breaks of both kinds, empty lines, a last
    // line without a break; a line that is not UTF-8 is named by its number.
    let mut want: Vec<String> = Vec::new();
    let mut bytes = Vec::new();
    for i in 0..200_000 {
        let line = if i % 1000 == 7 {
            String::new()
        } else {
            format!("line {i}")
        };
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(if i % 2 == 0 { b"\n" } else { b"\r\n" });
        want.push(line);
    }
    bytes.extend_from_slice(b"last\r");
    want.push("last\r".into());
    let many = dir.path().join("many.txt");
    std::fs::write(&many, &bytes).unwrap();
    let batches = c
        .read_text(many.to_str().unwrap())
        .unwrap()
        .collect()
        .unwrap();
    assert!(batches.len() > 1);
    let got: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let t = b.column(0).as_string::<i32>();
            (0..t.len())
                .map(|i| t.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want);
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"one\ntwo\nthr\xffee\n").unwrap();
    let e = c
        .read_text(bad.to_str().unwrap())
        .unwrap()
        .collect()
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.txt line 3 is not UTF-8"), "{e}");
    std::fs::remove_file(&bad).unwrap();
    std::fs::remove_file(&many).unwrap();

    let bin = c.read_binary_files(dir.path().to_str().unwrap()).unwrap();
    let b = bin.collect_batch().unwrap();
    assert_eq!(b.num_rows(), 1);
    assert_eq!(b.schema().field(1).name(), "bytes");

    let ipc = dir.path().join("x.arrow");
    {
        let batch = sample(42);
        let f = std::fs::File::create(&ipc).unwrap();
        let mut w = volley::arrow::ipc::writer::FileWriter::try_new(f, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
    }
    assert_eq!(
        c.read_ipc(ipc.to_str().unwrap()).unwrap().count().unwrap(),
        42
    );
}

#[test]
fn a_folder_mixing_compressions_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let out = dir.path().join("mixed");
    c.range(5)
        .write(out.to_str().unwrap(), WriteFormat::Csv)
        .compression(Compression::Gzip)
        .run()
        .unwrap();
    std::fs::write(out.join("extra.csv"), "id\n7\n").unwrap();
    let err = c
        .read_csv(out.to_str().unwrap())
        .and_then(|ds| ds.count())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("extra.csv") && err.contains(".csv.gz"),
        "{err}"
    );
}

#[test]
fn globs_and_lists_of_paths() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    for i in 0..3 {
        let p = dir.path().join(format!("f{i}.csv"));
        std::fs::write(&p, "a,b\n1,2\n3,4\n").unwrap();
    }
    let glob = format!("{}/*.csv", dir.path().display());
    assert_eq!(c.read_csv(glob.as_str()).unwrap().count().unwrap(), 6);
    let list = vec![
        dir.path().join("f0.csv").to_str().unwrap().to_string(),
        dir.path().join("f2.csv").to_str().unwrap().to_string(),
    ];
    assert_eq!(c.read_csv(list).unwrap().count().unwrap(), 4);
    // A file whose name holds glob characters is read as itself, through the API and
    // SQL; a glob that matches no file as written is still a glob.
    let sub = dir.path().join("odd");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("data[1].csv"), "a\n1\n").unwrap();
    std::fs::write(sub.join("data1.csv"), "a\n1\n2\n").unwrap();
    std::fs::write(sub.join("what?.csv"), "a\n1\n2\n3\n").unwrap();
    let named = sub.join("data[1].csv");
    let named = named.to_str().unwrap();
    assert_eq!(c.read_csv(named).unwrap().count().unwrap(), 1);
    let q = format!("SELECT count(*) AS n FROM '{named}'");
    let n = c.sql(&q, &[]).unwrap().collect().unwrap();
    assert_eq!(i64_column(&n, "n"), vec![Some(1)]);
    let asked = sub.join("what?.csv");
    assert_eq!(
        c.read_csv(asked.to_str().unwrap())
            .unwrap()
            .count()
            .unwrap(),
        3
    );
    let glob = sub.join("data[0-9].csv");
    assert_eq!(
        c.read_csv(glob.to_str().unwrap()).unwrap().count().unwrap(),
        2
    );
    let _ = Arc::new(());
}

/// A dataset of no rows written as a folder reads back as one of no rows, with its
/// columns (an empty folder was left, which no read takes).
#[test]
fn an_empty_folder_write_reads_back_empty() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let empty = c
        .from_batches(vec![sample(100)])
        .unwrap()
        .filter(col("id").lt(lit(0i64)))
        .unwrap();
    for fmt in [WriteFormat::Parquet, WriteFormat::Csv] {
        let out = dir.path().join(fmt.extension());
        let out = out.to_str().unwrap();
        let summary = empty.write(out, fmt).run().unwrap();
        assert_eq!((summary.files.len(), summary.rows), (1, 0), "{fmt:?}");
        let back = match fmt {
            WriteFormat::Parquet => c.read_parquet(out),
            _ => c.read_csv(out),
        }
        .unwrap();
        assert_eq!(back.count().unwrap(), 0, "{fmt:?}");
        let schema = back.schema().unwrap();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["id", "key", "value", "name"], "{fmt:?}");
    }
}

/// A column null in a JSON file's first lines (past what a reader looks at to infer
/// its columns) comes back with its later values: nulls are written, not left out.
#[test]
fn a_json_column_null_at_first_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let path = dir.path().join("sparse");
    let p = path.to_str().unwrap();
    c.range(3000)
        .sql(
            "t",
            "SELECT id, CASE WHEN id >= 2500 THEN id * 2 END AS late FROM t",
        )
        .unwrap()
        .write(p, WriteFormat::Json)
        .single_file()
        .run()
        .unwrap();
    let back = c.read_json(p).unwrap();
    assert!(back.schema().unwrap().field_with_name("late").is_ok());
    let n = back
        .filter(col("late").is_not_null())
        .unwrap()
        .count()
        .unwrap();
    assert_eq!(n, 500);
}

/// Bookkeeping files beside the data (`_SUCCESS`, `.crc` checksums) are not read, by
/// a plain read, a relational plan or SQL over the folder.
#[test]
fn bookkeeping_files_are_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let ds = c.from_batches(vec![sample(1000)]).unwrap();
    for fmt in ["parquet", "csv", "json"] {
        let path = dir.path().join(fmt);
        let p = path.to_str().unwrap();
        match fmt {
            "parquet" => ds.write_parquet(p),
            "csv" => ds.write_csv(p),
            _ => ds.write_json(p),
        }
        .unwrap();
        std::fs::write(path.join("_SUCCESS"), b"").unwrap();
        std::fs::write(path.join(".part.crc"), b"\x00\x01not data\xff,\n{").unwrap();
        let read = || match fmt {
            "parquet" => c.read_parquet(p),
            "csv" => c.read_csv(p),
            _ => c.read_json(p),
        };
        assert_eq!(read().unwrap().count().unwrap(), 1000, "{fmt}");
        let sorted = read().unwrap().sort(["id"]).unwrap();
        assert_eq!(sorted.count().unwrap(), 1000, "{fmt}: a sort");
        let n = read()
            .unwrap()
            .sql("t", "SELECT count(*) AS n FROM t")
            .unwrap()
            .collect_batch()
            .unwrap();
        let n = n
            .column(0)
            .as_any()
            .downcast_ref::<volley::arrow::array::Int64Array>()
            .unwrap()
            .value(0);
        assert_eq!(n, 1000, "{fmt}: SQL");
    }
}

/// A CSV file whose quoted values hold line breaks is read whole by SQL and relational
/// plans too: a byte range starting inside a quoted value would start mid-record.
#[test]
fn quoted_line_breaks_in_a_big_csv() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    writeln!(f, "id,note,n").unwrap();
    let rows = 250_000i64;
    for i in 0..rows {
        writeln!(
            f,
            "{i},\"first line of note {i}\nsecond line, with a comma\",{}",
            i % 7
        )
        .unwrap();
    }
    drop(f);
    assert!(std::fs::metadata(&path).unwrap().len() > 12 << 20);
    let c = ctx();
    let p = path.to_str().unwrap();
    let sums = |b: RecordBatch| {
        let col = |i: usize| {
            b.column(i)
                .as_any()
                .downcast_ref::<volley::arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        };
        (col(0), col(1))
    };
    let query = format!("SELECT count(*) AS n, sum(id) AS s FROM '{p}'");
    let got = sums(c.sql(&query, &[]).unwrap().collect_batch().unwrap());
    assert_eq!(got, (rows, (0..rows).sum::<i64>()), "SQL over the file");
    let ds = c.read_csv(p).unwrap();
    let got = sums(
        ds.sql("t", "SELECT count(*) AS n, sum(id) AS s FROM t")
            .unwrap()
            .collect_batch()
            .unwrap(),
    );
    assert_eq!(got, (rows, (0..rows).sum::<i64>()), "SQL over a Dataset");
    assert_eq!(ds.sort(["n"]).unwrap().count().unwrap(), rows as u64);
}

/// A sorted dataset written by several tasks at once: its part files, in name order,
/// hold its rows in order.
#[test]
fn part_files_follow_the_rows_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let out = dir.path().join("sorted");
    let sorted = c
        .range(100_000)
        .with_column("k", (col("id") * lit(7919i64)) % lit(100_003i64))
        .unwrap()
        .sort([SortKey::desc("k")])
        .unwrap();
    let options = MapOptions {
        batch_size: Some(5_000),
        ..MapOptions::default()
    }
    .with_concurrency(4);
    sorted
        .map_batches("pass", Ok, options)
        .write_parquet(out.to_str().unwrap())
        .unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() > 1, "{files:?}");
    let mut keys = Vec::new();
    for f in files {
        let back = c.read_parquet(f.to_str().unwrap()).unwrap();
        keys.extend(i64_column(&back.collect().unwrap(), "k"));
    }
    assert_eq!(keys.len(), 100_000);
    assert!(keys.windows(2).all(|w| w[0] >= w[1]), "files out of order");
}

/// CSV files whose types differ after the first file's: the schema is the one the
/// inference's first 1,000 records give (a float column of a first big file reads a
/// later file's integers as floats).
#[test]
fn csv_schema_from_the_first_records_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = String::from("id,v\n");
    for i in 0..1200 {
        a.push_str(&format!("{i},{i}.5\n"));
    }
    std::fs::write(dir.path().join("a.csv"), a).unwrap();
    std::fs::write(dir.path().join("b.csv"), "id,v\n1200,7\n1201,8\n").unwrap();
    let c = ctx();
    let ds = c.read_csv(dir.path().to_str().unwrap()).unwrap();
    let v = ds
        .schema()
        .unwrap()
        .field_with_name("v")
        .unwrap()
        .data_type()
        .clone();
    assert_eq!(v, volley::arrow::datatypes::DataType::Float64);
    assert_eq!(ds.count().unwrap(), 1202);
}

/// Sorts, group-bys, joins and distincts after dropping or renaming columns of files:
/// the optimizer prunes the dropped column below, and the relational plan must not
/// ask for it again.
#[test]
fn relational_operations_after_drop_and_rename_of_file_columns() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let path = dir.path().join("t");
    c.from_batches(vec![sample(1000)])
        .unwrap()
        .write_parquet(path.to_str().unwrap())
        .unwrap();
    let ds = c.read_parquet(path.to_str().unwrap()).unwrap();
    let dropped = ds.drop_columns(&["name"]).unwrap();
    assert_eq!(dropped.sort(["id"]).unwrap().count().unwrap(), 1000);
    assert_eq!(dropped.distinct().unwrap().count().unwrap(), 1000);
    let renamed = ds
        .rename(&[("id", "ident")])
        .unwrap()
        .select(&["ident"])
        .unwrap();
    let groups = renamed.groupby(&["ident"]).count().unwrap();
    assert_eq!(groups.count().unwrap(), 1000);
    let joined = renamed.join(&renamed, &["ident"], JoinHow::Inner).unwrap();
    assert_eq!(joined.count().unwrap(), 1000);
}

/// A null partition value is written as the folder `k=__HIVE_DEFAULT_PARTITION__` (as
/// Hive and Spark write it) and reads back as null: in rows, in filters that prune
/// folders, through relational operators and SQL.
#[test]
fn null_partition_values_read_back_as_null() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let out = dir.path().join("nulls");
    let out = out.to_str().unwrap();
    c.range(90)
        .sql(
            "t",
            "SELECT id, CASE id % 3 WHEN 0 THEN 'a' WHEN 1 THEN 'b' END AS k FROM t",
        )
        .unwrap()
        .write(out, WriteFormat::Parquet)
        .partition_by(&["k"])
        .run()
        .unwrap();
    assert!(std::path::Path::new(out)
        .join("k=__HIVE_DEFAULT_PARTITION__")
        .is_dir());
    let back = c.read_parquet(out).unwrap();
    let rows = back.clone().collect().unwrap();
    let k: Vec<Option<String>> = rows
        .iter()
        .flat_map(|b| {
            let a = b.column_by_name("k").unwrap();
            let a =
                volley::arrow::compute::cast(a, &volley::arrow::datatypes::DataType::Utf8).unwrap();
            a.as_string::<i32>()
                .iter()
                .map(|v| v.map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(k.len(), 90);
    assert_eq!(k.iter().filter(|v| v.is_none()).count(), 30, "{k:?}");
    assert!(!k
        .iter()
        .any(|v| v.as_deref() == Some("__HIVE_DEFAULT_PARTITION__")));
    let count = |e: Expr| back.clone().filter(e).unwrap().count().unwrap();
    assert_eq!(count(col("k").is_null()), 30);
    assert_eq!(count(col("k").is_not_null()), 60);
    assert_eq!(count(col("k").eq(lit("a"))), 30);
    assert_eq!(count(col("k").eq(lit("__HIVE_DEFAULT_PARTITION__"))), 0);
    // Through a relational operator (planned by DataFusion over the files) and SQL.
    let sorted = |e: Expr| {
        let rows = back
            .clone()
            .filter(e)
            .unwrap()
            .sort(["id"])
            .unwrap()
            .collect()
            .unwrap();
        i64_column(&rows, "id")
    };
    let nulls = sorted(col("k").is_null());
    assert_eq!((nulls.len(), nulls[0]), (30, Some(2)));
    // A filter whose value is null on the null folder (not false) drops its rows.
    let not_a = sorted(col("k").not_eq(lit("a")));
    assert_eq!((not_a.len(), not_a[0]), (30, Some(1)));
    assert!(sorted(col("k").eq(lit("__HIVE_DEFAULT_PARTITION__"))).is_empty());
    for (query, want) in [
        ("SELECT count(*) AS n FROM t WHERE k IS NULL", 30),
        (
            "SELECT count(*) AS n FROM t WHERE coalesce(k, 'none') = 'none'",
            30,
        ),
        (
            "SELECT count(*) AS n FROM (SELECT DISTINCT k FROM t) WHERE k IS NULL",
            1,
        ),
        ("SELECT count(*) AS n FROM t WHERE k <> 'a'", 30),
        ("SELECT count(*) AS n FROM t WHERE NOT (k = 'a')", 30),
        ("SELECT count(*) AS n FROM t WHERE k > 'Z'", 60),
        (
            "SELECT count(*) AS n FROM t WHERE k = '__HIVE_DEFAULT_PARTITION__'",
            0,
        ),
    ] {
        let n = c
            .sql_with_files(query, &[("t", out)])
            .unwrap()
            .collect()
            .unwrap();
        assert_eq!(i64_column(&n, "n"), vec![Some(want)], "{query}");
    }
    // A folder `k=` (as DataFusion's own writes name a null value's) reads as null too.
    let empty = std::path::Path::new(out).join("k=");
    std::fs::create_dir(&empty).unwrap();
    let a_file = std::fs::read_dir(std::path::Path::new(out).join("k=a"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(&a_file, empty.join("x.parquet")).unwrap();
    let back = c.read_parquet(out).unwrap();
    assert_eq!(
        back.filter(col("k").is_null()).unwrap().count().unwrap(),
        60
    );
    assert_eq!(
        back.filter(col("k").eq(lit(""))).unwrap().count().unwrap(),
        0
    );
    let n = c
        .sql_with_files("SELECT count(*) AS n FROM t WHERE k IS NULL", &[("t", out)])
        .unwrap()
        .collect()
        .unwrap();
    assert_eq!(i64_column(&n, "n"), vec![Some(60)]);
}
