//! The Llama-family decoder in Burn: embeddings, RMSNorm, rotary embeddings,
//! grouped-query attention over the paged KV cache, SwiGLU MLPs.
//!
//! One forward pass computes a *flattened* batch: the new tokens of every scheduled
//! sequence side by side (`[tokens, hidden]`), so the projections and MLPs, where the
//! time goes, are one matrix product per weight whatever mix of prompt chunks and
//! decode steps the batch holds. Attention is the only part that looks at sequences: it
//! runs per [`AttentionGroup`] (all decode steps together, each prompt chunk alone),
//! reading keys and values from the cache slots the block tables point at.

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{IndexingUpdateOp, TensorData};
use volley_common::{Result, VolleyError};

use crate::checkpoint::Checkpoint;
use crate::config::{ModelConfig, RopeScaling};
use crate::kv_cache::KvCache;
use crate::linear::Linear;

/// Added to the scores of keys a query must not see. Finite, so that a row of padding
/// never divides by zero.
const MASKED: f32 = -1.0e9;

/// One decoder layer's weights.
#[derive(Debug)]
struct Layer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    /// q, k and v projections stacked: one product gives `[n, q + 2 kv]`.
    qkv: Linear<B>,
    qkv_bias: Option<Tensor<B, 1>>,
    o: Linear<B>,
    mlp_norm: Tensor<B, 1>,
    /// Gate and up projections stacked: `[n, 2 intermediate]`.
    gate_up: Linear<B>,
    down: Linear<B>,
}

/// A Llama, Qwen2 or Mistral decoder with its weights on a Burn device.
#[derive(Debug)]
pub struct Model<B: Backend> {
    config: ModelConfig,
    embed: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    norm: Tensor<B, 1>,
    lm_head: Linear<B>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    device: B::Device,
}

/// The queries of one sequence in a forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionSeq {
    /// Row of its first new token in the flattened batch.
    pub first_row: usize,
    /// New tokens (queries).
    pub num_queries: usize,
    /// Cache slots of every token of the sequence so far, in position order, the new
    /// ones included: query `i` sits at position `context.len() - num_queries + i` and
    /// sees the keys up to it.
    pub context: Vec<usize>,
}

/// Sequences whose attention is computed together (padded to the longest).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttentionGroup {
    /// The sequences.
    pub seqs: Vec<AttentionSeq>,
}

/// The work of one forward pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardBatch {
    /// The new tokens of every sequence, side by side.
    pub tokens: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<usize>,
    /// Cache slot that receives each token's key and value.
    pub slots: Vec<usize>,
    /// How attention is grouped; every row belongs to exactly one group.
    pub groups: Vec<AttentionGroup>,
    /// Rows whose logits are wanted, in the order they are returned.
    pub logits_rows: Vec<usize>,
}

/// Inverse frequencies of the rotary embedding, computed in f32 as transformers does.
fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0f32 / (config.rope_theta as f32).powf((2 * i) as f32 / d as f32))
        .collect();
    if let Some(RopeScaling {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    }) = config.rope_scaling
    {
        let orig = original_max_position_embeddings as f64;
        let low_wavelen = orig / low_freq_factor;
        let high_wavelen = orig / high_freq_factor;
        for f in inv.iter_mut() {
            let freq = *f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let scaled = if wavelen > low_wavelen {
                freq / factor
            } else if wavelen < high_wavelen {
                freq
            } else {
                let smooth =
                    (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * freq / factor + smooth * freq
            };
            *f = scaled as f32;
        }
    }
    inv
}

fn int_tensor<B: Backend>(values: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = values.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, [values.len()]), device)
}

