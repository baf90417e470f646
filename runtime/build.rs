//! Compiles the cluster protocol with a pure-Rust protobuf compiler (no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/volley.proto");
    let fds = protox::compile(["volley.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // Task payloads and inline objects are passed along and cloned, not read:
        // reference-counted buffers make that free.
        .bytes(".volley.cluster.TaskAssignment.payload")
        .bytes(".volley.cluster.SubmitTaskRequest.payload")
        .bytes(".volley.cluster.ObjectLocation.inline")
        .bytes(".volley.cluster.TaskReport.inline")
        .bytes(".volley.cluster.WorkerResult.output")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
