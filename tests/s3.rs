//! Reading and writing `s3://` against a real S3-compatible server (moto, started
//! here on 127.0.0.1). Its own test binary: it sets the `AWS_*` variables the
//! process's object stores read.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use volley::arrow::array::{Int64Array, RecordBatch};
use volley::prelude::*;
use volley::VolleyConfig;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Server, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 with moto[server] (scripts/test.sh installs it)");
    let server = Server(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "moto did not start on {endpoint}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let made = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import boto3\nboto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='volley')"
        ))
        .status()
        .unwrap();
    assert!(made.success(), "could not create the test bucket");
    (server, endpoint)
}

fn sum_ids(batches: &[RecordBatch]) -> i64 {
    batches
        .iter()
        .map(|b| {
            let c = b.column(b.schema().index_of("id").unwrap());
            c.as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .iter()
                .sum::<i64>()
        })
        .sum()
}

#[test]
fn s3_round_trip() {
    let (_server, endpoint) = start_moto();
    for (k, v) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(k, v);
    }
    let mut config = VolleyConfig::default();
    config.set("volley.exec.progress", "off").unwrap();
    let c = Context::try_new(config).unwrap();

    // write, list, read back
    let ds = c
        .range(100_000)
        .with_column("twice", col("id") * lit(2i64))
        .unwrap();
    let summary = ds.write_parquet("s3://volley/data/numbers").unwrap();
    assert_eq!(summary.rows, 100_000);
    let back = c.read_parquet("s3://volley/data/numbers/").unwrap();
    assert_eq!(back.count().unwrap(), 100_000);
    assert_eq!(
        sum_ids(&back.collect().unwrap()),
        (0..100_000i64).sum::<i64>()
    );

    // A glob in a URL picks files (a `?` in it is no URL query).
    let globbed = c
        .read_parquet("s3://volley/data/numbers/part-*.parquet")
        .unwrap();
    assert_eq!(globbed.count().unwrap(), 100_000);
    let one = c
        .read_parquet("s3://volley/data/numbers/part-????????-00000*")
        .unwrap();
    assert!(one.count().unwrap() > 0);

    // pushdown works remotely too
    let few = back.filter(col("id").lt(lit(10i64))).unwrap();
    assert_eq!(few.count().unwrap(), 10);

    // CSV, and SQL over an s3 path
    c.range(1000).write_csv("s3://volley/csv/").unwrap();
    assert_eq!(
        c.read_csv("s3://volley/csv/").unwrap().count().unwrap(),
        1000
    );
    let n = c
        .sql(
            "SELECT count(*) AS n FROM 's3://volley/data/numbers/*.parquet'",
            &[],
        )
        .unwrap()
        .collect_batch()
        .unwrap();
    let n = n
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(n, 100_000);

    // a failed write leaves nothing behind
    let failing = c.range(100_000).map_batches(
        "fails",
        |b: RecordBatch| {
            let first = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0);
            if first > 60_000 {
                Err(VolleyError::execution("boom"))
            } else {
                Ok(b)
            }
        },
        MapOptions::default(),
    );
    assert!(failing.write_parquet("s3://volley/failed/").is_err());
    let e = c
        .read_parquet("s3://volley/failed/")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no files found"), "{e}");

    // an existing destination is refused
    let e = c
        .range(5)
        .write_parquet("s3://volley/data/numbers")
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");

    // One file: an object of its name exists as a folder's objects do; it replaces no
    // folder, and nothing is appended to it.
    let one = |ds: &Dataset, mode: WriteMode| {
        ds.write("s3://volley/one.parquet", volley::WriteFormat::Parquet)
            .single_file()
            .mode(mode)
            .run()
    };
    one(&c.range(5), WriteMode::ErrorIfExists).unwrap();
    let e = one(&c.range(6), WriteMode::ErrorIfExists)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    let e = c
        .range(5)
        .write("s3://volley/one.parquet", volley::WriteFormat::Parquet)
        .mode(WriteMode::Append)
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot append to the single file"), "{e}");
    let e = c
        .range(5)
        .write("s3://volley/data/numbers", volley::WriteFormat::Parquet)
        .single_file()
        .mode(WriteMode::Overwrite)
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a folder"), "{e}");
    let count = |path: &str| c.read_parquet(path).unwrap().count().unwrap();
    assert_eq!(count("s3://volley/data/numbers/"), 100_000);
    assert_eq!(count("s3://volley/one.parquet"), 5);
    one(&c.range(7), WriteMode::Overwrite).unwrap();
    assert_eq!(count("s3://volley/one.parquet"), 7);
    // A folder overwriting the file replaces it.
    c.range(3)
        .write("s3://volley/one.parquet", volley::WriteFormat::Parquet)
        .mode(WriteMode::Overwrite)
        .run()
        .unwrap();
    assert_eq!(count("s3://volley/one.parquet"), 3);
    assert_eq!(count("s3://volley/one.parquet/"), 3);

    // A file bigger than one upload piece (8 MiB) goes up in parts.
    let big = c
        .range(2_000_000)
        .with_column(
            "h",
            (col("id") * lit(2_654_435_761i64)) % lit(1_000_000_007i64),
        )
        .unwrap();
    let summary = big
        .write("s3://volley/big.parquet", volley::WriteFormat::Parquet)
        .single_file()
        .compression(volley::Compression::None)
        .run()
        .unwrap();
    assert!(summary.bytes > 16 << 20, "{} bytes", summary.bytes);
    let back = c.read_parquet("s3://volley/big.parquet").unwrap();
    assert_eq!(
        sum_ids(&back.collect().unwrap()),
        (0..2_000_000i64).sum::<i64>()
    );

    // Hive folders of values that need escaping read back as written.
    let tagged = c
        .range(30)
        .sql(
            "t",
            "SELECT id, CASE id % 5 WHEN 0 THEN 'a/b' WHEN 1 THEN 'x:y' WHEN 2 THEN '50%' \
             WHEN 3 THEN 'a\"b' ELSE '[x]*|' END AS tag FROM t",
        )
        .unwrap();
    tagged
        .write("s3://volley/tags", volley::WriteFormat::Parquet)
        .partition_by(&["tag"])
        .run()
        .unwrap();
    let tags = c
        .read_parquet("s3://volley/tags/")
        .unwrap()
        .sql(
            "t",
            "SELECT tag, count(*) AS n FROM t GROUP BY tag ORDER BY tag",
        )
        .unwrap()
        .collect_batch()
        .unwrap();
    let tags: Vec<String> = (0..tags.num_rows())
        .map(|r| {
            let cell = |c: usize| {
                volley::arrow::util::display::array_value_to_string(tags.column(c), r).unwrap()
            };
            format!("{}={}", cell(0), cell(1))
        })
        .collect();
    assert_eq!(tags, ["50%=6", "[x]*|=6", "a\"b=6", "a/b=6", "x:y=6"]);
    for tag in ["50%", "a/b", "x:y", "a\"b", "[x]*|"] {
        let back = c.read_parquet("s3://volley/tags/").unwrap();
        let matching = back.filter(col("tag").eq(lit(tag))).unwrap();
        assert_eq!(matching.count().unwrap(), 6, "{tag}");
    }

    // An overwrite: the new files replace the old ones, and the old ones no new file
    // replaced go.
    c.range(10)
        .write("s3://volley/data/numbers", volley::WriteFormat::Parquet)
        .mode(WriteMode::Overwrite)
        .run()
        .unwrap();
    assert_eq!(count("s3://volley/data/numbers/"), 10);
}
