# The `volley` binary on a slim base: the head and the node agents run from it, and a
# node agent starts the jobs' own binaries (uploaded with each job) inside the same
# container, so the base must run what `cargo build` makes on Debian bookworm.
#
#   docker build -t volley .
#
# Build stage: the whole workspace's `volley` binary, release profile.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin volley

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 volley \
    && mkdir -p /var/lib/volley \
    && chown volley /var/lib/volley
COPY --from=build /src/target/release/volley /usr/local/bin/volley
USER volley
# The state folder: the head's token and job logs, a node's packages and spills.
ENV VOLLEY_HOME=/var/lib/volley
# gRPC (agents, clients) and the HTTP API (jobs, /metrics, /healthz).
EXPOSE 6380 8265
ENTRYPOINT ["volley"]
CMD ["--help"]
