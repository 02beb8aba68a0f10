#!/usr/bin/env bash
# Brings Souk up on this machine (Debian 12) and loads a small demo:
#   1. installs what is missing (PostgreSQL, NATS, build tools, Rust),
#   2. starts PostgreSQL and NATS JetStream unless they already run,
#   3. creates the database, builds the release binaries, makes the dev JWT keys,
#   4. (re)starts command-api, the projector and query-api in the background
#      and waits for each one's /health,
#   5. posts demo listings and a funded wallet through the HTTP API,
#   6. serves the demo storefront (examples/web) on its own origin,
#   7. prints tokens and commands to try.
# Running it again is harmless: the demo users are kept in data/demo/users.env
# and every demo request carries a stable Idempotency-Key.
#
# Configuration (environment): DATABASE_URL, NATS_URL, SOUK_STREAM,
# COMMAND_API_ADDR, SOUK_JWT_PUBLIC_KEY, SOUK_JWT_PRIVATE_KEY, SOUK_JWT_ISSUER,
# SOUK_JWT_AUDIENCE, SEARCH_BACKEND, SEARCH_INDEX_DIR, MEILI_URL, MEILI_API_KEY,
# SOUK_CORS_ORIGINS, SOUK_DEMO_WEB_ADDR, as in README.md.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$SOUK_ROOT"

