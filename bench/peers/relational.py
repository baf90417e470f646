"""Peers' side of volley's group-by and join workloads (W7, W8, W9) on TPC-H Parquet.

usage: python relational.py duckdb|polars|datafusion|ray w7|w8|w9

W7: lineitem grouped by l_suppkey: count(*), sum(l_quantity), avg(l_extendedprice),
    max(l_discount); checksum: groups, sum of the counts, sum of sum(l_quantity).
W8: lineitem JOIN orders ON l_orderkey = o_orderkey: rows, sum(l_extendedprice),
    sum(o_totalprice) over the joined rows.
W9: lineitem JOIN supplier ON l_suppkey = s_suppkey (a small right side): rows,
    sum(l_extendedprice), sum(s_acctbal) over the joined rows.

Data: $TPCH_DIR/<table>/*.parquet (gen_tpch.sh); Ray reads $RAY_TPCH_DIR (a copy with plain
strings, make_utf8_copy.py with tables lineitem,orders). Prints
RESULT engine=... workload=... elapsed_s=... <checksums>, as the other peers do.
"""
import os
import sys
import time

DATA = os.environ.get("TPCH_DIR", "/tmp/tpch-sf1")
RAY_DATA = os.environ.get("RAY_TPCH_DIR", DATA + "-utf8")


def report(engine, workload, elapsed, **fields):
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"RESULT engine={engine} workload={workload} elapsed_s={elapsed:.3f} {extra}", flush=True)


W7_SQL = """SELECT l_suppkey, count(*) AS n, sum(l_quantity) AS q, avg(l_extendedprice) AS p,
                   max(l_discount) AS d
            FROM lineitem GROUP BY l_suppkey"""
W7_TOTALS = "SELECT count(*), sum(n), sum(q) FROM w7"
W8_SQL = """SELECT count(*), sum(l_extendedprice), sum(o_totalprice)
            FROM lineitem JOIN orders ON l_orderkey = o_orderkey"""
W9_SQL = """SELECT count(*), sum(l_extendedprice), sum(s_acctbal)
            FROM lineitem JOIN supplier ON l_suppkey = s_suppkey"""


def w7_fields(groups, n, q):
    return dict(groups=int(groups), rows=int(n), sum_qty=f"{float(q):.2f}")


def w8_fields(rows, price, total):
    return dict(rows=int(rows), sum_price=f"{float(price):.2f}", sum_total=f"{float(total):.2f}")


def duckdb_run(w):
    import duckdb
    con = duckdb.connect()
    for t in ("lineitem", "orders", "supplier"):
        con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{DATA}/{t}/*.parquet')")
    t0 = time.perf_counter()
    if w == "w7":
        con.execute(f"CREATE TEMP TABLE w7 AS {W7_SQL}")
        fields = w7_fields(*con.sql(W7_TOTALS).fetchall()[0])
    else:
        fields = w8_fields(*con.sql(W9_SQL if w == "w9" else W8_SQL).fetchall()[0])
    return time.perf_counter() - t0, fields


def datafusion_run(w):
    from datafusion import SessionContext
    ctx = SessionContext()
    for t in ("lineitem", "orders", "supplier"):
        ctx.register_parquet(t, f"{DATA}/{t}/")
    t0 = time.perf_counter()
    if w == "w7":
        tbl = ctx.sql(W7_SQL).to_arrow_table()
        fields = w7_fields(tbl.num_rows, sum(tbl["n"].to_pylist()),
                           sum(float(x) for x in tbl["q"].to_pylist()))
    else:
        row = ctx.sql(W9_SQL if w == "w9" else W8_SQL).to_arrow_table().to_pylist()[0]
        fields = w8_fields(*row.values())
    return time.perf_counter() - t0, fields


def polars_run(w):
    import polars as pl
    li = pl.scan_parquet(f"{DATA}/lineitem/*.parquet")
    t0 = time.perf_counter()
    if w == "w7":
        df = (li.group_by("l_suppkey")
              .agg(pl.len().alias("n"), pl.col("l_quantity").sum().alias("q"),
                   pl.col("l_extendedprice").mean().alias("p"), pl.col("l_discount").max().alias("d"))
              .collect(engine="streaming"))
        fields = w7_fields(df.height, df["n"].sum(), df["q"].cast(pl.Float64).sum())
    else:
        key, table, right_key, total = (("l_suppkey", "supplier", "s_suppkey", "s_acctbal") if w == "w9"
                                        else ("l_orderkey", "orders", "o_orderkey", "o_totalprice"))
        right = pl.scan_parquet(f"{DATA}/{table}/*.parquet")
        df = (li.select(key, "l_extendedprice")
              .join(right.select(right_key, total), left_on=key, right_on=right_key)
              .select(pl.len().alias("n"), pl.col("l_extendedprice").cast(pl.Float64).sum().alias("p"),
                      pl.col(total).cast(pl.Float64).sum().alias("t"))
              .collect(engine="streaming"))
        fields = w8_fields(df["n"][0], df["p"][0], df["t"][0])
    return time.perf_counter() - t0, fields


def ray_run(w):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data
    from ray.data.aggregate import Count, Max, Mean, Sum
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    t0 = time.perf_counter()
    li = ray.data.read_parquet(f"{RAY_DATA}/lineitem")
    if w == "w7":
        rows = (li.select_columns(["l_suppkey", "l_quantity", "l_extendedprice", "l_discount"])
                .groupby("l_suppkey")
                .aggregate(Count(alias_name="n"), Sum("l_quantity", alias_name="q"),
                           Mean("l_extendedprice", alias_name="p"), Max("l_discount", alias_name="d"))
                .take_all())
        fields = w7_fields(len(rows), sum(r["n"] for r in rows), sum(float(r["q"]) for r in rows))
    elif w == "w8":
        orders = ray.data.read_parquet(f"{RAY_DATA}/orders").select_columns(["o_orderkey", "o_totalprice"])
        joined = (li.select_columns(["l_orderkey", "l_extendedprice"])
                  .join(orders, join_type="inner", num_partitions=32, on=("l_orderkey",),
                        right_on=("o_orderkey",)))
        r = joined.aggregate(Count(alias_name="n"), Sum("l_extendedprice", alias_name="p"),
                             Sum("o_totalprice", alias_name="t"))
        fields = w8_fields(r["n"], r["p"], r["t"])
    else:
        supplier = ray.data.read_parquet(f"{RAY_DATA}/supplier").select_columns(["s_suppkey", "s_acctbal"])
        joined = (li.select_columns(["l_suppkey", "l_extendedprice"])
                  .join(supplier, join_type="inner", num_partitions=32, on=("l_suppkey",),
                        right_on=("s_suppkey",)))
        r = joined.aggregate(Count(alias_name="n"), Sum("l_extendedprice", alias_name="p"),
                             Sum("s_acctbal", alias_name="t"))
        fields = w8_fields(r["n"], r["p"], r["t"])
    elapsed = time.perf_counter() - t0
    ray.shutdown()
    return elapsed, fields


if __name__ == "__main__":
    engine, workload = sys.argv[1], sys.argv[2]
    run = {"duckdb": duckdb_run, "datafusion": datafusion_run, "polars": polars_run, "ray": ray_run}[engine]
    elapsed, fields = run(workload)
    report(engine, workload, elapsed, **fields)
