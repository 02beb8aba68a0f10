# shellcheck shell=bash
# Shell functions shared by scripts/*.sh and .ci/run. Source it; it sets no
# shell options of its own and runs nothing when sourced.
#
# Configuration comes from the environment, with the defaults of shared/BRIEF.md:
#   DATABASE_URL   postgres://postgres@127.0.0.1:5432/souk
#   NATS_URL       nats://127.0.0.1:4222
# souk_ensure_database_url may replace the default DATABASE_URL by one with a
# password (see there); it exports whatever it settles on.

# shellcheck disable=SC2034 # used by the scripts that source this file
SOUK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOUK_DEFAULT_DATABASE_URL="postgres://postgres@127.0.0.1:5432/souk"
# The password up.sh gives the postgres user on a fresh install whose local
# TCP authentication is scram rather than trust. A dev machine's database only.
SOUK_FALLBACK_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/souk"
SOUK_NATS_STORE_DIR="${SOUK_NATS_STORE_DIR:-/var/lib/nats-server}"

souk_info() { printf '==> %s\n' "$*" >&2; }
souk_warn() { printf 'warning: %s\n' "$*" >&2; }
souk_die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

# Runs a command as root: directly when we are root, through sudo otherwise.
souk_as_root() {
	if [[ $(id -u) -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo "$@"
	else
		souk_die "need root (or sudo) to run: $*"
	fi
}

# Runs a command as the postgres OS user (peer authentication on a fresh install).
souk_as_postgres() {
	if [[ $(id -u) -eq 0 ]]; then
		runuser -u postgres -- "$@"
	else
		sudo -u postgres -- "$@"
	fi
}

# Polls a command once a second until it succeeds; fails after timeout_s.
# Usage: souk_wait_for TIMEOUT_S DESCRIPTION COMMAND...
souk_wait_for() {
	local timeout_s=$1 what=$2
	shift 2
	local waited_s=0
	until "$@" >/dev/null 2>&1; do
		if ((waited_s >= timeout_s)); then
			souk_warn "$what not ready after ${timeout_s}s"
			return 1
		fi
		sleep 1
		waited_s=$((waited_s + 1))
	done
}

# Installs the Debian packages that are not installed yet, in one apt-get run.
souk_ensure_packages() {
	local missing=() package
	for package in "$@"; do
		if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$package")
		fi
	done
	((${#missing[@]} == 0)) && return 0
	command -v apt-get >/dev/null 2>&1 ||
		souk_die "missing packages ${missing[*]} and no apt-get to install them (Souk's scripts target Debian 12)"
	souk_info "installing ${missing[*]}"
	souk_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	souk_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

souk_ensure_base_packages() {
	souk_ensure_packages postgresql nats-server curl build-essential pkg-config ca-certificates python3
}

# Headless Chromium and its WebDriver, for the demo page's browser test.
souk_ensure_browser() {
	souk_ensure_packages chromium chromium-driver
}

# Makes cargo available: from ~/.cargo/bin, or by installing Rust with rustup.
souk_ensure_rust() {
	if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
		# shellcheck source=/dev/null
		source "$HOME/.cargo/env"
	fi
	if ! command -v cargo >/dev/null 2>&1; then
		souk_info "installing Rust with rustup"
		curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
			sh -s -- -y --profile minimal --component rustfmt,clippy
		# shellcheck source=/dev/null
		source "$HOME/.cargo/env"
	fi
}

# Makes `cargo fmt` and `cargo clippy` available (CI needs them; rustup's
# minimal profile lacks them).
souk_ensure_rust_lint_tools() {
	souk_ensure_rust
	if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
		command -v rustup >/dev/null 2>&1 || souk_die "cargo fmt or cargo clippy is missing and there is no rustup to add them"
		rustup component add rustfmt clippy
	fi
}

# host and port of a URL such as postgres://user:pass@host:5432/db or nats://host:4222
souk_url_host() {
	local rest=${1#*://}
	rest=${rest##*@}
	rest=${rest%%[/?]*}
	printf '%s\n' "${rest%:*}"
}
souk_url_port() {
	local rest=${1#*://} default=$2
	rest=${rest##*@}
	rest=${rest%%[/?]*}
	if [[ $rest == *:* ]]; then printf '%s\n' "${rest##*:}"; else printf '%s\n' "$default"; fi
}

# The database name of a Postgres URL, and the same URL naming another database.
souk_db_name() {
	local base=${1%%\?*}
	printf '%s\n' "${base##*/}"
}
souk_db_url_with_name() {
	local url=$1 name=$2 query=""
	[[ $url == *\?* ]] && query="?${url#*\?}"
	local base=${url%%\?*}
	printf '%s/%s%s\n' "${base%/*}" "$name" "$query"
}

souk_pg_accepting() {
	local url=${DATABASE_URL:-$SOUK_DEFAULT_DATABASE_URL}
	pg_isready -q -h "$(souk_url_host "$url")" -p "$(souk_url_port "$url" 5432)"
}

# Starts the local PostgreSQL cluster(s) unless the server already accepts connections.
souk_ensure_postgres_running() {
	souk_pg_accepting && return 0
	souk_info "starting PostgreSQL"
	local version
	if command -v pg_ctlcluster >/dev/null 2>&1 && [[ -d /etc/postgresql ]]; then
		for version in /etc/postgresql/*/; do
			version=$(basename "$version")
			[[ -d "/etc/postgresql/$version/main" ]] || continue
			souk_as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
		done
	fi
	souk_pg_accepting || souk_as_root service postgresql start || true
	souk_wait_for 30 "PostgreSQL" souk_pg_accepting ||
		souk_die "PostgreSQL does not accept connections; see /var/log/postgresql/"
}

# Whether psql can log in with this URL (never prompts for a password).
souk_pg_can_login() {
	PGCONNECT_TIMEOUT=5 psql -w -X -Atq "$1" -c 'select 1' >/dev/null 2>&1
}

# Settles DATABASE_URL and exports it. An explicit DATABASE_URL must work as
# given. The default (user postgres, no password) works where local TCP auth
# is trust; a fresh Debian install uses scram instead, so there the postgres
# user gets the password `postgres` (through peer auth, without touching
# pg_hba.conf) and DATABASE_URL carries it.
souk_ensure_database_url() {
	if [[ -n ${DATABASE_URL:-} && $DATABASE_URL != "$SOUK_DEFAULT_DATABASE_URL" ]]; then
		souk_pg_can_login "$(souk_db_url_with_name "$DATABASE_URL" postgres)" ||
			souk_die "cannot log in to PostgreSQL with DATABASE_URL (database postgres on that server)"
		export DATABASE_URL
		return 0
	fi
	local default_admin fallback_admin
	default_admin=$(souk_db_url_with_name "$SOUK_DEFAULT_DATABASE_URL" postgres)
	fallback_admin=$(souk_db_url_with_name "$SOUK_FALLBACK_DATABASE_URL" postgres)
	if souk_pg_can_login "$default_admin"; then
		export DATABASE_URL=$SOUK_DEFAULT_DATABASE_URL
		return 0
	fi
	if ! souk_pg_can_login "$fallback_admin"; then
		souk_info "local PostgreSQL does not trust user postgres over TCP; giving it the dev password 'postgres'"
		souk_as_postgres psql -X -q -c "ALTER USER postgres PASSWORD 'postgres'" ||
			souk_die "cannot set the postgres user's password"
		souk_pg_can_login "$fallback_admin" ||
			souk_die "cannot log in to PostgreSQL as postgres over TCP, with or without the dev password"
	fi
	export DATABASE_URL=$SOUK_FALLBACK_DATABASE_URL
	souk_warn "using DATABASE_URL=$DATABASE_URL (this machine's PostgreSQL does not trust local TCP logins)"
}

# Runs SQL from stdin against DATABASE_URL's server (database postgres), with
# psql variables (-v name=value) interpolated: :'name' as a literal, :"name"
# as an identifier.
souk_psql_admin() {
	psql -w -X -Atq -v ON_ERROR_STOP=1 "$(souk_db_url_with_name "$DATABASE_URL" postgres)" "$@"
}

# Creates a database on DATABASE_URL's server unless it exists.
souk_ensure_database() {
	local name=$1
	if [[ -z $(souk_psql_admin -v name="$name" <<<"select 1 from pg_database where datname = :'name'") ]]; then
		souk_info "creating database $name"
		souk_psql_admin -v name="$name" <<<'CREATE DATABASE :"name"' >/dev/null
	fi
}

souk_drop_database() {
	souk_psql_admin -v name="$1" <<<'DROP DATABASE IF EXISTS :"name" WITH (FORCE)' >/dev/null
}

# Whether something listens on host:port.
souk_port_open() {
	(exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

souk_nats_open() {
	local url=${NATS_URL:-nats://127.0.0.1:4222}
	souk_port_open "$(souk_url_host "$url")" "$(souk_url_port "$url" 4222)"
}

# Deletes the JetStream stream NAME on NATS_URL's server, if it is there
# (no nats CLI needed: one request of the JetStream API over the plain NATS
# protocol). Prints nothing; fails only when the server cannot be reached.
souk_delete_nats_stream() {
	local url=${NATS_URL:-nats://127.0.0.1:4222}
	python3 - "$(souk_url_host "$url")" "$(souk_url_port "$url" 4222)" "$1" <<'PY'
import socket, sys

host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with socket.create_connection((host, port), timeout=5) as conn:
    reader = conn.makefile("rb")
    reader.readline()  # the server's INFO
    conn.sendall(
        b'CONNECT {"verbose":false,"pedantic":false}\r\n'
        b"SUB _INBOX.souk_delete_stream 1\r\n"
        + b"PUB $JS.API.STREAM.DELETE.%s _INBOX.souk_delete_stream 0\r\n\r\n" % name.encode()
    )
    while True:
        line = reader.readline()
        if not line or line.startswith(b"-ERR"):
            sys.exit(1)
        if line.startswith(b"PING"):
            conn.sendall(b"PONG\r\n")
        elif line.startswith(b"MSG"):
            break  # the answer: deleted, or no such stream
PY
}

# Starts nats-server with JetStream unless NATS_URL's port already answers.
souk_ensure_nats_running() {
	souk_nats_open && return 0
	local url=${NATS_URL:-nats://127.0.0.1:4222} host port
	host=$(souk_url_host "$url")
	port=$(souk_url_port "$url" 4222)
	[[ $host == 127.0.0.1 || $host == localhost ]] ||
		souk_die "NATS at $url does not answer, and it is not local, so it cannot be started here"
	souk_info "starting nats-server with JetStream on 127.0.0.1:$port"
	souk_as_root mkdir -p "$SOUK_NATS_STORE_DIR"
	if command -v start-stop-daemon >/dev/null 2>&1; then
		souk_as_root start-stop-daemon --start --oknodo --background \
			--make-pidfile --pidfile "/run/souk-nats-server-$port.pid" \
			--exec /usr/sbin/nats-server -- \
			-a 127.0.0.1 -p "$port" -js -sd "$SOUK_NATS_STORE_DIR" -l /var/log/nats-server.log
	else
		souk_as_root sh -c "nohup nats-server -a 127.0.0.1 -p '$port' -js -sd '$SOUK_NATS_STORE_DIR' \
			-l /var/log/nats-server.log >/dev/null 2>&1 &"
	fi
	souk_wait_for 15 "nats-server" souk_nats_open ||
		souk_die "nats-server did not start; see /var/log/nats-server.log"
}

# Everything the tests and the services need on this machine.
souk_ensure_services() {
	souk_ensure_base_packages
	souk_ensure_rust
	souk_ensure_postgres_running
	souk_ensure_database_url
	souk_ensure_database "$(souk_db_name "$DATABASE_URL")"
	souk_ensure_nats_running
}

# The test suite runs several command APIs, relays and projectors at once,
# each with its own bounded pool: it needs more than PostgreSQL's default 100
# connections. Raises a local cluster's limit (one restart, once).
SOUK_TEST_MAX_CONNECTIONS=${SOUK_TEST_MAX_CONNECTIONS:-300}
souk_ensure_postgres_capacity() {
	local current
	current=$(souk_psql_admin <<<'SHOW max_connections') || return 0
	((current >= SOUK_TEST_MAX_CONNECTIONS)) && return 0
	if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ ! -d /etc/postgresql ]]; then
		souk_warn "PostgreSQL allows $current connections; the tests want $SOUK_TEST_MAX_CONNECTIONS"
		return 0
	fi
	souk_info "raising PostgreSQL's max_connections from $current to $SOUK_TEST_MAX_CONNECTIONS (restart)"
	souk_psql_admin <<<"ALTER SYSTEM SET max_connections = $SOUK_TEST_MAX_CONNECTIONS" >/dev/null
	local version
	for version in /etc/postgresql/*/; do
		version=$(basename "$version")
		[[ -d "/etc/postgresql/$version/main" ]] || continue
		souk_as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart || true
	done
	souk_wait_for 30 "PostgreSQL" souk_pg_accepting ||
		souk_die "PostgreSQL did not come back after raising max_connections"
}

# A TCP port that is free on 127.0.0.1 right now.
souk_free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Stops the process whose pid is in a pid file, if it is still the named
# program (a stale pid may belong to something else by now).
souk_stop_pidfile() {
	local pidfile=$1 program=$2 pid
	[[ -f $pidfile ]] || return 0
	pid=$(<"$pidfile")
	if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
		[[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${program:0:15}" ]]; then
		souk_info "stopping $program (pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		souk_wait_for 15 "$program to stop" bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$pidfile"
}

# Waits until URL answers 2xx, while the process PID lives; shows LOG's tail on failure.
# Usage: souk_wait_for_health URL PID LOG TIMEOUT_S
souk_wait_for_health() {
	local url=$1 pid=$2 log=$3 timeout_s=$4 waited_s=0
	until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
		if ! kill -0 "$pid" 2>/dev/null; then
			souk_warn "the process (pid $pid) exited before $url answered; last lines of $log:"
			tail -n 40 "$log" >&2 || true
			return 1
		fi
		if ((waited_s >= timeout_s)); then
			souk_warn "$url did not answer within ${timeout_s}s; last lines of $log:"
			tail -n 40 "$log" >&2 || true
			return 1
		fi
		sleep 1
		waited_s=$((waited_s + 1))
	done
}

# Exports MEILI_BIN (the Meilisearch server the search tests start) as the
# absolute path of ../shared/bin/meilisearch beside the repository when it
# is there and MEILI_BIN is not set already. A clone made elsewhere from a
# local checkout (CI clones main into a scratch directory) looks beside the
# checkout it was cloned from.
souk_export_meili_bin() {
	[[ -n ${MEILI_BIN:-} ]] && return 0
	local root candidate
	for root in "$SOUK_ROOT" "$(git -C "$SOUK_ROOT" config --get remote.origin.url 2>/dev/null || true)"; do
		[[ -n $root && -d $root ]] || continue
		candidate="$root/../shared/bin/meilisearch"
		if [[ -x $candidate ]]; then
			MEILI_BIN="$(cd "$(dirname "$candidate")" && pwd)/meilisearch"
			export MEILI_BIN
			return 0
		fi
	done
}
