//! Prints how many GPUs a node agent on this machine would offer (through the CUDA
//! driver, loaded at run time; 0 without one).
//!
//! ```text
//! cargo run --release -p volley-runtime --example detect_gpus
//! ```

/// No options: `--help` says what it does.
#[derive(clap::Parser)]
#[command(about = "Prints how many GPUs a node agent on this machine would offer (gpus=N)")]
struct Args {}

fn main() {
    let _: Args = clap::Parser::parse();
    println!("gpus={}", volley_runtime::cluster::gpus::detect());
}
