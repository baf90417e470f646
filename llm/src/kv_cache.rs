//! The paged KV cache: keys and values in fixed-size blocks of token slots, and the
//! bookkeeping that hands blocks to sequences and shares full blocks between
//! sequences with the same prefix.
//!
//! Storage ([`KvCache`]) is one `[blocks * block_size, kv_heads * head_dim]` tensor per
//! layer for keys and one for values; token `p` of a sequence lives in slot
//! `table[p / block_size] * block_size + p % block_size` of its block table. The
//! [`BlockManager`] owns the tables' currency: reference counts, a free list, and the
//! prefix cache, where a full block is registered under a hash of its tokens chained
//! with its predecessor's, so a new request whose prompt starts with the same tokens
//! reuses the blocks instead of recomputing them. Released cached blocks stay
//! reusable until the space is needed (least recently used go first).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use burn::prelude::*;

use crate::config::ModelConfig;

/// Index of a block.
pub type BlockId = usize;

/// Keys and values of every layer, in blocks.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 2>, Tensor<B, 2>)>>,
    block_size: usize,
    num_blocks: usize,
}

impl<B: Backend> KvCache<B> {
    /// Bytes one block takes over all layers (f32 keys and values); `usize::MAX` where
    /// that does not fit a `usize` (no memory holds such a block).
    pub fn bytes_per_block(config: &ModelConfig, block_size: usize) -> usize {
        [
            config.num_layers,
            block_size,
            config.num_kv_heads,
            config.head_dim,
            4,
        ]
        .into_iter()
        .fold(2usize, |bytes, n| bytes.saturating_mul(n))
    }

    /// A zeroed cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        device: &B::Device,
    ) -> Self {
        let shape = [
            num_blocks * block_size,
            config.num_kv_heads * config.head_dim,
        ];
        let layers = (0..config.num_layers)
            .map(|_| Some((Tensor::zeros(shape, device), Tensor::zeros(shape, device))))
            .collect();
        Self {
            layers,
            block_size,
            num_blocks,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Takes a layer's key and value tensors out, so that writing into them does not
    /// copy (a tensor with one owner is updated in place).
    pub(crate) fn take_layer(&mut self, layer: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
        self.layers[layer]
            .take()
            .unwrap_or_else(|| panic!("layer {layer} of the KV cache was not put back"))
    }

    /// Puts a layer's tensors back after [`take_layer`](Self::take_layer).
    pub(crate) fn put_layer(&mut self, layer: usize, k: Tensor<B, 2>, v: Tensor<B, 2>) {
        self.layers[layer] = Some((k, v));
    }
}

/// Hash of a full block's tokens chained with the hash of the blocks before it.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Counters of the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Full blocks looked up.
    pub queried_blocks: u64,
    /// Of those, found and reused.
    pub hit_blocks: u64,
}

/// Hands out blocks, counts their users and keeps the prefix cache.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// Blocks with no user and no cached contents.
    free: VecDeque<BlockId>,
    /// The hash and tokens a block is registered under.
    registered: Vec<Option<(u64, Vec<u32>)>>,
    cached: HashMap<u64, BlockId>,
    /// Cached blocks with no user, by when they were last released (oldest first).
    evictable: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    clock: u64,
    prefix_caching: bool,
    stats: PrefixCacheStats,
}

impl BlockManager {
    /// `num_blocks` blocks of `block_size` tokens; `prefix_caching` turns the sharing
    /// of full blocks on.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks).collect(),
            registered: vec![None; num_blocks],
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
            prefix_caching,
            stats: PrefixCacheStats::default(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Prefix-cache counters.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// A block for a new user: a free one, else the least recently released cached one
    /// (which leaves the prefix cache).
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop_front() {
            Some(b) => b,
            None => {
                let (&tick, &b) = self.evictable.iter().next()?;
                self.evictable.remove(&tick);
                if let Some((hash, _)) = self.registered[b].take() {
                    self.cached.remove(&hash);
                }
                b
            }
        };
        self.ref_counts[block] = 1;
        Some(block)
    }

    /// Drops one user of `block`. A cached block stays findable until evicted.
    pub fn release(&mut self, block: BlockId) {
        debug_assert!(self.ref_counts[block] > 0, "block {block} released twice");
        self.ref_counts[block] -= 1;
        if self.ref_counts[block] == 0 {
            if self.registered[block].is_some() {
                self.clock += 1;
                self.released_at[block] = self.clock;
                self.evictable.insert(self.clock, block);
            } else {
                self.free.push_back(block);
            }
        }
    }

    /// Finds the cached block holding `tokens` after the prefix hashed as `parent`, and
    /// takes a reference to it.
    pub fn lookup(&mut self, parent: u64, tokens: &[u32]) -> Option<(BlockId, u64)> {
        if !self.prefix_caching {
            return None;
        }
        self.stats.queried_blocks += 1;
        let hash = block_hash(parent, tokens);
        let &block = self.cached.get(&hash)?;
        if self.registered[block].as_ref().map(|(_, t)| t.as_slice()) != Some(tokens) {
            return None;
        }
        if self.ref_counts[block] == 0 {
            self.evictable.remove(&self.released_at[block]);
        }
        self.ref_counts[block] += 1;
        self.stats.hit_blocks += 1;
        Some((block, hash))
    }

    /// Registers a block that has just been filled with `tokens` (after the prefix
    /// hashed as `parent`); returns the block's hash, the parent of the next block.
    pub fn register(&mut self, block: BlockId, parent: u64, tokens: &[u32]) -> u64 {
        let hash = block_hash(parent, tokens);
        if self.prefix_caching && self.registered[block].is_none() {
            if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
                e.insert(block);
                self.registered[block] = Some((hash, tokens.to_vec()));
            }
        }
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_shared_by_prefix_and_evicted_oldest_first() {
        let mut m = BlockManager::new(3, 2, true);
        let a = m.allocate().unwrap();
        let h = m.register(a, 0, &[5, 6]);
        let b = m.allocate().unwrap();
        m.register(b, h, &[7, 8]);
        // Another sequence with the same first block reuses it.
        assert_eq!(m.lookup(0, &[5, 6]), Some((a, h)));
        assert_eq!(m.lookup(0, &[5, 9]), None);
        m.release(a);
        m.release(a);
        m.release(b);
        assert_eq!(m.available(), 3);
        // Still cached after release.
        assert_eq!(m.lookup(0, &[5, 6]).map(|x| x.0), Some(a));
        m.release(a);
        // New blocks come from the free list, then from the cached block released
        // longest ago (`b`, since `a` was used again after it).
        let c = m.allocate().unwrap();
        let d = m.allocate().unwrap();
        assert_eq!((c, d), (2, b));
        assert!(
            m.lookup(h, &[7, 8]).is_none(),
            "evicted blocks leave the cache"
        );
        assert_eq!(m.lookup(0, &[5, 6]).map(|x| x.0), Some(a));
        assert!(m.allocate().is_none());
        let s = m.stats();
        assert_eq!((s.queried_blocks, s.hit_blocks), (5, 3));
    }
}
