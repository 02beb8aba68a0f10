#!/usr/bin/env bash
# Runs Souk's whole test suite against real PostgreSQL and NATS JetStream,
# installing and starting them first when needed (see scripts/lib.sh).
# Extra arguments go to `cargo test`, e.g. `./scripts/test.sh -p domain`
# or `./scripts/test.sh -- a_hot_listing_never_oversells`.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$SOUK_ROOT"

export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
souk_ensure_services
souk_ensure_browser
souk_ensure_postgres_capacity
souk_export_meili_bin

# The whole workspace, unless the arguments pick packages themselves.
scope=(--workspace)
for argument in "$@"; do
	[[ $argument == -- ]] && break
	[[ $argument == -p || $argument == -p* || $argument == --package* ]] && scope=()
done

souk_info "cargo test ${scope[*]} --locked $*"
cargo test "${scope[@]}" --locked "$@"
