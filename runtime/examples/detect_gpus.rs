//! Prints how many GPUs a node agent on this machine would offer (through the CUDA
//! driver, loaded at run time; 0 without one).
//!
//! ```text
//! cargo run --release -p volley-runtime --example detect_gpus
//! ```

fn main() {
    println!("gpus={}", volley_runtime::cluster::gpus::detect());
}
