"""W6: run the 22 TPC-H queries (bench/tpch/qNN.sql, qualification parameters) on the
Parquet folders of gen_tpch.sh, with DuckDB or DataFusion-python, reading Parquet directly.

usage: python run_tpch.py duckdb|datafusion [--queries 1,2,...] [--json out.json]
Prints one line per query (seconds, rows, digest of the result rounded to 2 decimals) and a total.
Digests are comparable across engines (same rounding), see common.table_digest.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, table_digest  # noqa: E402

TABLES = ["lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region"]
QDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tpch")


def setup_duckdb():
    import duckdb
    con = duckdb.connect()
    for t in TABLES:
        con.execute(f"create view {t} as select * from read_parquet('{DATA}/{t}/*.parquet')")

    def run(sql):
        return con.sql(sql).to_arrow_table()
    return run


def setup_datafusion():
    from datafusion import SessionContext
    ctx = SessionContext()
    for t in TABLES:
        ctx.register_parquet(t, f"{DATA}/{t}/")

    def run(sql):
        return ctx.sql(sql).to_arrow_table()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["duckdb", "datafusion"])
    ap.add_argument("--queries", default=",".join(str(i) for i in range(1, 23)))
    ap.add_argument("--json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    run = {"duckdb": setup_duckdb, "datafusion": setup_datafusion}[a.engine]()
    setup_s = time.perf_counter() - t0
    res = {"engine": a.engine, "setup_s": setup_s, "queries": {}}
    total = 0.0
    for q in [int(x) for x in a.queries.split(",")]:
        sql = open(f"{QDIR}/q{q:02d}.sql").read()
        t = time.perf_counter()
        try:
            tbl = run(sql)
            s = time.perf_counter() - t
            n, h, _ = table_digest(tbl)
            err = None
        except Exception as e:  # keep going: one failing query must not hide the others
            s, n, h, err = time.perf_counter() - t, -1, "ERROR", f"{type(e).__name__}: {e}"[:300]
        total += s
        res["queries"][q] = {"s": s, "rows": n, "digest": h, "error": err}
        print(f"Q{q:02d} {s:8.3f}s rows={n} digest={h}" + (f" {err}" if err else ""), flush=True)
    res["total_s"] = total
    print(f"RESULT engine={a.engine} workload=w6 elapsed_s={total:.3f} setup_s={setup_s:.3f} "
          f"queries={len(res['queries'])} failed={sum(1 for v in res['queries'].values() if v['error'])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
