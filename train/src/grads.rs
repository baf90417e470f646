//! Averaging a Burn model's gradients across ranks.
//!
//! Every rank visits the model's parameters in the same order (the module's structure
//! is the same everywhere; parameter ids are not, so they are not used to match), lays
//! their gradients end to end in one buffer, sums the buffer with the group's
//! [`Collective`] and divides by the number of ranks. After that every rank applies the
//! same update, so the replicas stay equal: with per-rank batches of `b`, a step is the
//! step one process would take on the `world * b` rows together.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use volley_common::{Result, VolleyError};

use crate::collective::Collective;

/// Collects the gradients of every float parameter, in visit order.
struct Gather<'a> {
    grads: &'a mut GradientsParams,
    flat: Vec<f32>,
    error: Option<String>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        match self.grads.get::<B::InnerBackend, D>(param.id) {
            Some(g) => match g.into_data().convert::<f32>().into_vec::<f32>() {
                Ok(v) => self.flat.extend_from_slice(&v),
                Err(e) => self.error = Some(format!("reading a gradient: {e:?}")),
            },
            // No gradient here (a parameter outside this step's graph): zeros keep the
            // ranks' buffers aligned.
            None => self.flat.extend(std::iter::repeat_n(0.0, n)),
        }
    }
}

/// Puts the averaged gradients back, in the same order.
struct Scatter<'a> {
    grads: &'a mut GradientsParams,
    flat: &'a [f32],
    at: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scatter<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let val = param.val();
        let shape = val.shape();
        let n = shape.num_elements();
        let data = TensorData::new(self.flat[self.at..self.at + n].to_vec(), shape);
        self.at += n;
        let g = Tensor::<B::InnerBackend, D>::from_data(data, &val.device());
        self.grads.register::<B::InnerBackend, D>(param.id, g);
    }
}

/// Replaces `grads` (of `model`) by their average over the ranks of `collective`.
/// Every rank must call it with the same model structure.
pub fn all_reduce_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    mut grads: GradientsParams,
    collective: &mut dyn Collective,
) -> Result<GradientsParams> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(grads);
    }
    let mut gather = Gather {
        grads: &mut grads,
        flat: Vec::new(),
        error: None,
    };
    model.visit(&mut gather);
    if let Some(e) = gather.error {
        return Err(VolleyError::execution(e));
    }
    let mut flat = gather.flat;
    collective.all_reduce_sum(&mut flat)?;
    let scale = 1.0 / world as f32;
    for v in flat.iter_mut() {
        *v *= scale;
    }
    let mut scatter = Scatter {
        grads: &mut grads,
        flat: &flat,
        at: 0,
    };
    model.visit(&mut scatter);
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{GradientsParams, Optimizer, SgdConfig};

    use super::*;
    use crate::collective::{RingConfig, TcpRing};

    type B = Autodiff<NdArray<f32>>;

    fn batch(rows: std::ops::Range<usize>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let dev = Default::default();
        let x: Vec<f32> = rows
            .clone()
            .flat_map(|r| (0..3).map(move |c| ((r * 3 + c) as f32 * 0.37).sin()))
            .collect();
        let y: Vec<f32> = rows
            .clone()
            .flat_map(|r| (0..2).map(move |c| ((r * 2 + c) as f32 * 0.11).cos()))
            .collect();
        let n = rows.len();
        (
            Tensor::from_data(TensorData::new(x, [n, 3]), &dev),
            Tensor::from_data(TensorData::new(y, [n, 2]), &dev),
        )
    }

    /// One SGD step on `rows` (mean squared error), gradients averaged over `ring`.
    fn step(
        model: Linear<B>,
        rows: std::ops::Range<usize>,
        ring: &mut dyn Collective,
    ) -> Linear<B> {
        let (x, y) = batch(rows);
        let loss = (model.forward(x) - y).square().mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let grads = all_reduce_gradients(&model, grads, ring).unwrap();
        SgdConfig::new().init().step(0.1, model, grads)
    }

    fn weights(m: &Linear<B>) -> Vec<f32> {
        let mut w = m.weight.val().into_data().into_vec::<f32>().unwrap();
        w.extend(
            m.bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .into_vec::<f32>()
                .unwrap(),
        );
        w
    }

    /// Two ranks with 8 rows each take the step one rank takes with the 16 rows.
    #[test]
    fn two_ranks_step_like_one_rank_on_both_batches() {
        let model: Linear<B> = LinearConfig::new(3, 2).init(&Default::default());
        // Burn initializes parameters lazily: read them once so that every clone below
        // holds the same values.
        let before = weights(&model);
        let single = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addrs = [l.local_addr().unwrap()];
            let mut ring = TcpRing::connect(0, &addrs, l, RingConfig::default()).unwrap();
            let mut m = model.clone();
            for _ in 0..3 {
                m = step(m, 0..16, &mut ring);
            }
            weights(&m)
        };
        let ls: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let ranks: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, mut m) = (addrs.clone(), model.clone());
                std::thread::spawn(move || {
                    let mut ring =
                        TcpRing::connect(rank, &addrs, l, RingConfig::default()).unwrap();
                    for _ in 0..3 {
                        m = step(m, rank * 8..rank * 8 + 8, &mut ring);
                    }
                    weights(&m)
                })
            })
            .collect();
        for r in ranks {
            let w = r.join().unwrap();
            let d = w
                .iter()
                .zip(&single)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-6, "ranks differ from one process by {d}");
            let moved = w
                .iter()
                .zip(&before)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(moved > 1e-3, "the steps changed the weights");
        }
    }
}
