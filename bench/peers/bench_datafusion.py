"""DataFusion-python versions of W1-W4 (SQL). usage: python bench_datafusion.py w1|w2|w3|w4"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import pyarrow as pa  # noqa: E402
from datafusion import SessionContext, udf  # noqa: E402

E = "datafusion"
Q1 = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tpch", "q01.sql")).read()


def ctx():
    c = SessionContext()
    c.register_parquet("lineitem", f"{C.LINEITEM_DIR}/")
    return c


def w1():
    out = C.out_dir(E, "w1")
    c = ctx()
    with C.Timer() as t:
        df = c.sql(f"""
            select {', '.join(C.W1_COLS)}, l_extendedprice * (1 - l_discount) as disc_price
            from lineitem
            where l_shipdate <= date '{C.W1_SHIPDATE_MAX}' and l_quantity < {C.W1_QTY_LT}""")
        df.write_parquet(out, compression="snappy")
    C.report(E, "w1", t.s, **C.check_w1(out))


def w2():
    c = ctx()
    with C.Timer() as t:
        tbl = c.sql(Q1).to_arrow_table()
    C.report(E, "w2", t.s, **C.q1_digest(tbl))


def w3():
    c = ctx()
    calls = [0]

    def mix(a, b, d):  # vectorised: pyarrow arrays in, pyarrow array out, once per record batch
        calls[0] += 1
        return pa.array(C.mix3(a.to_numpy(), b.to_numpy(), d.to_numpy()))

    c.register_udf(udf(mix, [pa.int64()] * 3, pa.int64(), "immutable", name="mix3"))
    with C.Timer() as t:
        r = c.sql("select count(*) as n, sum(h) as s from "
                  "(select mix3(l_orderkey, l_partkey, l_suppkey) as h from lineitem)").to_pylist()[0]
    C.report(E, "w3", t.s, rows=r["n"], sum_h=r["s"], udf_calls=calls[0])


def w4():
    out = C.out_dir(E, "w4")
    c = ctx()
    # By default DataFusion spreads a write over >= 4 files round-robin, which loses the global
    # order of a sorted stream; one output file keeps it.
    c.sql("set datafusion.execution.minimum_parallel_output_files = 1").collect()
    with C.Timer() as t:
        c.sql("select * from lineitem order by l_extendedprice").write_parquet(out, compression="snappy")
    C.report(E, "w4", t.s, **C.check_w4(out))


if __name__ == "__main__":
    globals()[sys.argv[1]]()
