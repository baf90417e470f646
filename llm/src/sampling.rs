//! Choosing the next token from logits: greedy, temperature, top-k, top-p.

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How a request's tokens are chosen and when its generation stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Most new tokens.
    pub max_tokens: usize,
    /// 0 (or below 1e-5) picks the most likely token (greedy); higher flattens the
    /// distribution.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Seed of this request's random choices; the same seed gives the same tokens,
    /// whatever else is in the batch. `None`: derived from the engine's seed.
    pub seed: Option<u64>,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Generation stops at these tokens (besides the model's end-of-sequence tokens).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens (up to `max_tokens`).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Checks the values, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be 0 or more, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }

    /// Greedy at temperature 0 and below 1e-5, as in vLLM: dividing logits by a
    /// temperature that small overflows, and the choice is the greedy one anyway.
    fn is_greedy(&self) -> bool {
        self.temperature < 1e-5 || self.top_k == 1
    }
}

/// Index of the largest value (the first on ties, as `argmax` in PyTorch).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let t = params.temperature;
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / t))
        .collect();
    // Most likely first; ties by token id so that the order is deterministic.
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 && params.top_k < cand.len() {
        cand.truncate(params.top_k);
    }
    let max = cand[0].1;
    let mut total = 0.0f64;
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&(_, l)| {
            let p = ((l - max) as f64).exp();
            total += p;
            p
        })
        .collect();
    for p in probs.iter_mut() {
        *p /= total;
    }
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let sum: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * sum;
    for (i, p) in probs.iter().enumerate() {
        if r < *p {
            return cand[i].0;
        }
        r -= p;
    }
    cand[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [1.0, 3.0, 2.0, 3.0, -1.0];
        let mut rng = StdRng::seed_from_u64(7);
        let greedy = SamplingParams::default();
        assert_eq!(sample(&logits, &greedy, &mut rng), 1, "first of the ties");
        let top2 = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        for _ in 0..200 {
            let t = sample(&logits, &top2, &mut rng);
            assert!(t == 1 || t == 3);
        }
        // top_p small enough to keep one token: always the most likely.
        let top_p = SamplingParams {
            temperature: 1.0,
            top_p: 0.1,
            ..Default::default()
        };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &top_p, &mut rng), 1);
        }
        // A high temperature reaches every token eventually.
        let hot = SamplingParams {
            temperature: 5.0,
            ..Default::default()
        };
        let mut seen = [false; 5];
        for _ in 0..2000 {
            seen[sample(&logits, &hot, &mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        // Same seed, same choices.
        let draw = |seed| {
            let mut r = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample(&logits, &hot, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn bad_params_are_named() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("top_p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("temperature"));
    }
}
