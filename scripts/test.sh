#!/usr/bin/env bash
# Runs every test: checks that no tracked file names a path outside the repository,
# installs the test oracles (DuckDB, moto as the S3-compatible server, Prometheus'
# Python client for its metrics parser, tpchgen-cli for TPC-H data, Chromium and
# playwright-core for the dashboard), then
# `cargo test --workspace`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repository stands alone: no tracked file may name a path outside it.
python3 scripts/check_paths.py
# A sweep of trainables that do not use Burn builds without Burn.
if cargo tree -p volley-tune -e normal --prefix none | grep -q '^burn'; then
    echo "volley-tune (without its train feature) depends on Burn" >&2
    exit 1
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    duckdb 'moto[server]' boto3 tpchgen-cli prometheus_client kubernetes-validate
# The dashboard's browser test: Debian's Chromium, driven by playwright-core from npm.
# Where either cannot be installed, that test says so and skips.
if ! command -v chromium > /dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends chromium > /dev/null; } \
        || echo "Chromium could not be installed: the dashboard test skips" >&2
fi
npm ci --prefix tests/dashboard --no-audit --no-fund --silent \
    || echo "playwright-core could not be installed: the dashboard test skips" >&2
# The Kubernetes manifests, against Kubernetes' own schemas (offline); the image where
# a container runtime runs.
python3 -m kubernetes_validate --strict --quiet deploy/k8s/*.yaml
if command -v docker > /dev/null && docker info > /dev/null 2>&1; then
    docker build --quiet -t volley:test .
else
    echo "no container runtime here: the image (Dockerfile) is not built" >&2
fi
cargo test --workspace "$@"
