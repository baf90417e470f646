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

/// A dimension goes in the summed header as three digits in this base: sums of small
/// integers stay exact in `f32` (the sum of 3,000,001 over 7 ranks is not).
const DIM_BASE: usize = 1024;

/// Collects, in visit order, a header per float parameter (whether it has a gradient
/// here, its rank and dimensions) and the gradients end to end.
struct Gather<'a> {
    grads: &'a mut GradientsParams,
    header: Vec<f32>,
    shapes: Vec<Vec<usize>>,
    flat: Vec<f32>,
    error: Option<String>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        let grad = self.grads.get::<B::InnerBackend, D>(param.id);
        self.header.push(if grad.is_some() { 1.0 } else { 0.0 });
        self.header.push(D as f32);
        for &d in shape.iter() {
            self.header.push((d % DIM_BASE) as f32);
            self.header.push((d / DIM_BASE % DIM_BASE) as f32);
            self.header.push((d / DIM_BASE / DIM_BASE) as f32);
        }
        self.shapes.push(shape.to_vec());
        match grad {
            Some(g) => match g.into_data().convert::<f32>().into_vec::<f32>() {
                Ok(v) => self.flat.extend_from_slice(&v),
                Err(e) => self.error = Some(format!("reading a gradient: {e:?}")),
            },
            // No gradient here (a frozen parameter, or one outside this step's graph):
            // zeros keep the ranks' buffers aligned.
            None => self.flat.extend(std::iter::repeat_n(0.0, n)),
        }
    }
}

/// Puts the averaged gradients back, in the same order: a parameter no rank has a
/// gradient for stays without one (an optimizer would otherwise step it: weight
/// decay, momentum).
struct Scatter<'a> {
    grads: &'a mut GradientsParams,
    /// Per parameter, the ranks that had a gradient for it.
    holders: Vec<f32>,
    flat: &'a [f32],
    param: usize,
    at: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scatter<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let val = param.val();
        let shape = val.shape();
        let n = shape.num_elements();
        let held = self.holders[self.param] > 0.0;
        self.param += 1;
        let values = &self.flat[self.at..self.at + n];
        self.at += n;
        if held {
            let data = TensorData::new(values.to_vec(), shape);
            let g = Tensor::<B::InnerBackend, D>::from_data(data, &val.device());
            self.grads.register::<B::InnerBackend, D>(param.id, g);
        }
    }
}

/// Replaces `grads` (of `model`) by their average over the ranks of `collective`.
/// Every rank must call it with a model of the same structure: one whose parameters
/// differ in number or shape from another rank's is refused, naming the parameter.
/// A parameter without a gradient on every rank (frozen) keeps none.
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
        header: Vec::new(),
        shapes: Vec::new(),
        flat: Vec::new(),
        error: None,
    };
    model.visit(&mut gather);
    if let Some(e) = gather.error {
        return Err(VolleyError::execution(e));
    }
    let (own, shapes) = (gather.header, gather.shapes);
    // The header goes after the gradients (not copied again). Ranks with models of
    // other sizes pass buffers of other lengths, which the collective refuses.
    let mut buf = gather.flat;
    let values = buf.len();
    buf.extend_from_slice(&own);
    collective.all_reduce_sum(&mut buf)?;
    let rank = collective.rank();
    let w = world as f32;
    // A header value but a holders' count that differs from this rank's on some rank
    // makes its sum differ from `world` times this rank's here or on another rank:
    // every such rank fails, and the others' next call finds them gone.
    let summed = &buf[values..];
    let mut holders = Vec::with_capacity(shapes.len());
    let mut at = 0;
    for (i, shape) in shapes.iter().enumerate() {
        holders.push(summed[at]);
        let fields = 1 + 3 * shape.len();
        let same = (at + 1..at + 1 + fields).all(|j| summed[j] == own[j] * w);
        if !same {
            return Err(VolleyError::execution(format!(
                "averaging gradients: parameter {i} (in the model's visit order) has shape \
                 {shape:?} on rank {rank} and another shape on another rank: every rank must \
                 train the same model"
            )));
        }
        at += 1 + fields;
    }
    let flat = &mut buf[..values];
    let scale = 1.0 / w;
    for v in flat.iter_mut() {
        *v *= scale;
    }
    let mut scatter = Scatter {
        grads: &mut grads,
        holders,
        flat,
        param: 0,
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

    /// Runs `f` on two ranks of a ring; their results.
    fn two_ranks<T: Send + 'static>(
        f: impl Fn(usize, &mut TcpRing) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let ls: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        let ranks: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, f) = (addrs.clone(), f.clone());
                std::thread::spawn(move || {
                    let config = RingConfig {
                        timeout: std::time::Duration::from_secs(5),
                        ..RingConfig::default()
                    };
                    let mut ring = TcpRing::connect(rank, &addrs, l, config).unwrap();
                    f(rank, &mut ring)
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    }

    /// A frozen parameter gets no gradient from the average: with weight decay, an
    /// optimizer would otherwise shrink it on two ranks and not on one.
    #[test]
    fn a_frozen_parameter_stays_without_a_gradient() {
        use burn::optim::decay::WeightDecayConfig;
        let mut model: Linear<B> = LinearConfig::new(3, 2).init(&Default::default());
        model.bias = model.bias.map(|b| b.set_require_grad(false));
        let before = weights(&model);
        let after = two_ranks(move |rank, ring| {
            let (x, y) = batch(rank * 8..rank * 8 + 8);
            let loss = (model.forward(x) - y).square().mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let bias = model.bias.as_ref().unwrap().id;
            let grads = all_reduce_gradients(&model, grads, ring).unwrap();
            assert!(grads.get::<NdArray<f32>, 1>(bias).is_none());
            let sgd = SgdConfig::new().with_weight_decay(Some(WeightDecayConfig::new(0.1)));
            weights(&sgd.init().step(0.1, model.clone(), grads))
        });
        for w in after {
            // The bias (the last two values) did not move; the weights did.
            assert_eq!(w[6..], before[6..]);
            assert_ne!(w[..6], before[..6]);
        }
    }

    /// Ranks whose models differ in a parameter's shape are refused, naming it.
    #[test]
    fn ranks_with_other_models_are_refused() {
        let errors = two_ranks(|rank, ring| {
            // 3 -> 2 on rank 0, 2 -> 3 on rank 1: the same number of values.
            let (i, o) = if rank == 0 { (3, 2) } else { (2, 3) };
            let model: Linear<B> = LinearConfig::new(i, o)
                .with_bias(false)
                .init(&Default::default());
            let x = Tensor::<B, 2>::ones([4, i], &Default::default());
            let grads = GradientsParams::from_grads(model.forward(x).sum().backward(), &model);
            all_reduce_gradients(&model, grads, ring)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        });
        assert!(
            errors[0]
                .contains("parameter 0 (in the model's visit order) has shape [3, 2] on rank 0"),
            "{errors:?}"
        );
        assert!(errors[1].contains("[2, 3] on rank 1"), "{errors:?}");
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
        let ranks = two_ranks(move |rank, ring| {
            let mut m = model.clone();
            for _ in 0..3 {
                m = step(m, rank * 8..rank * 8 + 8, ring);
            }
            weights(&m)
        });
        for w in ranks {
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
