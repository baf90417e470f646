//! The generation engine: continuous batching over the paged KV cache.
//!
//! Every [`step`](Engine::step) schedules work for one forward pass under a token
//! budget: first one token for each running sequence that is decoding (or the next
//! chunk of a prompt still being read), then new requests from the queue, as long as
//! there are blocks for them. Sequences join and leave the batch at every step. A
//! request whose prompt starts with blocks already in the prefix cache starts after
//! them. When a running sequence needs a block and none is left, the most recently
//! admitted sequence is preempted: its blocks are released and it goes back to the
//! front of the queue, to be recomputed (prompt and tokens so far) when there is room.

use std::collections::VecDeque;
use std::path::Path;

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use volley_common::{Result, VolleyError};

use crate::chat::{ChatTemplate, Message};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::kv_cache::{BlockId, BlockManager, KvCache, PrefixCacheStats};
use crate::model::{AttentionGroup, AttentionSeq, ForwardBatch, Model};
use crate::sampling::{sample, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Sizes and switches of an [`Engine`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Bytes of KV cache (keys and values of all layers); the number of blocks follows.
    pub kv_cache_memory: u64,
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (long prompts are read in chunks of at most
    /// this).
    pub max_batched_tokens: usize,
    /// Share the KV blocks of common prompt prefixes between requests.
    pub prefix_caching: bool,
    /// Seed of requests that bring none (each request gets `seed + its id`).
    pub seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_memory: 512 << 20,
            max_num_seqs: 64,
            max_batched_tokens: 1024,
            prefix_caching: true,
            seed: 0,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// An end-of-sequence token of the model.
    Eos,
    /// One of the request's stop tokens.
    StopToken(u32),
    /// One of the request's stop strings (the text ends before it).
    StopString(String),
}

impl FinishReason {
    /// `length` or `stop`, as OpenAI-style APIs say.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            _ => "stop",
        }
    }
}

/// A finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// What [`Engine::add_request`] returned.
    pub id: u64,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Generated tokens, the one that stopped generation included.
    pub tokens: Vec<u32>,
    /// Generated text (without the stop token or string), when the engine has a
    /// tokenizer.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Counters since the engine was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Forward passes.
    pub steps: u64,
    /// Tokens run through the model (prompts, generated tokens, recomputation after
    /// preemption).
    pub computed_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Prompt tokens skipped thanks to the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Sequences preempted for lack of blocks.
    pub preemptions: u64,
    /// Prefix-cache counters.
    pub prefix_cache: PrefixCacheStats,
}

#[derive(Debug)]
struct Sequence {
    id: u64,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<BlockId>,
    /// Leading full blocks registered in (or found in) the prefix cache, and the hash
    /// of the last of them.
    hashed_blocks: usize,
    last_hash: u64,
    params: SamplingParams,
    rng: StdRng,
    finish: Option<FinishReason>,
    /// Generated text so far, kept only when the request has stop strings.
    text: String,
}

impl Sequence {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// Generates text with a [`Model`] for many requests at once.
#[derive(Debug)]
pub struct Engine<B: Backend> {
    model: Model<B>,
    cache: KvCache<B>,
    blocks: BlockManager,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_id: u64,
    stats: EngineStats,
}

impl<B: Backend> Engine<B> {
    /// Loads a Hugging Face model folder (`config.json`, safetensors weights,
    /// `tokenizer.json`, and the chat template of `tokenizer_config.json` if any).
    pub fn load(dir: &Path, config: EngineConfig, device: &B::Device) -> Result<Self> {
        let model_config = ModelConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::load(dir, &model_config)?;
        let model = Model::new(model_config, checkpoint, device)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(VolleyError::plan(format!(
                "{}: tokenizer.json has {} tokens, more than the model's vocab_size {}",
                dir.display(),
                tokenizer.vocab_size(),
                model.config().vocab_size
            )));
        }
        let mut engine = Self::new(model, Some(tokenizer), config)?;
        engine.chat_template = ChatTemplate::from_dir(dir)?;
        Ok(engine)
    }

