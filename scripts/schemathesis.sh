#!/usr/bin/env bash
# Fuzzes Souk's HTTP APIs from their own /openapi.json with Schemathesis and
# fails on any 5xx or any response that does not match the documented schema.
#
# Each service runs from the debug build against a throwaway database
# (souk_schemathesis_<random>) and JetStream streams of the run's own, with a
# throwaway JWT key pair, on a free port; it is fuzzed once per role, with
# that role's token. Whatever happens, the services are stopped, the databases
# dropped and the streams deleted at exit.
#
# Usage: ./scripts/schemathesis.sh [SERVICE...]   (default: every service below)
# Environment:
#   SCHEMATHESIS_MAX_EXAMPLES  test cases per operation and phase (default 30)
#   SCHEMATHESIS_ROLES         roles to fuzz as (default "seller buyer admin")
#   SCHEMATHESIS_CHECKS        checks to run (default not_a_server_error,response_schema_conformance)
#   SCHEMATHESIS_TIMEOUT_S     time limit of one Schemathesis run (default 900)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Pinned: a new Schemathesis may add checks or change flags. A new pin gets a
# new virtualenv next to the old one.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=${XDG_CACHE_HOME:-$HOME/.cache}/souk/schemathesis-$SCHEMATHESIS_VERSION
SCHEMATHESIS_MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-30}
SCHEMATHESIS_ROLES=${SCHEMATHESIS_ROLES:-seller buyer admin}
SCHEMATHESIS_CHECKS=${SCHEMATHESIS_CHECKS:-not_a_server_error,response_schema_conformance}
SCHEMATHESIS_TIMEOUT_S=${SCHEMATHESIS_TIMEOUT_S:-900}
# The services this script knows how to fuzz; each has a fuzz_<name> function.
ALL_SERVICES=(command-api query-api)

BIN_DIR=$SOUK_ROOT/target/debug
SCHEMATHESIS_STATE_DIR=$SOUK_ROOT/data/schemathesis
HEALTH_TIMEOUT_S=60
WORK_DIR=""
STARTED_PIDS=()
SCHEMATHESIS_PID=""
CREATED_DATABASES=()
# JetStream streams of this run: named for it, so that a run never meets a
# stream an earlier one bound to its own database (the relay and projector
# refuse that), and deleted at exit.
RUN_STREAM="souk_schemathesis_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
CREATED_STREAMS=("$RUN_STREAM" "${RUN_STREAM}_search")

cleanup() {
	local status=$? pid database stream
	if [[ -n $SCHEMATHESIS_PID ]]; then
		kill -TERM "$SCHEMATHESIS_PID" 2>/dev/null || true
		wait "$SCHEMATHESIS_PID" 2>/dev/null || true
	fi
	for pid in "${STARTED_PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${STARTED_PIDS[@]}"; do
		souk_wait_for 10 "pid $pid to stop" bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
	done
	for stream in "${CREATED_STREAMS[@]}"; do
		souk_delete_nats_stream "$stream" || souk_warn "could not delete the JetStream stream $stream"
	done
	for database in "${CREATED_DATABASES[@]}"; do
		souk_drop_database "$database" || souk_warn "could not drop database $database"
	done
	[[ -n $WORK_DIR ]] && rm -rf "$WORK_DIR"
	exit "$status"
}

ensure_schemathesis() {
	if [[ -x $SCHEMATHESIS_VENV/bin/schemathesis ]] &&
		"$SCHEMATHESIS_VENV/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
		return 0
	fi
	souk_info "installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV"
	rm -rf "$SCHEMATHESIS_VENV"
	mkdir -p "$(dirname "$SCHEMATHESIS_VENV")"
	if ! python3 -m venv "$SCHEMATHESIS_VENV" >/dev/null 2>&1; then
		# Debian's python3 has no venv module without this package.
		rm -rf "$SCHEMATHESIS_VENV"
		souk_ensure_packages python3-venv
		python3 -m venv "$SCHEMATHESIS_VENV"
	fi
	"$SCHEMATHESIS_VENV/bin/pip" install --disable-pip-version-check -q "schemathesis==$SCHEMATHESIS_VERSION"
}

