#!/usr/bin/env bash
# Fuzzes Souk's HTTP APIs from their own /openapi.json with Schemathesis and
# fails on any 5xx or any response that does not match the documented schema.
#
# Each service runs from the debug build against a throwaway database
# (souk_schemathesis_<random>) with a throwaway JWT key pair, on a free port;
# it is fuzzed once per role, with that role's token. Whatever happens, the
# services are stopped and the databases dropped at exit.
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
ALL_SERVICES=(command-api)

BIN_DIR=$SOUK_ROOT/target/debug
SCHEMATHESIS_STATE_DIR=$SOUK_ROOT/data/schemathesis
HEALTH_TIMEOUT_S=60
WORK_DIR=""
STARTED_PIDS=()
SCHEMATHESIS_PID=""
CREATED_DATABASES=()

cleanup() {
	local status=$? pid database
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
		SOUK_STREAM=souk_schemathesis \
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

# Fuzzes the API at BASE_URL once per role. Returns non-zero if any run failed.
# Usage: run_schemathesis NAME BASE_URL
run_schemathesis() {
	local name=$1 base_url=$2 role token failed=0
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
			--no-color) &
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
	cargo build --locked -p command-api -p replay-tool

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
