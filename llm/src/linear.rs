//! The weight products of the model (`x @ Wᵀ`), on the device or against weights kept
//! in host memory.
//!
//! Burn's `ndarray` backend copies both operands of a matrix product into fresh arrays
//! and packs them again on every call; for decoding, where `x` has a few rows and `W`
//! hundreds of megabytes, that copying is most of the time. On the CPU backend the
//! weights therefore stay in host memory in Hugging Face's `[out, in]` layout and the
//! product runs through the `gemm` crate, reading them in place; only the small
//! activation matrix moves. Other backends keep the weight as a tensor.

use std::any::TypeId;

use burn::prelude::*;
use burn::tensor::TensorData;
use gemm::Parallelism;

/// A projection weight.
#[derive(Debug)]
pub(crate) enum Linear<B: Backend> {
    /// On the device, transposed to `[in, out]` for `x.matmul(w)`.
    Device(Tensor<B, 2>),
    /// In host memory, `[out, in]` row-major.
    Host {
        data: Vec<f32>,
        out: usize,
        inp: usize,
    },
}

/// Whether `B` is the CPU backend, whose tensors live in host memory anyway.
pub(crate) fn host_backend<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<crate::CpuBackend>()
}

impl<B: Backend> Linear<B> {
    /// Several `[out_i, in]` weights (row-major) stacked into one `[sum out_i, in]`
    /// (one weight is taken as it is, not copied).
    pub(crate) fn new(parts: Vec<crate::checkpoint::Tensor>, device: &B::Device) -> Self {
        let inp = parts[0].shape[1];
        let out: usize = parts.iter().map(|p| p.shape[0]).sum();
        let data = if parts.len() == 1 {
            parts.into_iter().next().map(|p| p.data).unwrap_or_default()
        } else {
            let mut data = Vec::with_capacity(out * inp);
            for p in parts {
                data.extend_from_slice(&p.data);
            }
            data
        };
        if host_backend::<B>() {
            return Linear::Host { data, out, inp };
        }
        let mut t = vec![0.0f32; out * inp];
        for r in 0..out {
            for c in 0..inp {
                t[c * out + r] = data[r * inp + c];
            }
        }
        Linear::Device(Tensor::from_data(TensorData::new(t, [inp, out]), device))
    }

    /// `x @ Wᵀ` for `x` of shape `[m, in]`.
    pub(crate) fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Linear::Device(w) => x.matmul(w.clone()),
            Linear::Host { data, out, inp } => {
                let [m, k] = x.dims();
                assert_eq!(k, *inp, "input width of a projection");
                let device = x.device();
                let xs: Vec<f32> = x
                    .into_data()
                    .convert::<f32>()
                    .into_vec()
                    .unwrap_or_else(|e| panic!("reading activations: {e:?}"));
                let y = host_matmul(&xs, m, data, *out, *inp);
                Tensor::from_data(TensorData::new(y, [m, *out]), &device)
            }
        }
    }
}

/// `y[m, out] = x[m, inp] · w[out, inp]ᵀ`, all row-major. The output columns are
/// split between the threads of rayon's pool (each reads its own rows of `w`), which
/// keeps every core busy even for the few rows of a decode step, where `gemm`'s own
/// threading would leave one idle.
fn host_matmul(x: &[f32], m: usize, w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    use rayon::prelude::*;
    assert_eq!(x.len(), m * inp);
    assert_eq!(w.len(), out * inp);
    let threads = rayon::current_num_threads();
    if threads == 1 || m * out * inp < 1 << 20 {
        return gemm_block(x, m, w, out, inp);
    }
    let per = out.div_ceil(threads).next_multiple_of(16);
    let blocks: Vec<(usize, usize)> = (0..out)
        .step_by(per)
        .map(|j| (j, (j + per).min(out)))
        .collect();
    let parts: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|&(j0, j1)| gemm_block(x, m, &w[j0 * inp..j1 * inp], j1 - j0, inp))
        .collect();
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let mut y = vec![0.0f32; m * out];
    for (&(j0, j1), part) in blocks.iter().zip(&parts) {
        let width = j1 - j0;
        for i in 0..m {
            y[i * out + j0..i * out + j1].copy_from_slice(&part[i * width..(i + 1) * width]);
        }
    }
    y
}

/// One `gemm` call on this thread.
fn gemm_block(x: &[f32], m: usize, w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * inp);
    assert_eq!(w.len(), out * inp);
    let mut y = vec![0.0f32; m * out];
    // SAFETY: `gemm` reads `m x inp` values of `x` with row stride `inp` and column
    // stride 1, `inp x out` values of `w` seen as its transpose (row stride 1, column
    // stride `inp`), and writes `m x out` values of `y` with row stride `out`: exactly
    // the lengths asserted above. The three buffers are distinct and outlive the call.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            out,
            inp,
            y.as_mut_ptr(),
            1,
            out as isize,
            false,
            x.as_ptr(),
            1,
            inp as isize,
            w.as_ptr(),
            inp as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_product_matches_a_plain_loop() {
        // Small (one call) and large enough to be split between threads.
        for (m, out, inp) in [(3, 5, 7), (5, 1000, 300)] {
            let x: Vec<f32> = (0..m * inp).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.11).cos()).collect();
            let y = host_matmul(&x, m, &w, out, inp);
            for i in 0..m {
                for j in 0..out {
                    let want: f64 = (0..inp)
                        .map(|k| x[i * inp + k] as f64 * w[j * inp + k] as f64)
                        .sum();
                    assert!(
                        (y[i * out + j] as f64 - want).abs() < 1e-3,
                        "{m}x{out}x{inp}"
                    );
                }
            }
        }
    }
}