impl<B: Backend> Model<B> {
    /// Puts a checkpoint's weights on `device`, taking each out of the checkpoint as it
    /// goes (a weight is not held twice while the model is built).
    pub fn new(config: ModelConfig, mut ck: Checkpoint, device: &B::Device) -> Result<Self> {
        let mut get = |name: &str| {
            ck.take(name)
                .ok_or_else(|| VolleyError::plan(format!("checkpoint lacks {name}")))
        };
        let vec1 = |t: crate::checkpoint::Tensor| -> Tensor<B, 1> {
            let n = t.data.len();
            Tensor::from_data(TensorData::new(t.data, [n]), device)
        };
        // Several `[out, in]` projections stacked into one.
        let fused = |parts: Vec<crate::checkpoint::Tensor>| Linear::new(parts, device);
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}");
            let attn = |w: &str| format!("{p}.self_attn.{w}");
            let qkv_bias = if config.attention_bias {
                Some(Tensor::cat(
                    vec![
                        vec1(get(&attn("q_proj.bias"))?),
                        vec1(get(&attn("k_proj.bias"))?),
                        vec1(get(&attn("v_proj.bias"))?),
                    ],
                    0,
                ))
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vec1(get(&format!("{p}.input_layernorm.weight"))?),
                qkv: fused(vec![
                    get(&attn("q_proj.weight"))?,
                    get(&attn("k_proj.weight"))?,
                    get(&attn("v_proj.weight"))?,
                ]),
                qkv_bias,
                o: fused(vec![get(&attn("o_proj.weight"))?]),
                mlp_norm: vec1(get(&format!("{p}.post_attention_layernorm.weight"))?),
                gate_up: fused(vec![
                    get(&format!("{p}.mlp.gate_proj.weight"))?,
                    get(&format!("{p}.mlp.up_proj.weight"))?,
                ]),
                down: fused(vec![get(&format!("{p}.mlp.down_proj.weight"))?]),
            });
        }
        let embed_w = get("model.embed_tokens.weight")?;
        let lm_head = if config.tie_word_embeddings {
            // Tied: the one weight both looks tokens up and projects to the vocabulary.
            fused(vec![embed_w.clone()])
        } else {
            fused(vec![get("lm_head.weight")?])
        };
        let shape = [embed_w.shape[0], embed_w.shape[1]];
        let embed = Tensor::from_data(TensorData::new(embed_w.data, shape), device);
        let inv = inv_freq(&config);
        let half = inv.len();
        let max_pos = config.max_position_embeddings.max(1);
        let (mut cos, mut sin) = (
            Vec::with_capacity(max_pos * half),
            Vec::with_capacity(max_pos * half),
        );
        for pos in 0..max_pos {
            for f in &inv {
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            norm: vec1(get("model.norm.weight")?),
            cos: Tensor::from_data(TensorData::new(cos, [max_pos, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [max_pos, half]), device),
            config,
            embed,
            layers,
            lm_head,
            device: device.clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    fn rms_norm(&self, x: Tensor<B, 2>, weight: &Tensor<B, 1>) -> Tensor<B, 2> {
        let eps = self.config.rms_norm_eps;
        let scale = x
            .clone()
            .square()
            .mean_dim(1)
            .add_scalar(eps)
            .sqrt()
            .recip();
        x.mul(scale).mul(weight.clone().unsqueeze::<2>())
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`) by the angles of `positions`, pairing
    /// the two halves of each head as transformers' `rotate_half` does.
    fn rope(&self, x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
        let half = self.config.head_dim / 2;
        let x1 = x.clone().narrow(2, 0, half);
        let x2 = x.narrow(2, half, half);
        let a = x1.clone().mul(cos.clone()) - x2.clone().mul(sin.clone());
        let b = x2.mul(cos.clone()) + x1.mul(sin.clone());
        Tensor::cat(vec![a, b], 2)
    }

    /// The attention input of a layer: rotated queries `[n, heads, d]` and keys
    /// `[n, kv_heads, d]`, and values `[n, kv_heads * d]`.
    fn qkv(
        &self,
        layer: &Layer<B>,
        x: &Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 2>) {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (q_dim, kv_dim) = (heads * d, kv_heads * d);
        let n = x.dims()[0];
        let h = self.rms_norm(x.clone(), &layer.attn_norm);
        let mut qkv = layer.qkv.forward(h);
        if let Some(bias) = &layer.qkv_bias {
            qkv = qkv + bias.clone().unsqueeze::<2>();
        }
        let q = qkv.clone().narrow(1, 0, q_dim).reshape([n, heads, d]);
        let k = qkv
            .clone()
            .narrow(1, q_dim, kv_dim)
            .reshape([n, kv_heads, d]);
        let v = qkv.narrow(1, q_dim + kv_dim, kv_dim);
        (self.rope(q, cos, sin), self.rope(k, cos, sin), v)
    }

    /// The rest of a layer once attention is done: output projection, residual,
    /// SwiGLU MLP, residual.
    fn finish_layer(&self, layer: &Layer<B>, x: Tensor<B, 2>, attn: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = x + layer.o.forward(attn);
        let h = self.rms_norm(x.clone(), &layer.mlp_norm);
        let gu = layer.gate_up.forward(h);
        let inter = self.config.intermediate_size;
        let act = silu(gu.clone().narrow(1, 0, inter)).mul(gu.narrow(1, inter, inter));
        x + layer.down.forward(act)
    }

    /// Cosines and sines of the rotary embedding at `positions`, `[n, 1, d / 2]`.
    fn angles(&self, positions: &[usize]) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let pos = int_tensor::<B>(positions, &self.device);
        (
            self.cos
                .clone()
                .select(0, pos.clone())
                .unsqueeze_dim::<3>(1),
            self.sin.clone().select(0, pos).unsqueeze_dim::<3>(1),
        )
    }

    /// Scaled dot-product attention of padded queries over padded keys.
    /// `q`: `[b, heads, qmax, d]`; `k`, `v`: `[b, kv_heads, kmax, d]`; `mask`:
    /// `[b, qmax, kmax]` (0 or [`MASKED`]). Returns `[b, qmax, heads * d]`.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let c = &self.config;
        let [b, heads, qmax, d] = q.dims();
        let kv_heads = c.num_kv_heads;
        let group = heads / kv_heads;
        let kmax = k.dims()[2];
        // Grouped-query attention without copying keys: the query heads that share a
        // key/value head are stacked along the query axis.
        let q = q.reshape([b, kv_heads, group * qmax, d]);
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt())
            .reshape([b, kv_heads, group, qmax, kmax])
            + mask.reshape([b, 1, 1, qmax, kmax]);
        let probs = softmax(scores, 4).reshape([b, kv_heads, group * qmax, kmax]);
        probs
            .matmul(v)
            .reshape([b, heads, qmax, d])
            .swap_dims(1, 2)
            .reshape([b, qmax, heads * d])
    }

    /// Runs one forward pass: writes the new tokens' keys and values into `cache` and
    /// returns the logits of `batch.logits_rows` (`[rows, vocab]`), `None` when no row
    /// is wanted (a pass that only reads prompt chunks).
    pub fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache<B>) -> Option<Tensor<B, 2>> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (q_dim, kv_dim) = (heads * d, kv_heads * d);
        let n = batch.tokens.len();
        let dev = &self.device;

        let tokens: Vec<usize> = batch.tokens.iter().map(|&t| t as usize).collect();
        let mut x = self.embed.clone().select(0, int_tensor::<B>(&tokens, dev));
        let (cos, sin) = self.angles(&batch.positions);
        let slots: Vec<i64> = batch.slots.iter().map(|&s| s as i64).collect();
        let slots = Tensor::<B, 2, Int>::from_data(TensorData::new(slots, [n, 1]), dev);

        // Per group: padded gather indices and the mask, the same for every layer.
        struct GroupPlan<B: Backend> {
            b: usize,
            qmax: usize,
            kmax: usize,
            q_idx: Tensor<B, 1, Int>,
            kv_idx: Tensor<B, 1, Int>,
            mask: Tensor<B, 3>,
        }
        let mut plans = Vec::with_capacity(batch.groups.len());
        // Where each flattened row ends up in the concatenated group outputs.
        let mut back = vec![0usize; n];
        let mut offset = 0;
        for g in &batch.groups {
            let b = g.seqs.len();
            let qmax = g
                .seqs
                .iter()
                .map(|s| s.num_queries)
                .max()
                .unwrap_or(1)
                .max(1);
            let kmax = g
                .seqs
                .iter()
                .map(|s| s.context.len())
                .max()
                .unwrap_or(1)
                .max(1);
            let mut q_idx = vec![0usize; b * qmax];
            let mut kv_idx = vec![0usize; b * kmax];
            let mut mask = vec![MASKED; b * qmax * kmax];
            for (i, s) in g.seqs.iter().enumerate() {
                let start = s.context.len() - s.num_queries;
                for j in 0..s.num_queries {
                    q_idx[i * qmax + j] = s.first_row + j;
                    back[s.first_row + j] = offset + i * qmax + j;
                    let row = &mut mask[(i * qmax + j) * kmax..(i * qmax + j + 1) * kmax];
                    row[..=start + j].fill(0.0);
                }
                // Padding queries see key 0 so that their softmax stays finite.
                for j in s.num_queries..qmax {
                    mask[(i * qmax + j) * kmax] = 0.0;
                }
                kv_idx[i * kmax..i * kmax + s.context.len()].copy_from_slice(&s.context);
            }
            offset += b * qmax;
            plans.push(GroupPlan {
                b,
                qmax,
                kmax,
                q_idx: int_tensor::<B>(&q_idx, dev),
                kv_idx: int_tensor::<B>(&kv_idx, dev),
                mask: Tensor::from_data(TensorData::new(mask, [b, qmax, kmax]), dev),
            });
        }
        let back = int_tensor::<B>(&back, dev);

        for (l, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = self.qkv(layer, &x, &cos, &sin);
            let q = q.reshape([n, q_dim]);
            let (k_cache, v_cache) = cache.take_layer(l);
            let k_cache = k_cache.scatter_nd(
                slots.clone(),
                k.reshape([n, kv_dim]),
                IndexingUpdateOp::Assign,
            );
            let v_cache = v_cache.scatter_nd(slots.clone(), v, IndexingUpdateOp::Assign);

            let mut outs = Vec::with_capacity(plans.len());
            for p in &plans {
                let qg = q
                    .clone()
                    .select(0, p.q_idx.clone())
                    .reshape([p.b, p.qmax, heads, d])
                    .swap_dims(1, 2);
                let gather = |cache: &Tensor<B, 2>| {
                    cache
                        .clone()
                        .select(0, p.kv_idx.clone())
                        .reshape([p.b, p.kmax, kv_heads, d])
                        .swap_dims(1, 2)
                };
                let (kg, vg) = (gather(&k_cache), gather(&v_cache));
                outs.push(
                    self.attend(qg, kg, vg, p.mask.clone())
                        .reshape([p.b * p.qmax, q_dim]),
                );
            }
            cache.put_layer(l, k_cache, v_cache);
            let attn = Tensor::cat(outs, 0).select(0, back.clone());
            x = self.finish_layer(layer, x, attn);
        }
        if batch.logits_rows.is_empty() {
            return None;
        }
        let rows = int_tensor::<B>(&batch.logits_rows, dev);
        let x = self.rms_norm(x.select(0, rows), &self.norm);
        Some(self.lm_head.forward(x))
    }

    /// Logits of every position of `tokens` with a plain causal attention over keys
    /// and values kept in order (no cache): the reference the paged path is tested
    /// against.
    pub fn forward_contiguous(&self, tokens: &[u32]) -> Tensor<B, 2> {
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let q_dim = heads * d;
        let n = tokens.len();
        let dev = &self.device;
        let ids: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
        let mut x = self.embed.clone().select(0, int_tensor::<B>(&ids, dev));
        let positions: Vec<usize> = (0..n).collect();
        let (cos, sin) = self.angles(&positions);
        let mut mask = vec![MASKED; n * n];
        for i in 0..n {
            mask[i * n..i * n + i + 1].fill(0.0);
        }
        let mask = Tensor::<B, 3>::from_data(TensorData::new(mask, [1, n, n]), dev);
        for layer in &self.layers {
            let (q, k, v) = self.qkv(layer, &x, &cos, &sin);
            let q = q.reshape([1, n, heads, d]).swap_dims(1, 2);
            let k = k.reshape([1, n, kv_heads, d]).swap_dims(1, 2);
            let v = v.reshape([1, n, kv_heads, d]).swap_dims(1, 2);
            let attn = self.attend(q, k, v, mask.clone()).reshape([n, q_dim]);
            x = self.finish_layer(layer, x, attn);
        }
        self.lm_head.forward(self.rms_norm(x, &self.norm))
    }
}