# Creates a throwaway database, to be dropped at exit, and sets
# THROWAWAY_DATABASE_URL to it (not printed: a subshell would lose the record).
create_throwaway_database() {
	local name
	name="souk_schemathesis_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
	CREATED_DATABASES+=("$name")
	souk_ensure_database "$name"
	THROWAWAY_DATABASE_URL=$(souk_db_url_with_name "$DATABASE_URL" "$name")
}

# Starts a debug binary in the background with Souk's test environment plus
# the extra NAME=VALUE pairs, and waits for its /health.
# Usage: start_service BINARY BASE_URL DATABASE_URL [NAME=VALUE...]
start_service() {
	local binary=$1 base_url=$2 database_url=$3
	shift 3
	local log=$WORK_DIR/$binary.log
	souk_info "starting $binary at $base_url"
	env DATABASE_URL="$database_url" \
		NATS_URL="$NATS_URL" \
		SOUK_STREAM="$RUN_STREAM" \
		SOUK_JWT_PUBLIC_KEY="$WORK_DIR/keys/jwt-public.pem" \
		SOUK_JWT_PRIVATE_KEY="$WORK_DIR/keys/jwt-private.pem" \
		SEARCH_INDEX_DIR="$WORK_DIR/search" \
		RUST_LOG="${RUST_LOG:-warn}" \
		"$@" "$BIN_DIR/$binary" >"$log" 2>&1 </dev/null &
	local pid=$!
	STARTED_PIDS+=("$pid")
	souk_wait_for_health "$base_url/health" "$pid" "$log" "$HEALTH_TIMEOUT_S" ||
		souk_die "$binary did not come up"
}

# Fuzzes the API at BASE_URL once per role, with any extra Schemathesis
# arguments. Returns non-zero if any run failed.
# Usage: run_schemathesis NAME BASE_URL [SCHEMATHESIS_ARG...]
run_schemathesis() {
	local name=$1 base_url=$2 role token failed=0
	shift 2
	mkdir -p "$SCHEMATHESIS_STATE_DIR"
	for role in $SCHEMATHESIS_ROLES; do
		token=$("$BIN_DIR/replay-tool" token --sub "$(cat /proc/sys/kernel/random/uuid)" --role "$role" \
			--private-key "$WORK_DIR/keys/jwt-private.pem" --public-key "$WORK_DIR/keys/jwt-public.pem")
		souk_info "schemathesis: $name as $role (at most $SCHEMATHESIS_MAX_EXAMPLES examples per operation)"
		# Run from data/schemathesis: Schemathesis keeps the failures it found
		# in ./.schemathesis and tries them again first on the next run. It runs
		# in the background so that a signal to this script is handled at once
		# (bash defers traps until a foreground child ends).
		(cd "$SCHEMATHESIS_STATE_DIR" && exec timeout --signal=INT --kill-after=30 "$SCHEMATHESIS_TIMEOUT_S" \
			"$SCHEMATHESIS_VENV/bin/schemathesis" run "$base_url/openapi.json" \
			--header "Authorization: Bearer $token" \
			--checks "$SCHEMATHESIS_CHECKS" \
			--max-examples "$SCHEMATHESIS_MAX_EXAMPLES" \
			--generation-database none \
			--request-timeout 10 \
			--no-color "$@") &
		SCHEMATHESIS_PID=$!
		if ! wait "$SCHEMATHESIS_PID"; then
			souk_warn "schemathesis found problems in $name as $role (or ran past ${SCHEMATHESIS_TIMEOUT_S}s)"
			failed=1
		fi
		SCHEMATHESIS_PID=""
	done
	return "$failed"
}

