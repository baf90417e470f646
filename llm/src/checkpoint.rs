//! `safetensors` weights of a model folder, single-file or sharded, as f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use volley_common::{Result, VolleyError};

use crate::config::ModelConfig;

/// One weight, widened to f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

/// Every weight a [`ModelConfig`] needs, checked against the shapes it implies.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    tensors: HashMap<String, Tensor>,
}

/// The weight files of a model folder: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| VolleyError::plan(format!("cannot read {}: {e}", index.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| VolleyError::plan(format!("{}: not valid JSON: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| VolleyError::plan(format!("{}: no `weight_map`", index.display())))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(VolleyError::plan(format!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

fn to_f32(file: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => words(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => words(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => words(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(VolleyError::plan(format!(
                "{}: tensor {name} is {other:?} (f32, bf16 and f16 are supported)",
                file.display()
            )))
        }
    })
}

impl Checkpoint {
    /// Loads the weights of the model folder `dir` for `config`. Fails naming the file
    /// and tensor when a weight is missing, has another shape, or another dtype.
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let expected: HashMap<String, Vec<usize>> = config.expected_tensors().into_iter().collect();
        let mut tensors = HashMap::new();
        for file in weight_files(dir)? {
            let bytes = std::fs::read(&file)
                .map_err(|e| VolleyError::plan(format!("cannot read {}: {e}", file.display())))?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| {
                VolleyError::plan(format!(
                    "{}: not a valid safetensors file: {e}",
                    file.display()
                ))
            })?;
            // In name order, so that the first mismatch reported is always the same.
            let mut views = st.tensors();
            views.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, view) in views {
                let Some(shape) = expected.get(&name) else {
                    // A weight of the model's layers that the model here has no place
                    // for (a bias of a projection without one, say) would be dropped
                    // and the outputs silently differ; saved rotary tables are not
                    // weights.
                    if name.starts_with("model.") && !name.contains("rotary_emb.") {
                        return Err(VolleyError::plan(format!(
                            "{}: tensor {name} is not part of volley's {:?} model for this \
                             config.json (a bias or layer it does not implement)",
                            file.display(),
                            config.architecture
                        )));
                    }
                    continue;
                };
                if view.shape() != shape.as_slice() {
                    return Err(VolleyError::plan(format!(
                        "{}: tensor {name} has shape {:?}, but config.json implies {shape:?}",
                        file.display(),
                        view.shape()
                    )));
                }
                let data = to_f32(&file, &name, view.dtype(), view.data())?;
                tensors.insert(
                    name,
                    Tensor {
                        shape: shape.clone(),
                        data,
                    },
                );
            }
        }
        let mut missing: Vec<&String> = expected
            .keys()
            .filter(|k| !tensors.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(VolleyError::plan(format!(
                "{}: {} weight(s) missing, first {}",
                dir.display(),
                missing.len(),
                missing[0]
            )));
        }
        Ok(Self { tensors })
    }

    /// A weight by its Hugging Face name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Takes a weight out (a model built from the checkpoint holds each weight once).
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}