    /// An engine over a model already on its device.
    pub fn new(
        model: Model<B>,
        tokenizer: Option<Tokenizer>,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.block_size == 0 || config.max_num_seqs == 0 || config.max_batched_tokens == 0 {
            return Err(VolleyError::plan(
                "engine config: block_size, max_num_seqs and max_batched_tokens must be at least 1",
            ));
        }
        let per_block = KvCache::<B>::bytes_per_block(model.config(), config.block_size) as u64;
        let num_blocks = (config.kv_cache_memory / per_block) as usize;
        if num_blocks < 2 {
            return Err(VolleyError::plan(format!(
                "engine config: kv_cache_memory {} B holds {num_blocks} block(s) of {} tokens \
                 ({per_block} B each); give at least {} B",
                config.kv_cache_memory,
                config.block_size,
                per_block.saturating_mul(2)
            )));
        }
        let cache = KvCache::new(
            model.config(),
            num_blocks,
            config.block_size,
            model.device(),
        );
        Ok(Self {
            blocks: BlockManager::new(num_blocks, config.block_size, config.prefix_caching),
            model,
            cache,
            tokenizer,
            chat_template: None,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: EngineStats::default(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    /// The tokenizer, if the engine has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Counters so far.
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats;
        s.prefix_cache = self.blocks.stats();
        s
    }

    /// Blocks in the KV cache.
    pub fn num_blocks(&self) -> usize {
        self.blocks.num_blocks()
    }

    /// Token ids of a prompt (with the tokenizer's special tokens, e.g. BOS).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| VolleyError::plan("this engine has no tokenizer"))?
            .encode(prompt, true)
    }

    /// Token ids of a chat rendered with the model's template (with the prompt for the
    /// assistant's turn).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            VolleyError::plan(
                "the model has no chat template (neither chat_template.jinja nor a \
                 `chat_template` in tokenizer_config.json)",
            )
        })?;
        let text = template.render(messages, true)?;
        // The template writes the BOS token itself.
        self.tokenizer
            .as_ref()
            .ok_or_else(|| VolleyError::plan("this engine has no tokenizer"))?
            .encode(&text, false)
    }

    /// Queues a request; it joins the running batch at a coming step.
    pub fn add_request(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<u64> {
        params
            .validate()
            .map_err(|e| VolleyError::plan(format!("sampling parameters: {e}")))?;
        if !params.stop.is_empty() && self.tokenizer.is_none() {
            // Refused here, not found out in the middle of a step.
            return Err(VolleyError::plan(
                "stop strings need an engine with a tokenizer",
            ));
        }
        let c = self.model.config();
        if prompt.is_empty() {
            return Err(VolleyError::plan("empty prompt"));
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(VolleyError::plan(format!(
                "prompt token {t} is outside the vocabulary ({} tokens)",
                c.vocab_size
            )));
        }
        let longest = prompt.len().saturating_add(params.max_tokens);
        if longest > c.max_position_embeddings {
            return Err(VolleyError::plan(format!(
                "prompt of {} tokens + max_tokens {} exceeds the model's context of {} tokens",
                prompt.len(),
                params.max_tokens,
                c.max_position_embeddings
            )));
        }
        if let Some(window) = c.sliding_window.filter(|&w| longest > w) {
            return Err(VolleyError::plan(format!(
                "prompt of {} tokens + max_tokens {} exceeds the model's sliding attention \
                 window of {window} tokens (sliding-window attention is not implemented)",
                prompt.len(),
                params.max_tokens
            )));
        }
        let need = longest.div_ceil(self.config.block_size);
        if need > self.blocks.num_blocks() {
            return Err(VolleyError::plan(format!(
                "a sequence of {longest} tokens needs {need} KV-cache blocks, the cache has {} \
                 (raise kv_cache_memory)",
                self.blocks.num_blocks()
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let seed = params.seed.unwrap_or(self.config.seed.wrapping_add(id));
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            hashed_blocks: 0,
            last_hash: 0,
            rng: StdRng::seed_from_u64(seed),
            params,
            finish: None,
            text: String::new(),
        });
        Ok(id)
    }

    /// Whether requests are waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Drops every waiting and running request and starts the block pool afresh: a
    /// step that failed midway may have dropped sequences without giving their blocks
    /// back, and an engine that lives on (a cluster actor's) must not lose them.
    pub fn clear(&mut self) {
        self.waiting.clear();
        self.running.clear();
        self.blocks = BlockManager::new(
            self.blocks.num_blocks(),
            self.config.block_size,
            self.config.prefix_caching,
        );
    }

    /// Requests in the running batch.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests queued and not yet in the running batch.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Drops the requests `ids` (waiting or running; their blocks go back to the pool),
    /// leaving every other request as it was.
    pub fn cancel(&mut self, ids: &[u64]) {
        let drop: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let (gone_waiting, waiting): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|seq| drop.contains(&seq.id));
        let (gone_running, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|seq| drop.contains(&seq.id));
        (self.waiting, self.running) = (waiting, running);
        let gone = gone_waiting.into_iter().chain(gone_running);
        for mut seq in gone {
            self.release_blocks(&mut seq);
        }
    }

    /// Runs requests to completion; the generations come back in request order.
    pub fn generate(
        &mut self,
        requests: Vec<(Vec<u32>, SamplingParams)>,
    ) -> Result<Vec<Generation>> {
        let mut ids = Vec::with_capacity(requests.len());
        for (prompt, params) in requests {
            match self.add_request(prompt, params) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    self.clear();
                    return Err(e);
                }
            }
        }
        let mut done = self.run_to_completion()?;
        ids.iter()
            .map(|id| {
                done.remove(id)
                    .ok_or_else(|| VolleyError::execution(format!("request {id} did not finish")))
            })
            .collect()
    }

    /// Steps until every queued request has finished; the generations by request id.
    /// On an error nothing stays queued.
    pub fn run_to_completion(&mut self) -> Result<std::collections::BTreeMap<u64, Generation>> {
        let mut done = std::collections::BTreeMap::new();
        while self.has_unfinished() {
            match self.step() {
                Ok(finished) => done.extend(finished.into_iter().map(|g| (g.id, g))),
                Err(e) => {
                    self.clear();
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    fn release_blocks(&mut self, seq: &mut Sequence) {
        // Last blocks first, so that a prefix's tail is evicted before its head.
        for &b in seq.blocks.iter().rev() {
            self.blocks.release(b);
        }
        seq.blocks.clear();
        seq.hashed_blocks = 0;
        seq.last_hash = 0;
        seq.computed = 0;
    }

    /// Reuses cached blocks for the start of a newly admitted sequence. The last
    /// prompt token is always computed, since its logits choose the first new token.
    fn match_prefix(&mut self, seq: &mut Sequence) {
        let bs = self.config.block_size;
        let full = (seq.tokens.len() - 1) / bs;
        for i in 0..full {
            match self
                .blocks
                .lookup(seq.last_hash, &seq.tokens[i * bs..(i + 1) * bs])
            {
                Some((block, hash)) => {
                    seq.blocks.push(block);
                    seq.last_hash = hash;
                    seq.hashed_blocks += 1;
                }
                None => break,
            }
        }
        seq.computed = seq.blocks.len() * bs;
    }

    /// Gives `seq` the blocks for `n` more tokens; `false` if there are not enough.
    fn grow(&mut self, seq: &mut Sequence, n: usize) -> bool {
        let need = (seq.computed + n).div_ceil(self.config.block_size);
        let more = need.saturating_sub(seq.blocks.len());
        if more > self.blocks.available() {
            return false;
        }
        for _ in 0..more {
            match self.blocks.allocate() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    fn preempt(&mut self, mut seq: Sequence) {
        self.release_blocks(&mut seq);
        self.stats.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// One forward pass for the scheduled work; returns the requests that finished.
    pub fn step(&mut self) -> Result<Vec<Generation>> {
        let mut budget = self.config.max_batched_tokens;
        // (sequence, new tokens) in batch order.
        let mut batch: Vec<(Sequence, usize)> = Vec::new();
        let mut running = std::mem::take(&mut self.running);
        let mut preempted = false;
        // Running sequences first, oldest first; the newest give way when blocks run out.
        let mut queue: VecDeque<Sequence> = running.drain(..).collect();
        while let Some(mut seq) = queue.pop_front() {
            let n = (seq.tokens.len() - seq.computed).min(budget);
            if n == 0 {
                running.push(seq);
                continue;
            }
            loop {
                if self.grow(&mut seq, n) {
                    budget -= n;
                    batch.push((seq, n));
                    break;
                }
                preempted = true;
                match queue.pop_back() {
                    Some(victim) => self.preempt(victim),
                    None => {
                        self.preempt(seq);
                        break;
                    }
                }
            }
        }
        // Then new requests, while there is budget, room in the batch and blocks.
        while !preempted && budget > 0 && batch.len() + running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            self.match_prefix(&mut seq);
            let cached = seq.computed;
            let n = (seq.tokens.len() - seq.computed).min(budget);
            if !self.grow(&mut seq, n) {
                self.release_blocks(&mut seq);
                self.waiting.push_front(seq);
                break;
            }
            self.stats.cached_prompt_tokens += cached as u64;
            budget -= n;
            batch.push((seq, n));
        }
        if batch.is_empty() {
            self.running = running;
            if self.has_unfinished() {
                return Err(VolleyError::execution(
                    "the KV cache cannot hold the next request (raise kv_cache_memory)",
                ));
            }
            return Ok(Vec::new());
        }

        // The forward pass.
        let bs = self.config.block_size;
        let mut fwd = ForwardBatch::default();
        let mut decode = AttentionGroup::default();
        // (Decoding sequences go into groups of similar context lengths below.)
        let mut sampled = Vec::new();
        for (i, (seq, n)) in batch.iter().enumerate() {
            let first_row = fwd.tokens.len();
            let end = seq.computed + n;
            for p in seq.computed..end {
                fwd.tokens.push(seq.tokens[p]);
                fwd.positions.push(p);
                fwd.slots.push(seq.blocks[p / bs] * bs + p % bs);
            }
            let att = AttentionSeq {
                first_row,
                num_queries: *n,
                context: (0..end).map(|p| seq.blocks[p / bs] * bs + p % bs).collect(),
            };
            if *n == 1 {
                decode.seqs.push(att);
            } else {
                fwd.groups.push(AttentionGroup { seqs: vec![att] });
            }
            if end == seq.tokens.len() {
                fwd.logits_rows.push(first_row + n - 1);
                sampled.push(i);
            }
        }
        fwd.groups.extend(decode_groups(decode.seqs));
        let logits = self.model.forward(&fwd, &mut self.cache);
        let vocab = self.model.config().vocab_size;
        let logits: Vec<f32> = match logits {
            Some(l) => l
                .into_data()
                .convert::<f32>()
                .into_vec()
                .map_err(|e| VolleyError::execution(format!("reading logits: {e:?}")))?,
            None => Vec::new(),
        };
        self.stats.steps += 1;

        // Book-keeping: computed tokens, newly full blocks into the prefix cache, sampling.
        let mut finished = Vec::new();
        let mut row = 0;
        let mut next_sampled = sampled.iter().peekable();
        for (i, (mut seq, n)) in batch.into_iter().enumerate() {
            self.stats.computed_tokens += n as u64;
            seq.computed += n;
            while (seq.hashed_blocks + 1) * bs <= seq.computed {
                let b = seq.hashed_blocks;
                seq.last_hash = self.blocks.register(
                    seq.blocks[b],
                    seq.last_hash,
                    &seq.tokens[b * bs..(b + 1) * bs],
                );
                seq.hashed_blocks += 1;
            }
            if next_sampled.peek() == Some(&&i) {
                next_sampled.next();
                let token = sample(
                    &logits[row * vocab..(row + 1) * vocab],
                    &seq.params,
                    &mut seq.rng,
                );
                row += 1;
                self.accept(&mut seq, token)?;
            }
            if seq.finish.is_some() {
                finished.push(self.finish(seq)?);
            } else {
                running.push(seq);
            }
        }
        // Oldest first, so that the newest give way when blocks run out.
        running.sort_by_key(|s| s.id);
        self.running = running;
        Ok(finished)
    }

    /// Appends a sampled token and decides whether the sequence is done.
    fn accept(&mut self, seq: &mut Sequence, token: u32) -> Result<()> {
        seq.tokens.push(token);
        self.stats.generated_tokens += 1;
        let c = self.model.config();
        if !seq.params.ignore_eos && c.eos_token_ids.contains(&token) {
            seq.finish = Some(FinishReason::Eos);
        } else if seq.params.stop_token_ids.contains(&token) {
            seq.finish = Some(FinishReason::StopToken(token));
        } else if !seq.params.stop.is_empty() {
            let tokenizer = self
                .tokenizer
                .as_ref()
                .ok_or_else(|| VolleyError::plan("stop strings need an engine with a tokenizer"))?;
            let text = tokenizer.decode(seq.generated(), true)?;
            // Only what changed can hold a new match; look back from there as far as the
            // longest stop. (Not from the old text's end: a byte-fallback decoder shows
            // each byte of an unfinished character as a 3-byte `�`, so the text can
            // shrink when the character completes.)
            let longest = seq.params.stop.iter().map(|s| s.len()).max().unwrap_or(0);
            let same = seq
                .text
                .bytes()
                .zip(text.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            let mut from = same.saturating_sub(longest);
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            let hit = seq
                .params
                .stop
                .iter()
                .filter_map(|s| text[from..].find(s.as_str()).map(|at| (from + at, s)))
                .min_by_key(|(at, _)| *at);
            if let Some((at, s)) = hit {
                seq.text = text[..at].to_string();
                seq.finish = Some(FinishReason::StopString(s.clone()));
                return Ok(());
            }
            seq.text = text;
        }
        if seq.finish.is_none() && seq.generated().len() >= seq.params.max_tokens {
            seq.finish = Some(FinishReason::Length);
        }
        Ok(())
    }

    fn finish(&mut self, mut seq: Sequence) -> Result<Generation> {
        self.release_blocks(&mut seq);
        let finish_reason = seq.finish.take().unwrap_or(FinishReason::Length);
        let tokens = seq.generated().to_vec();
        let text = match (&finish_reason, &self.tokenizer) {
            (FinishReason::StopString(_), _) => std::mem::take(&mut seq.text),
            (_, None) => String::new(),
            (FinishReason::Eos | FinishReason::StopToken(_), Some(t)) => {
                t.decode(&tokens[..tokens.len() - 1], true)?
            }
            (FinishReason::Length, Some(t)) => t.decode(&tokens, true)?,
        };
        Ok(Generation {
            id: seq.id,
            prompt_tokens: seq.prompt_len,
            tokens,
            text,
            finish_reason,
        })
    }
}

/// Decoding sequences in attention groups whose padding at most doubles the keys they
/// attend over. One group is padded to its longest context: 64 sequences of which one
/// has 30,000 tokens would gather 64 × 30,000 keys and values per layer, many times
/// what the KV cache holds for them.
fn decode_groups(mut seqs: Vec<AttentionSeq>) -> Vec<AttentionGroup> {
    seqs.sort_by_key(|s| std::cmp::Reverse(s.context.len()));
    let mut groups = Vec::new();
    let mut current: Vec<AttentionSeq> = Vec::new();
    // Keys the group's sequences attend over, unpadded.
    let mut keys = 0usize;
    for s in seqs {
        let len = s.context.len().max(1);
        let longest = current.first().map_or(len, |f| f.context.len().max(1));
        if !current.is_empty() && (current.len() + 1) * longest > 2 * (keys + len) {
            groups.push(AttentionGroup {
                seqs: std::mem::take(&mut current),
            });
            keys = 0;
        }
        keys += len;
        current.push(s);
    }
    if !current.is_empty() {
        groups.push(AttentionGroup { seqs: current });
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(len: usize) -> AttentionSeq {
        AttentionSeq {
            first_row: 0,
            num_queries: 1,
            context: (0..len).collect(),
        }
    }

    #[test]
    fn decoding_sequences_are_grouped_by_length_with_bounded_padding() {
        let mut seqs = vec![seq(30_000)];
        seqs.extend((0..63).map(|_| seq(100)));
        let groups = decode_groups(seqs);
        assert_eq!(groups.iter().map(|g| g.seqs.len()).sum::<usize>(), 64);
        for g in &groups {
            let longest = g.seqs.iter().map(|s| s.context.len()).max().unwrap();
            let keys: usize = g.seqs.iter().map(|s| s.context.len()).sum();
            assert!(
                g.seqs.len() * longest <= 2 * keys,
                "{} × {longest}",
                g.seqs.len()
            );
        }
        // Equal lengths stay one group.
        assert_eq!(decode_groups((0..8).map(|_| seq(50)).collect()).len(), 1);
        assert!(decode_groups(Vec::new()).is_empty());
    }
}
