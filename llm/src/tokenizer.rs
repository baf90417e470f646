//! `tokenizer.json`, through the `tokenizers` crate.

use std::path::Path;

use volley_common::{Result, VolleyError};

/// A model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Reads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| VolleyError::plan(format!("cannot load {}: {e}", path.display())))?;
        // A tokenizer saved after tokenizing with truncation or padding keeps them: a
        // long prompt would lose its end (its question, the chat template's assistant
        // header) and a short one gain pad tokens, without a word. Both are off here,
        // as when transformers loads a tokenizer.
        inner
            .with_truncation(None)
            .map_err(|e| VolleyError::plan(format!("{}: {e}", path.display())))?;
        inner.with_padding(None);
        Ok(Self { inner })
    }

    /// Token ids of `text`; with `special`, the tokenizer's own additions (e.g. BOS).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, special)
            .map_err(|e| VolleyError::execution(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`; with `skip_special`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| VolleyError::execution(format!("detokenizing: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token, e.g. `</s>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
