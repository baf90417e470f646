"""DuckDB versions of W1-W4. usage: python bench_duckdb.py w1|w2|w3|w4"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

E = "duckdb"
SRC = f"read_parquet('{C.LINEITEM_GLOB}')"
Q1 = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tpch", "q01.sql")).read()


def w1():
    out = C.out_dir(E, "w1")
    con = duckdb.connect()
    with C.Timer() as t:
        con.execute(f"""
            copy (
              select {', '.join(C.W1_COLS)}, l_extendedprice * (1 - l_discount) as disc_price
              from {SRC}
              where l_shipdate <= date '{C.W1_SHIPDATE_MAX}' and l_quantity < {C.W1_QTY_LT}
            ) to '{out}/part.parquet' (format parquet, compression snappy)""")
    C.report(E, "w1", t.s, **C.check_w1(out))


def w2():
    con = duckdb.connect()
    with C.Timer() as t:
        tbl = con.sql(Q1.replace("lineitem", SRC, 1)).to_arrow_table()
    C.report(E, "w2", t.s, **C.q1_digest(tbl))


def w3():
    con = duckdb.connect()

    def mix(a, b, c):  # vectorised Arrow UDF: called once per DuckDB vector batch
        return pa.array(C.mix3(a.to_numpy(), b.to_numpy(), c.to_numpy()))

    con.create_function("mix3", mix, [duckdb.sqltype("BIGINT")] * 3, duckdb.sqltype("BIGINT"),
                        type="arrow")
    with C.Timer() as t:
        n, s = con.execute(f"select count(*), sum(h) from (select mix3(l_orderkey, l_partkey, l_suppkey) as h "
                       f"from {SRC})").fetchone()
    C.report(E, "w3", t.s, rows=n, sum_h=int(s))


def w4():
    out = C.out_dir(E, "w4")
    con = duckdb.connect()
    with C.Timer() as t:
        con.execute(f"copy (select * from {SRC} order by l_extendedprice) to '{out}/part.parquet' (format parquet, compression snappy)")
    C.report(E, "w4", t.s, **C.check_w4(out))


if __name__ == "__main__":
    globals()[sys.argv[1]]()
