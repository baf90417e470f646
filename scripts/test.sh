#!/usr/bin/env bash
# Runs every test: installs the test oracles (DuckDB, moto as the S3-compatible
# server, tpchgen-cli for TPC-H data), then `cargo test --workspace`. Extra arguments go
# to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    duckdb 'moto[server]' boto3 tpchgen-cli
cargo test --workspace "$@"
