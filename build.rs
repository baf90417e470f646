//! Links volley's binaries (the CLI, examples, tests) as position-dependent
//! executables on Linux.
//!
//! Every job starts fresh worker processes of its own binary (the `volley` CLI for
//! `volley sql` on a cluster). As a position-independent executable, the CLI's
//! 4.8 MiB of pointer tables (`.data.rel.ro`, ~280,000 relocations) are rewritten by
//! the dynamic loader in each new process, each page copied on write: ~5.4 ms of CPU
//! and 1,400 page faults before `main`, against ~1.2 ms and 185 linked at a fixed
//! address (TPC-H SF1 on a 2-node cluster, six workers per query: 22 queries 9.72 ->
//! 9.32 s). The cost: the executable's own code and data (the head's and node agents'
//! too: one binary) are not placed at a random address (shared libraries, heap and
//! stacks still are). Programs of other crates that run as jobs link as they choose.

fn main() {
    // glibc only: a static (musl) build links its own way.
    let target = |var: &str| std::env::var(var).unwrap_or_default();
    if target("CARGO_CFG_TARGET_OS") == "linux" && target("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
