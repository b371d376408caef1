#!/usr/bin/env bash
# The whole test suite: make sure Redis and MySQL answer (starting private ones if not), then
# formatting, lints and every test of the workspace. `.ci/run` calls exactly this.
#
# Servers: IM_TEST_REDIS_URL / IM_TEST_MYSQL_URL (default redis://127.0.0.1:6379 and
# mysql://root@127.0.0.1:3306/) are used when they answer; otherwise `ops servers` starts private
# redis-server and mariadbd under .im-local/test-servers (installing the Debian packages if needed)
# and stops them again at the end. The Redis Cluster tests run on IM_TEST_REDIS_CLUSTER_URLS when it
# names a healthy cluster, else on a private 3-master cluster in .im-local/test-servers/redis-cluster
# (`ops servers --redis-cluster 3`), likewise stopped at the end. A cluster left running there (the
# script was killed before its trap ran) is reused by the next run while it is healthy, and replaced
# when it is not.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet -p ops
servers_dir=.im-local/test-servers
# The trap is set first, so servers started before a failure below are stopped too.
trap 'target/debug/ops servers --dir "$servers_dir" --stop' EXIT
env_lines=$(target/debug/ops servers --dir "$servers_dir" --redis-cluster 3)
export $env_lines
echo "test servers: $env_lines" | tr '\n' ' '; echo

# The dashboard test and the demo page's browser test (clients/js) load pages in headless Chromium.
command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

# The observability tests validate the dashboard and alert rules with promtool and a real Prometheus
# (Debian package `prometheus`; its own service is kept from running, the tests start their own).
command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus && if [ -d /run/systemd/system ]; then systemctl disable --now prometheus || true; fi)

cargo fmt --all -- --check
# No declared-but-unused dependency may come back (cargo-machete, from crates.io, installed once).
command -v cargo-machete >/dev/null || cargo install --quiet --locked cargo-machete
cargo machete
cargo clippy --workspace --all-targets -- -D warnings
# End-to-end tests (e2e/, bench/tests, ops/tests) launch the gateway, shard-worker and ops binaries:
# build them all first (cargo test alone builds only the binaries of packages whose own integration
# tests need them).
cargo build --workspace
cargo test --workspace

# The reference JavaScript client (clients/js): its node:test suite against a real cluster started
# with `ops up` (the binaries built above), then the demo page in headless Chromium driven by
# playwright-core. Node.js >= 20.11 with npm comes with the machine (Debian's nodejs/npm otherwise);
# the npm packages are pinned by package-lock.json.
command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm)
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 11) ? 0 : 1)' \
  || { echo "clients/js needs Node.js >= 20.11 (found $(node --version))" >&2; exit 1; }
(
  cd clients/js
  npm ci --no-audit --no-fund --loglevel=error
  npm test
  npm run test:browser
)
