//! Collective operations between the ranks of a training group.
//!
//! [`TcpRing`] arranges the ranks in a ring (each connects to its successor and accepts
//! its predecessor) and sums buffers with the bandwidth-optimal ring algorithm: the
//! buffer is cut into one chunk per rank; in `world - 1` reduce-scatter steps each rank
//! sends one chunk forward and adds the chunk it receives, after which every rank owns
//! one fully summed chunk; in `world - 1` all-gather steps the summed chunks travel
//! round the ring. Each rank sends and receives about `2 x len` values whatever the
//! group size. Large buffers go in buckets, so memory for the wire copies stays small.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use volley_common::{Result, VolleyError};

/// Sums buffers across the ranks of a group.
pub trait Collective: Send {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Replaces `data` on every rank by the element-wise sum of all ranks' `data` (every
    /// rank must pass a buffer of the same length).
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()> {
        let mut one = [0.0f32];
        self.all_reduce_sum(&mut one)
    }
}

/// Settings of a [`TcpRing`].
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// How long to wait for a neighbour to connect or to send data before failing.
    pub timeout: Duration,
    /// Values per bucket.
    pub bucket_len: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            bucket_len: 1 << 20,
        }
    }
}

const MAGIC: u32 = 0x766f_6c72; // "volr"

/// Bytes each call sends ahead of its values: the call's number and length.
const CALL_HEADER: usize = 16;

/// A ring of ranks connected over TCP.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// To the successor; `None` alone.
    next: Option<TcpStream>,
    /// From the predecessor.
    prev: Option<TcpStream>,
    config: RingConfig,
    /// Calls made since the ring formed.
    calls: u64,
}

fn io_err(rank: usize, what: &str, e: std::io::Error) -> VolleyError {
    VolleyError::execution(format!("all-reduce: rank {rank}: {what}: {e}"))
}

