//! Passes the first `n` rows, then cancels its input: everything upstream stops.

use std::sync::Arc;

use volley_common::Result;
use volley_runtime::ResourceRequest;

use super::{Operator, StepContext};
use crate::queue::BlockQueue;
use crate::stats::OpCounters;

pub(crate) struct LimitOp {
    input: Arc<BlockQueue>,
    n: usize,
    spawned: bool,
}

impl LimitOp {
    pub(crate) fn new(input: Arc<BlockQueue>, n: usize) -> Self {
        Self {
            input,
            n,
            spawned: false,
        }
    }
}

impl Operator for LimitOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        if !self.spawned && !cx.stopping {
            let (input, out, n, counters) = (
                Arc::clone(&self.input),
                Arc::clone(cx.out),
                self.n,
                Arc::clone(cx.counters),
            );
            let seq = cx.seqs.base;
            cx.out.register(seq);
            self.spawned = cx.spawn(cx.name.to_string(), ResourceRequest::default(), move || {
                let r = run_limit(&input, &out, n, seq, &counters);
                out.finish_seq(seq);
                r
            });
        }
        self.spawned || cx.stopping
    }
}

fn run_limit(
    input: &BlockQueue,
    out: &BlockQueue,
    n: usize,
    seq: u64,
    counters: &OpCounters,
) -> Result<()> {
    let mut left = n;
    while left > 0 {
        match input.pop_block()? {
            // A whole block passes as it is (a cluster object stays where it is).
            Some(b) if b.rows() <= left => {
                left -= b.rows();
                counters.output(b.rows(), b.bytes() as usize);
                out.push_block(seq, b)?;
            }
            Some(b) => {
                let b = input.resolve(b)?.slice(0, left);
                left = 0;
                counters.output(b.num_rows(), volley_common::batch_memory(&b) as usize);
                out.push(seq, b)?;
            }
            None => break,
        }
    }
    // Enough: everything upstream stops.
    input.cancel();
    Ok(())
}
