//! Resource requests and what this machine has.

/// CPUs and memory a task holds while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ResourceRequest {
    /// CPUs, fractions allowed (`0.5` lets two such tasks share a core).
    pub num_cpus: f64,
    /// Bytes of memory the task will use beyond the blocks it buffers.
    pub memory: u64,
}

impl ResourceRequest {
    /// A request for `num_cpus` CPUs and no reserved memory.
    pub fn cpus(num_cpus: f64) -> Self {
        Self {
            num_cpus,
            memory: 0,
        }
    }

    /// Whether this request fits in `available`.
    pub fn fits_in(&self, available: &ResourceRequest) -> bool {
        // A small epsilon so that ten tasks of 0.1 CPU fit in one.
        self.num_cpus <= available.num_cpus + 1e-9 && self.memory <= available.memory
    }
}

/// Total physical memory of this machine, from `/proc/meminfo` (Linux); 8 GiB where it
/// cannot be read.
pub fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|kb| kb.parse::<u64>().ok())
                })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}