impl TcpRing {
    /// Joins the ring as `rank` of `addrs.len()` ranks. `listener` must be bound to
    /// `addrs[rank]`; the rank connects to `addrs[(rank + 1) % world]` and accepts the
    /// connection of its predecessor. Fails, naming the address, when a neighbour is
    /// unreachable within the timeout or belongs to another group.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        config: RingConfig,
    ) -> Result<Self> {
        let world = addrs.len();
        if rank >= world {
            return Err(VolleyError::plan(format!(
                "rank {rank} is not in a group of {world}"
            )));
        }
        if world == 1 {
            return Ok(Self {
                rank,
                world,
                next: None,
                prev: None,
                config,
                calls: 0,
            });
        }
        let succ = (rank + 1) % world;
        let deadline = Instant::now() + config.timeout;
        let next = loop {
            match TcpStream::connect_timeout(&addrs[succ], config.timeout) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(VolleyError::execution(format!(
                        "all-reduce: rank {rank} cannot reach rank {succ} at {}: {e}",
                        addrs[succ]
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // A successor that stops reading fails a send instead of holding it forever.
        next.set_nodelay(true)
            .and_then(|_| next.set_write_timeout(Some(config.timeout)))
            .map_err(|e| io_err(rank, "configuring", e))?;
        let mut next = next;
        let hello: Vec<u8> = [MAGIC, rank as u32, world as u32]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        next.write_all(&hello)
            .map_err(|e| io_err(rank, "greeting its successor", e))?;

        listener
            .set_nonblocking(true)
            .map_err(|e| io_err(rank, "listening", e))?;
        let pred = (rank + world - 1) % world;
        let prev = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(VolleyError::execution(format!(
                            "all-reduce: rank {rank}: rank {pred} did not connect within {:?}",
                            config.timeout
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io_err(rank, "accepting its predecessor", e)),
            }
        };
        let mut prev = prev;
        prev.set_nonblocking(false)
            .and_then(|_| prev.set_nodelay(true))
            .and_then(|_| prev.set_read_timeout(Some(config.timeout)))
            .map_err(|e| io_err(rank, "configuring", e))?;
        let mut got = [0u8; 12];
        prev.read_exact(&mut got)
            .map_err(|e| io_err(rank, "reading its predecessor's greeting", e))?;
        let word = |i: usize| u32::from_le_bytes([got[i], got[i + 1], got[i + 2], got[i + 3]]);
        if word(0) != MAGIC || word(4) as usize != pred || word(8) as usize != world {
            return Err(VolleyError::execution(format!(
                "all-reduce: rank {rank} expected rank {pred} of {world} to connect, got a \
                 peer saying rank {} of {}",
                word(4),
                word(8)
            )));
        }
        Ok(Self {
            rank,
            world,
            next: Some(next),
            prev: Some(prev),
            config,
            calls: 0,
        })
    }

    /// Checks that the predecessor makes the same call: each rank sends its call's
    /// number and length ahead of the values. A rank whose calls went out of step (one
    /// more barrier, a buffer of another length) is refused here; its values would
    /// otherwise be summed with others, and a length that differs would shift the
    /// chunks every later call reads.
    fn same_call(&mut self, len: usize) -> Result<()> {
        let (rank, world, call) = (self.rank, self.world, self.calls);
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        self.calls += 1;
        let mut header = [0u8; CALL_HEADER];
        header[..8].copy_from_slice(&call.to_le_bytes());
        header[8..].copy_from_slice(&(len as u64).to_le_bytes());
        // Small enough for the socket's buffer: sent before reading without a thread.
        next.write_all(&header)
            .map_err(|e| io_err(rank, "sending to its successor", e))?;
        let pred = (rank + world - 1) % world;
        let mut got = [0u8; CALL_HEADER];
        prev.read_exact(&mut got)
            .map_err(|e| io_err(rank, &format!("receiving from rank {pred}"), e))?;
        let word = |i: usize| u64::from_le_bytes(got[i..i + 8].try_into().expect("8 bytes"));
        let (their_call, their_len) = (word(0), word(8));
        if (their_call, their_len) != (call, len as u64) {
            return Err(VolleyError::execution(format!(
                "all-reduce calls out of step: rank {rank}'s call {call} sums {len} values, \
                 rank {pred}'s call {their_call} sums {their_len}: every rank must make the \
                 same calls (barriers included) with buffers of the same length (gradients \
                 of the same model)"
            )));
        }
        Ok(())
    }

    /// The ring algorithm on one bucket.
    fn ring(&mut self, data: &mut [f32]) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        let len = data.len();
        let bounds = |c: usize| (c * len / world, (c + 1) * len / world);
        let pred = (rank + world - 1) % world;
        for phase in 0..2 {
            for step in 0..world - 1 {
                // Reduce-scatter sends the chunk it has accumulated; all-gather the
                // chunk it holds summed.
                let send = (rank + world * 2 + phase - step) % world;
                let recv = (rank + world * 2 + phase - step - 1) % world;
                let (s0, s1) = bounds(send);
                let (r0, r1) = bounds(recv);
                let out: Vec<u8> = data[s0..s1].iter().flat_map(|v| v.to_le_bytes()).collect();
                let mut inp = vec![0u8; (r1 - r0) * 4];
                let sent = std::thread::scope(|scope| {
                    let writer = scope.spawn(|| next.write_all(&out));
                    let read = prev.read_exact(&mut inp);
                    let wrote = writer.join().unwrap_or_else(|_| {
                        Err(std::io::Error::other("the sending thread panicked"))
                    });
                    read.map_err(|e| io_err(rank, &format!("receiving from rank {pred}"), e))?;
                    wrote.map_err(|e| io_err(rank, "sending to its successor", e))
                });
                sent?;
                let values = inp
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                if phase == 0 {
                    for (d, v) in data[r0..r1].iter_mut().zip(values) {
                        *d += v;
                    }
                } else {
                    for (d, v) in data[r0..r1].iter_mut().zip(values) {
                        *d = v;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        self.same_call(data.len())?;
        let bucket = self.config.bucket_len.max(1);
        for chunk in data.chunks_mut(bucket) {
            self.ring(chunk)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Listeners on free ports and their addresses.
    fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
        let ls: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        (ls, addrs)
    }

    fn config() -> RingConfig {
        RingConfig {
            timeout: Duration::from_secs(10),
            bucket_len: 1000,
        }
    }

    /// Runs `f` on each rank of a ring of `world` formed with `cfg`; their results.
    fn on_ranks<T: Send + 'static>(
        world: usize,
        cfg: RingConfig,
        f: impl Fn(usize, &mut TcpRing) -> T + Send + Clone + 'static,
    ) -> Vec<T> {
        let (ls, addrs) = listeners(world);
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (addrs, cfg, f) = (addrs.clone(), cfg.clone(), f.clone());
                std::thread::spawn(move || {
                    let mut ring = TcpRing::connect(rank, &addrs, l, cfg).unwrap();
                    f(rank, &mut ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn every_rank_gets_the_sum() {
        for world in 1..=4 {
            for len in [0usize, 1, 3, 999, 1000, 4321] {
                let results = on_ranks(world, config(), move |rank, ring| {
                    // Small integers: the sums are exact in f32.
                    let mut data: Vec<f32> =
                        (0..len).map(|i| ((i % 97) * (rank + 1)) as f32).collect();
                    ring.all_reduce_sum(&mut data).unwrap();
                    ring.barrier().unwrap();
                    data
                });
                let factor: usize = (1..=world).sum();
                for data in results {
                    let want: Vec<f32> = (0..len).map(|i| ((i % 97) * factor) as f32).collect();
                    assert_eq!(data, want, "world {world}, len {len}");
                }
            }
        }
    }

    #[test]
    fn a_lost_rank_is_an_error_not_a_hang() {
        let (ls, addrs) = listeners(3);
        let mut handles = Vec::new();
        for (rank, l) in ls.into_iter().enumerate() {
            let addrs = addrs.clone();
            handles.push(std::thread::spawn(move || {
                let cfg = RingConfig {
                    timeout: Duration::from_secs(2),
                    bucket_len: 1000,
                };
                let mut ring = TcpRing::connect(rank, &addrs, l, cfg).unwrap();
                if rank == 2 {
                    // Leaves the group without taking part.
                    return Ok(());
                }
                let mut data = vec![1.0f32; 5000];
                ring.all_reduce_sum(&mut data)
            }));
        }
        let results: Vec<Result<()>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(results[2].is_ok());
        for r in &results[..2] {
            let e = r.as_ref().unwrap_err().to_string();
            assert!(e.contains("all-reduce: rank"), "{e}");
        }
    }

    /// Ranks whose calls differ in length, or whose calls went out of step, fail
    /// with both calls named instead of summing what does not belong together.
    #[test]
    fn calls_out_of_step_are_refused() {
        for (lens, barrier_first) in [([10usize, 12], false), ([5000, 5000], true)] {
            let cfg = RingConfig {
                timeout: Duration::from_secs(2),
                bucket_len: 1000,
            };
            let errors: Vec<String> = on_ranks(2, cfg, move |rank, ring| {
                if barrier_first && rank == 0 {
                    // One barrier more than rank 1.
                    ring.barrier()?;
                }
                let mut data = vec![1.0f32; lens[rank]];
                ring.all_reduce_sum(&mut data)
            })
            .into_iter()
            .map(|r| r.unwrap_err().to_string())
            .collect();
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains("all-reduce calls out of step")),
                "{errors:?}"
            );
            if !barrier_first {
                assert!(
                    errors[0].contains("rank 0's call 0 sums 10 values, rank 1's call 0 sums 12"),
                    "{errors:?}"
                );
            }
        }
    }

    #[test]
    fn unreachable_or_foreign_peers_are_named() {
        // Rank 0 of 2 whose successor never listens.
        let (mut ls, addrs) = listeners(2);
        let l0 = ls.remove(0);
        drop(ls);
        let cfg = RingConfig {
            timeout: Duration::from_millis(500),
            bucket_len: 10,
        };
        let e = TcpRing::connect(0, &addrs, l0, cfg.clone())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 1") && e.contains(&addrs[1].to_string()),
            "{e}"
        );

        // A peer that believes the group has another size.
        let (ls, addrs) = listeners(2);
        let mut ls = ls.into_iter();
        let (l0, l1) = (ls.next().unwrap(), ls.next().unwrap());
        let a = addrs.clone();
        let other = std::thread::spawn(move || {
            // Rank 1 of 3, whose successor (rank 2) is at rank 0's address.
            let three = [a[1], a[1], a[0]];
            TcpRing::connect(1, &three, l1, cfg)
        });
        let e = TcpRing::connect(0, &addrs, l0, config())
            .unwrap_err()
            .to_string();
        assert!(e.contains("of 3"), "{e}");
        let _ = other.join().unwrap();
        assert!(TcpRing::connect(
            5,
            &addrs[..1],
            TcpListener::bind("127.0.0.1:0").unwrap(),
            config()
        )
        .is_err());
    }
}