fuzz_command_api() {
	local port
	create_throwaway_database
	port=$(souk_free_port)
	start_service command-api "http://127.0.0.1:$port" "$THROWAWAY_DATABASE_URL" \
		COMMAND_API_ADDR="127.0.0.1:$port"
	run_schemathesis command-api "http://127.0.0.1:$port"
}

# Read-model rows for the query API to answer with, so that its bodies (not
# only its errors) are checked against the document. Every projection's
# checkpoints are at the end of time: `?after=` never has to wait, and a 503
# `not_caught_up` would count as a server error.
seed_read_models() {
	psql -w -X -q -v ON_ERROR_STOP=1 -v stream="$RUN_STREAM" "$1" <<'SQL'
INSERT INTO projection_checkpoints (projection, partition, transaction_id, position,
                                    caught_up_transaction, caught_up_position, events_applied)
SELECT projection, partition, 1, 1, 9223372036854775807, 9223372036854775807, 1
  FROM unnest(ARRAY['listings', 'orders', 'wallets', 'timelines']) AS projection,
       generate_series(0, 3) AS partition;
INSERT INTO relay_checkpoints (stream, transaction_id, position, published)
VALUES (:'stream', 1, 1, 1) ON CONFLICT (stream) DO NOTHING;
INSERT INTO dead_letters (projection, partition, event_id, aggregate_type, aggregate_id, sequence,
                          event_type, transaction_id, position, error, envelope)
VALUES ('orders', 0, gen_random_uuid(), 'Order', gen_random_uuid()::text, 1, 'OrderPlaced', 1, 1,
        'seeded for fuzzing', '{}');
INSERT INTO rm_listings (listing_id, seller_id, product_id, title, description, category, subcategory,
                         condition, price_amount, currency, city, country, lat, lon, attributes,
                         images, status, stock, held, available, created_at, updated_at, version)
SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'Lamp ' || n, 'Brass, works.',
       (ARRAY['home', 'phones'])[1 + n % 2], CASE WHEN n % 3 = 0 THEN 'lighting' END,
       (ARRAY['new', 'like_new', 'good', 'fair', 'poor'])[1 + n % 5], 100 * n,
       (ARRAY['EUR', 'USD'])[1 + n % 2], 'Lyon', 'FR', CASE WHEN n % 2 = 0 THEN 45.76 END,
       CASE WHEN n % 2 = 0 THEN 4.83 END, '{"storage_gb": 128, "boxed": true}',
       '["https://img.example/1.jpg"]', (ARRAY['active', 'paused', 'sold_out', 'deleted'])[1 + n % 4],
       5, n % 3, 5 - n % 3, now(), now(), n
  FROM generate_series(1, 30) AS n;
INSERT INTO rm_orders (order_id, checkout_id, buyer_id, seller_id, status, payment_method, total_amount,
                       currency, lines, shipping_address, carrier, tracking_number, rating,
                       review_comment, placed_at, confirmed_at, shipped_at, updated_at, version)
SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'delivered',
       'wallet_escrow', 2500, 'EUR', '[{"listing_id": "0190a6c4-0000-7000-8000-000000000001", "quantity": 1}]',
       '{"city": "Lyon"}', 'La Poste', 'LP' || n, 4, 'fine', now(), now(), now(), now(), 5
  FROM generate_series(1, 5) AS n;
INSERT INTO rm_seller_stats (seller_id, orders_placed, orders_confirmed, orders_delivered, orders_returned,
                             fulfillment_seconds_sum, rating_sum, rating_count)
SELECT seller_id, 1, 1, 1, 0, 3600, 4, 1 FROM rm_orders;
INSERT INTO rm_wallets (wallet_id, owner_id, currency, available, held, pending_incoming, created_at,
                        updated_at, version)
SELECT gen_random_uuid(), buyer_id, 'EUR', 1000, 2500, 0, now(), now(), 3 FROM rm_orders;
INSERT INTO rm_wallet_entries (wallet_id, sequence, kind, amount, available, held, pending_incoming,
                               reference, recorded_at)
SELECT wallet_id, 1, 'FundsDeposited', 3500, 3500, 0, 0, 'top-up', now() FROM rm_wallets;
INSERT INTO rm_products (product_id, owner_id, entries, updated_at)
SELECT product_id, seller_id, 1, now() FROM rm_listings;
INSERT INTO rm_timeline (product_id, sequence, kind, data, actor_id, recorded_at)
SELECT product_id, 1, 'listed', '{"price": {"amount": 100, "currency": "EUR"}}', owner_id, now()
  FROM rm_products;
SQL
}