export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export COMMAND_API_ADDR=${COMMAND_API_ADDR:-127.0.0.1:8080}
export QUERY_API_ADDR=${QUERY_API_ADDR:-127.0.0.1:8081}
export SOUK_PROJECTOR_METRICS_ADDR=${SOUK_PROJECTOR_METRICS_ADDR:-127.0.0.1:8082}
export SOUK_JWT_PRIVATE_KEY=${SOUK_JWT_PRIVATE_KEY:-$SOUK_ROOT/data/keys/jwt-private.pem}
export SOUK_JWT_PUBLIC_KEY=${SOUK_JWT_PUBLIC_KEY:-$SOUK_ROOT/data/keys/jwt-public.pem}
# The demo storefront (examples/web) is served on an origin of its own, which
# both APIs allow (CORS).
export SOUK_DEMO_WEB_ADDR=${SOUK_DEMO_WEB_ADDR:-127.0.0.1:8090}
export SOUK_CORS_ORIGINS=${SOUK_CORS_ORIGINS:-http://$SOUK_DEMO_WEB_ADDR}
# The projector writes the embedded search index, query-api reads it: one directory.
export SEARCH_INDEX_DIR=${SEARCH_INDEX_DIR:-$SOUK_ROOT/data/search}

DATA_DIR=$SOUK_ROOT/data
LOG_DIR=$DATA_DIR/logs
RUN_DIR=$DATA_DIR/run
DEMO_DIR=$DATA_DIR/demo
BIN_DIR=$SOUK_ROOT/target/release
API_URL="http://$COMMAND_API_ADDR"
QUERY_URL="http://$QUERY_API_ADDR"
HEALTH_TIMEOUT_S=60

prepare_machine() {
	souk_ensure_services
}

build() {
	souk_info "building command-api, projector, query-api and replay-tool (release)"
	cargo build --release --locked -p command-api -p projections -p query-api -p replay-tool
	"$BIN_DIR/replay-tool" keys
}

# start_service NAME ADDR: (re)starts target/release/NAME, which serves
# /health on ADDR, and waits for it.
start_service() {
	local name=$1 addr=$2
	mkdir -p "$LOG_DIR" "$RUN_DIR"
	local pidfile=$RUN_DIR/$name.pid log=$LOG_DIR/$name.log
	souk_stop_pidfile "$pidfile" "$name"
	local host=${addr%:*} port=${addr##*:}
	if souk_port_open "$host" "$port"; then
		souk_die "$addr is taken by another process; stop it or change the address of $name"
	fi
	souk_info "starting $name on $addr (log: ${log#"$SOUK_ROOT"/})"
	nohup "$BIN_DIR/$name" >>"$log" 2>&1 </dev/null &
	local pid=$!
	echo "$pid" >"$pidfile"
	souk_wait_for_health "http://$addr/health" "$pid" "$log" "$HEALTH_TIMEOUT_S" ||
		souk_die "$name did not come up"
}

start_services() {
	start_service command-api "$COMMAND_API_ADDR"
	start_service projector "$SOUK_PROJECTOR_METRICS_ADDR"
	start_service query-api "$QUERY_API_ADDR"
}

# The demo users' ids, made once and kept so that a second run reuses them.
load_demo_users() {
	mkdir -p "$DEMO_DIR"
	local users=$DEMO_DIR/users.env
	if [[ ! -f $users ]]; then
		{
			echo "SELLER_ID=$(cat /proc/sys/kernel/random/uuid)"
			echo "BUYER_ID=$(cat /proc/sys/kernel/random/uuid)"
			echo "ADMIN_ID=$(cat /proc/sys/kernel/random/uuid)"
		} >"$users"
	fi
	# shellcheck source=/dev/null
	source "$users"
}

token() {
	"$BIN_DIR/replay-tool" token --sub "$1" --role "$2" --ttl-seconds 43200
}

# POSTs JSON and prints the response body; fails with the body on a non-2xx.
# Usage: api_post PATH TOKEN IDEMPOTENCY_KEY BODY
api_post() {
	local path=$1 bearer=$2 key=$3 body=$4 response status
	response=$(curl -sS --max-time 30 -w '\n%{http_code}' -X POST "$API_URL$path" \
		-H "Authorization: Bearer $bearer" \
		-H 'Content-Type: application/json' \
		-H "Idempotency-Key: $key" \
		--data "$body") || souk_die "POST $path: no response from command-api"
	status=${response##*$'\n'}
	response=${response%$'\n'*}
	if [[ $status != 2?? ]]; then
		souk_die "POST $path answered $status: $response"
	fi
	printf '%s\n' "$response"
}

json_field() {
	python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

load_demo() {
	souk_info "loading the demo through $API_URL"
	load_demo_users
	SELLER_TOKEN=$(token "$SELLER_ID" seller)
	BUYER_TOKEN=$(token "$BUYER_ID" buyer)
	ADMIN_TOKEN=$(token "$ADMIN_ID" admin)

	local listings=(
		'Vintage leather jacket|A brown leather jacket from the 80s, size M.|fashion|good|4500|1'
		'iPhone 12, 128 GB|Unlocked, battery at 86 %, with its box.|electronics|like_new|32900|2'
		'Moka pot, 6 cups|Aluminium, works well, a few scratches.|home|fair|1999|3'
	)
	local entry title description category condition price quantity response index=0
	# The seller's wallet receives the escrow of wallet-paid orders.
	response=$(api_post /wallets "$SELLER_TOKEN" demo-seller-wallet '{"currency": "EUR"}')
	SELLER_WALLET_ID=$(json_field id <<<"$response")
	LISTING_IDS=()
	for entry in "${listings[@]}"; do
		IFS='|' read -r title description category condition price quantity <<<"$entry"
		index=$((index + 1))
		response=$(api_post /listings "$SELLER_TOKEN" "demo-listing-$index" "$(
			cat <<-JSON
				{"title": "$title", "description": "$description", "category": "$category",
				 "condition": "$condition", "price": {"amount": $price, "currency": "EUR"},
				 "quantity": $quantity, "location": {"city": "Lyon", "country": "FR"},
				 "payout_wallet_id": "$SELLER_WALLET_ID"}
			JSON
		)")
		LISTING_IDS+=("$(json_field id <<<"$response")")
	done

	response=$(api_post /wallets "$BUYER_TOKEN" demo-buyer-wallet '{"currency": "EUR"}')
	WALLET_ID=$(json_field id <<<"$response")
	response=$(api_post "/wallets/$WALLET_ID/deposits" "$ADMIN_TOKEN" demo-topup \
		'{"amount": {"amount": 50000, "currency": "EUR"}, "reference": "demo-topup"}')
	POSITION=$(json_field position <<<"$response")
}

# Serves examples/web on SOUK_DEMO_WEB_ADDR with python3's static server, with
# a config.js that signs the page in as the demo buyer and pays from the demo
# wallet.
serve_demo_page() {
	local web=$DEMO_DIR/web pidfile=$RUN_DIR/demo-web.pid log=$LOG_DIR/demo-web.log
	local host=${SOUK_DEMO_WEB_ADDR%:*} port=${SOUK_DEMO_WEB_ADDR##*:}
	rm -rf "$web"
	mkdir -p "$web"
	cp "$SOUK_ROOT"/examples/web/* "$web/"
	cat >"$web/config.js" <<-JS
		window.SOUK_DEMO = {
		  command_api: "$API_URL", query_api: "$QUERY_URL",
		  token: "$BUYER_TOKEN", user: "$BUYER_ID", wallet: "$WALLET_ID",
		};
	JS
	souk_stop_pidfile "$pidfile" python3
	if souk_port_open "$host" "$port"; then
		souk_die "$SOUK_DEMO_WEB_ADDR is taken by another process; stop it or set SOUK_DEMO_WEB_ADDR"
	fi
	nohup python3 -m http.server --bind "$host" --directory "$web" "$port" >>"$log" 2>&1 </dev/null &
	echo $! >"$pidfile"
	souk_info "demo storefront at http://$SOUK_DEMO_WEB_ADDR/ (CORS allowed on both APIs)"
}

print_next_steps() {
	cat <<-EOF

		Demo storefront (search, buy, live notifications): http://$SOUK_DEMO_WEB_ADDR/

		Souk is up: command API at $API_URL, query API at $QUERY_URL, projector metrics at
		http://$SOUK_PROJECTOR_METRICS_ADDR/metrics (pids and logs in data/run and data/logs).
		Demo: 3 listings by a seller (paid out to the seller's EUR wallet), and a buyer's EUR
		wallet with 500.00 EUR deposited by an admin. Request shapes: curl $API_URL/openapi.json
		Tokens are valid for 12 hours; make more with target/release/replay-tool token --sub <uuid> --role <role>.

		export SELLER_TOKEN='$SELLER_TOKEN'
		export BUYER_TOKEN='$BUYER_TOKEN'
		export ADMIN_TOKEN='$ADMIN_TOKEN'
		export LISTING_ID='${LISTING_IDS[0]}'
		export WALLET_ID='$WALLET_ID'
		export SELLER_WALLET_ID='$SELLER_WALLET_ID'

		# reserve one item for 10 minutes (201, or 409 insufficient_stock); keep the hold's id
		RESERVATION_ID=\$(curl -sS -X POST $API_URL/listings/\$LISTING_ID/reservations -H "Authorization: Bearer \$BUYER_TOKEN" \\
		  -H 'Content-Type: application/json' -d '{"quantity": 1, "ttl_seconds": 600}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')

		# buy it with that hold, paying from the wallet through escrow
		# (or give the hold back: POST /listings/\$LISTING_ID/reservations/\$RESERVATION_ID/release)
		curl -sS -X POST $API_URL/orders -H "Authorization: Bearer \$BUYER_TOKEN" -H 'Content-Type: application/json' \\
		  -d '{"lines": [{"listing_id": "'\$LISTING_ID'", "quantity": 1, "reservation_id": "'\$RESERVATION_ID'"}], "payment_method": "wallet_escrow", "wallet_id": "'\$WALLET_ID'",
		       "shipping_address": {"name": "Ada Buyer", "line1": "1 rue de la Paix", "city": "Paris", "postal_code": "75002", "country": "FR"}}'

		# lower the price (the seller's own listing)
		curl -sS -X POST $API_URL/listings/\$LISTING_ID/price -H "Authorization: Bearer \$SELLER_TOKEN" \\
		  -H 'Content-Type: application/json' -d '{"price": {"amount": 4000, "currency": "EUR"}}'

		# a buyer cannot deposit: 403 forbidden
		curl -sS -X POST $API_URL/wallets/\$WALLET_ID/deposits -H "Authorization: Bearer \$BUYER_TOKEN" \\
		  -H 'Content-Type: application/json' -d '{"amount": {"amount": 100, "currency": "EUR"}, "reference": "nope"}'

		# read your write: the wallet as the query API sees it once it includes the deposit
		curl -sS "$QUERY_URL/wallets/\$WALLET_ID?after=$POSITION" -H "Authorization: Bearer \$BUYER_TOKEN"

		# listings with their available stock; the projections' checkpoints and lag
		curl -sS "$QUERY_URL/listings?category=home" -H "Authorization: Bearer \$BUYER_TOKEN"
		# full-text search, typo tolerant, with facet counts, cheapest first
		curl -sS "$QUERY_URL/search?q=iphne&sort=price_asc&after=$POSITION" -H "Authorization: Bearer \$BUYER_TOKEN"
		curl -sS "$QUERY_URL/projections" -H "Authorization: Bearer \$ADMIN_TOKEN"

		Last position token: $POSITION
		Stop everything with: kill \$(cat data/run/*.pid)
	EOF
}

prepare_machine
build
start_services
load_demo
serve_demo_page
print_next_steps