fuzz_query_api() {
	local port
	create_throwaway_database
	port=$(souk_free_port)
	# query-api never migrates (it may run on a hot standby): a writer,
	# here replay-tool, applies the migrations first.
	DATABASE_URL="$THROWAWAY_DATABASE_URL" "$BIN_DIR/replay-tool" status --json >/dev/null
	start_service query-api "http://127.0.0.1:$port" "$THROWAWAY_DATABASE_URL" \
		QUERY_API_ADDR="127.0.0.1:$port" SOUK_PARTITIONS=4
	seed_read_models "$THROWAWAY_DATABASE_URL"
	# A projector running "listings" only (on an empty stream of its own)
	# indexes the seeded listings for /search at start, into the directory
	# query-api reads; without it `?after=` would wait for an empty index.
	local projector_port
	projector_port=$(souk_free_port)
	start_service projector "http://127.0.0.1:$projector_port" "$THROWAWAY_DATABASE_URL" \
		SOUK_PROJECTOR_METRICS_ADDR="127.0.0.1:$projector_port" SOUK_PARTITIONS=4 \
		SOUK_PROJECTIONS=listings SOUK_STREAM="${RUN_STREAM}_search"
	# The notification stream never ends: Schemathesis would wait on it
	# until its request timeout. It is tested end to end in tests/e2e.
	run_schemathesis query-api "http://127.0.0.1:$port" --exclude-path /notifications/stream
}

main() {
	cd "$SOUK_ROOT"
	local services=("$@") service failed=()
	((${#services[@]} > 0)) || services=("${ALL_SERVICES[@]}")
	for service in "${services[@]}"; do
		declare -F "fuzz_${service//-/_}" >/dev/null ||
			souk_die "unknown service $service (known: ${ALL_SERVICES[*]})"
	done

	export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
	souk_ensure_services
	ensure_schemathesis
	souk_info "building the debug binaries"
	local binaries=(--bin replay-tool)
	for service in "${services[@]}"; do
		binaries+=(--bin "$service")
		# query-api's fuzzing runs a projector to fill the search index.
		[[ $service == query-api ]] && binaries+=(--bin projector)
	done
	# `--workspace`, not `-p` per package: Cargo unifies dependency features
	# over the packages it selects, so this selects what `cargo test
	# --workspace` did, and after the test run (CI) only the binaries are
	# compiled and linked, not a second copy of the dependencies.
	cargo build --locked --workspace "${binaries[@]}"

	WORK_DIR=$(mktemp -d -t souk-schemathesis.XXXXXX)
	trap cleanup EXIT
	trap 'exit 130' INT TERM
	"$BIN_DIR/replay-tool" keys --private-key "$WORK_DIR/keys/jwt-private.pem" \
		--public-key "$WORK_DIR/keys/jwt-public.pem"

	for service in "${services[@]}"; do
		"fuzz_${service//-/_}" || failed+=("$service")
	done
	if ((${#failed[@]} > 0)); then
		souk_die "schemathesis failed for: ${failed[*]}"
	fi
	souk_info "schemathesis: no server error and no schema violation in ${services[*]}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	main "$@"
fi
