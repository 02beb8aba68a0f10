//! The OpenAPI 3.0.3 document of the query API, served at `/openapi.json`.
//!
//! It describes exactly what the handlers in `routes` accept and answer, and
//! CI fuzzes the running API from it (`scripts/schemathesis.sh`), so a route,
//! a parameter or a field that changes there must change here too. Paths are
//! built from one [`Read`] per operation; `components` holds the shared
//! parameters (`after`, `limit`, `cursor`), the standard error responses and
//! the bodies, which list every field (`additionalProperties: false`).

use serde_json::{Map, Value, json};

use crate::params::{CursorKind, DEFAULT_LIMIT, MAX_CURSOR_LEN, MAX_LIMIT};
use crate::routes::{CONDITIONS, LAG_EVENTS_CAP, STATUSES};

/// Every `domain::order::OrderStatus::as_str`.
const ORDER_STATUSES: &[&str] = &[
    "placed",
    "awaiting_payment",
    "confirmed",
    "rejected",
    "shipped",
    "delivered",
    "completed",
    "cancelled",
    "return_requested",
    "returned",
    "refunded",
];

/// The OpenAPI 3.0 document served at `/openapi.json`.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Souk query API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The read side of Souk: the read models the projectors build from the \
                event store. Every route is a GET. Every refusal is \
                `{\"error\": {\"code\", \"message\"}}` with a stable code. Query strings are strict: \
                a parameter the route does not take, or one given twice, is 400 `invalid_query`. \
                Every route takes `after`, a position token from the command API: the answer then \
                includes that write (read your writes). The request waits, bounded (5 s by \
                default), until every partition of the projections the route reads has caught up \
                with it, else it is answered 503 `not_caught_up` with `Retry-After`. Lists are \
                pages of `{\"items\", \"next_cursor\"}`: pass `next_cursor` back as `cursor` for \
                the next page, until it is null.",
        },
        "tags": [
            {"name": "service", "description": "Health, metrics and this document."},
            {"name": "wallets", "description": "Balances and ledgers: the wallet's owner, admins and auditors."},
            {"name": "listings", "description": "Browse listings and their stock: any signed-in user."},
            {"name": "orders", "description": "Orders: their buyer, their seller, admins and auditors."},
            {"name": "products", "description": "Product timelines: any signed-in user."},
            {"name": "sellers", "description": "Seller statistics: any signed-in user."},
            {"name": "operations", "description": "Projection checkpoints and lag: operators, admins, auditors."},
            {"name": "notifications", "description": "Live updates for the signed-in user."},
        ],
        "security": [{"bearerAuth": []}],
        "paths": merge([
            service_paths(),
            wallet_paths(),
            listing_paths(),
            order_paths(),
            other_paths(),
        ]),
        "components": components(),
    })
}

/// The union of JSON objects (the pieces of one map, built apart to stay
/// readable and within `json!`'s recursion limit).
fn merge<const N: usize>(objects: [Value; N]) -> Value {
    let mut merged = Map::new();
    for object in objects {
        let Value::Object(object) = object else {
            unreachable!("only objects are merged")
        };
        merged.extend(object);
    }
    Value::Object(merged)
}

/// `{"$ref": "#/components/<kind>/<name>"}`.
fn reference(kind: &str, name: &str) -> Value {
    json!({"$ref": format!("#/components/{kind}/{name}")})
}

fn schema(name: &str) -> Value {
    reference("schemas", name)
}

fn parameter(name: &str) -> Value {
    reference("parameters", name)
}

fn uuid(description: &str) -> Value {
    json!({"type": "string", "format": "uuid", "description": description})
}

fn nullable(mut field: Value) -> Value {
    field["nullable"] = json!(true);
    field
}

fn timestamp(description: &str) -> Value {
    json!({"type": "string", "format": "date-time", "description": description})
}

fn integer(description: &str) -> Value {
    json!({"type": "integer", "description": description})
}

fn count(description: &str) -> Value {
    json!({"type": "integer", "minimum": 0, "description": description})
}

fn path_id(description: &str) -> Value {
    json!({
        "name": "id",
        "in": "path",
        "required": true,
        "description": format!("{description} Anything but a UUID is 400 `invalid_id`."),
        "schema": {"type": "string", "format": "uuid"},
    })
}

/// A query parameter of one route.
fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({
        "name": name,
        "in": "query",
        "required": false,
        "description": description,
        "schema": schema,
    })
}

/// An object whose every property is required and no other is allowed.
fn object(properties: Value) -> Value {
    let required: Vec<String> = properties
        .as_object()
        .map(|properties| properties.keys().cloned().collect())
        .unwrap_or_default();
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

/// A page of `item`s.
fn page_of(item: &str) -> Value {
    object(json!({
        "items": {"type": "array", "maxItems": MAX_LIMIT, "items": schema(item)},
        "next_cursor": nullable(json!({
            "type": "string",
            "description": "Pass as `cursor` for the next page; null on the last page.",
        })),
    }))
}

/// One read: a GET with its parameters, its success body and the errors it
/// can meet. Every read can be refused 400 (query string), 401, 413, 500
/// and 503; `forbidden` and `not_found` add 403 and 404.
struct Read<'a> {
    operation_id: &'a str,
    tag: &'a str,
    summary: &'a str,
    description: &'a str,
    parameters: Vec<Value>,
    success: Value,
    forbidden: bool,
    not_found: bool,
}

/// A link from a read's answer to an operation that takes a value of it:
/// the operation's id (also the link's name) and the values of its
/// parameters.
type Link<'a> = (&'a str, Value);

/// Links passing the `field` of the answer as the `id` of each operation.
fn id_links<'a>(field: &str, operation_ids: &[&'a str]) -> Vec<Link<'a>> {
    let parameters = json!({"id": format!("$response.body#/{field}")});
    operation_ids
        .iter()
        .map(|operation_id| (*operation_id, parameters.clone()))
        .collect()
}

impl Read<'_> {
    fn build(self) -> Value {
        self.build_linked(&[])
    }

    fn build_linked(self, links: &[Link<'_>]) -> Value {
        let mut parameters = self.parameters;
        parameters.push(parameter("After"));
        parameters.push(parameter("RequestId"));
        let mut responses = Map::new();
        responses.insert(
            "200".to_owned(),
            json!({
                "description": "The read model's answer.",
                "headers": {"X-Request-Id": reference("headers", "RequestId")},
                "content": {"application/json": {"schema": self.success}},
            }),
        );
        let mut errors = vec![("400", "BadRequest"), ("401", "Unauthorized")];
        if self.forbidden {
            errors.push(("403", "Forbidden"));
        }
        if self.not_found {
            errors.push(("404", "NotFound"));
        }
        errors.extend([
            ("413", "PayloadTooLarge"),
            ("500", "Internal"),
            ("503", "Unavailable"),
        ]);
        for (status, name) in errors {
            responses.insert(status.to_owned(), reference("responses", name));
        }
        if !links.is_empty() {
            let links: Map<String, Value> = links
                .iter()
                .map(|(operation_id, parameters)| {
                    let link = json!({"operationId": operation_id, "parameters": parameters});
                    ((*operation_id).to_owned(), link)
                })
                .collect();
            responses["200"]["links"] = Value::Object(links);
        }
        json!({"get": {
            "operationId": self.operation_id,
            "tags": [self.tag],
            "summary": self.summary,
            "description": self.description,
            "parameters": parameters,
            "responses": responses,
        }})
    }
}

/// `limit` and the `cursor` of the list `kind`.
fn paging(kind: CursorKind) -> Vec<Value> {
    let cursor = json!({
        "name": "cursor",
        "in": "query",
        "required": false,
        "description": "The `next_cursor` of the previous page of this list. Anything else (a \
            cursor of another list included): 400 `invalid_cursor`.",
        "schema": {"type": "string", "maxLength": MAX_CURSOR_LEN, "pattern": kind.pattern()},
    });
    vec![parameter("Limit"), cursor]
}

fn service_paths() -> Value {
    let plain = |operation_id: &str, summary: &str, content: Value| {
        json!({"get": {
            "operationId": operation_id,
            "tags": ["service"],
            "summary": summary,
            "security": [],
            "responses": {
                "200": {"description": summary, "content": content},
                "413": reference("responses", "PayloadTooLarge"),
                "500": reference("responses", "Internal"),
                "503": reference("responses", "Unavailable"),
            },
        }})
    };
    json!({
        "/health": {"get": {
            "operationId": "health",
            "tags": ["service"],
            "summary": "Whether the API and its database are up",
            "security": [],
            "responses": {
                "200": {
                    "description": "Up, database reachable.",
                    "content": {"application/json": {"schema": schema("Health")}},
                },
                "413": reference("responses", "PayloadTooLarge"),
                "503": {
                    "description": "The database is unreachable (a `Health` body), or the API is shedding load \
                        (an `Error` body).",
                    "headers": {"Retry-After": reference("headers", "RetryAfter")},
                    "content": {"application/json": {"schema": {
                        "oneOf": [schema("Health"), schema("Error")],
                    }}},
                },
                "500": reference("responses", "Internal"),
            },
        }},
        "/metrics": plain(
            "metrics",
            "Prometheus metrics",
            json!({"text/plain": {"schema": {"type": "string"}}}),
        ),
        "/openapi.json": plain(
            "openapi",
            "This document",
            json!({"application/json": {"schema": {"type": "object"}}}),
        ),
    })
}

fn wallet_paths() -> Value {
    json!({
        "/wallets/{id}": Read {
            operation_id: "getWallet",
            tag: "wallets",
            summary: "A wallet's balances",
            description: "Available, held (escrow locked for the owner's orders) and pending \
                incoming (escrow the owner will receive), in minor units of the wallet's currency. \
                The owner, admins and auditors only (403 for others); 404 `wallet_not_found`.",
            parameters: vec![path_id("The wallet.")],
            success: schema("Wallet"),
            forbidden: true,
            not_found: true,
        }.build_linked(&id_links("id", &["getWalletEntries"])),
        "/wallets/{id}/entries": Read {
            operation_id: "getWalletEntries",
            tag: "wallets",
            summary: "A wallet's ledger, newest first",
            description: "One entry per wallet event with the balances after it. Same access as \
                the wallet.",
            parameters: [vec![path_id("The wallet.")], paging(CursorKind::WalletEntries)].concat(),
            success: page_of("WalletEntry"),
            forbidden: true,
            not_found: true,
        }.build(),
    })
}

/// The filters `/listings` and `/search` share.
fn listing_filters() -> Vec<Value> {
    vec![
        query(
            "category",
            json!({"type": "string", "minLength": 1, "maxLength": 64}),
            "Exact category (surrounding whitespace is trimmed; 1 to 64 characters, no \
            control characters).",
        ),
        query(
            "condition",
            json!({"type": "string", "enum": CONDITIONS}),
            "Item condition.",
        ),
        query(
            "seller_id",
            json!({"type": "string", "format": "uuid"}),
            "The seller.",
        ),
        query(
            "currency",
            schema("Currency"),
            "Only prices in this currency.",
        ),
        query(
            "min_price",
            json!({"type": "integer", "minimum": 0, "maximum": domain::values::MAX_AMOUNT}),
            "Lowest price, in minor units, inclusive. Above `max_price`: 400.",
        ),
        query(
            "max_price",
            json!({"type": "integer", "minimum": 0, "maximum": domain::values::MAX_AMOUNT}),
            "Highest price, in minor units, inclusive.",
        ),
        query(
            "status",
            json!({"type": "string", "enum": STATUSES}),
            "Listing status.",
        ),
    ]
}

fn listing_paths() -> Value {
    json!({
        "/search": Read {
            operation_id: "searchListings",
            tag: "listings",
            summary: "Listings by free text, typo tolerant, with facet counts",
            description: "`q` matches titles and descriptions: a word of 5 to 8 characters \
                tolerates one typo, a longer one two, and the last word also matches as a prefix \
                (`iphne` finds \"iPhone\"). Without `q`, every listing the filters let through \
                matches. The filters are those of `/listings` (same rules, same 403 for \
                `status=deleted`). `sort`: `relevance` (the default with `q`), `price_asc`, \
                `price_desc` or `newest` (the default without `q`). `facets` counts the matches \
                by category and by condition (up to 100 values each), `total` the matches. \
                Pages reach the first 1,000 matches. With `after`, the answer also waits for \
                the search index to include that write.",
            parameters: [
                paging(CursorKind::Search),
                vec![
                    query("q", json!({"type": "string", "maxLength": projections::search::MAX_QUERY_CHARS}),
                        "Free text: at most 200 characters and 8 words, no control characters \
                        (else 400 `invalid_parameter`)."),
                    query("sort", json!({"type": "string", "enum": projections::search::Sort::NAMES}),
                        "The order of the results."),
                ],
                listing_filters(),
            ].concat(),
            success: schema("SearchPage"),
            forbidden: true,
            not_found: false,
        }.build_linked(&[
            id_links("items/0/id", &["getListing"]),
            id_links("items/0/seller_id", &["getSellerStats"]),
        ].concat()),
        "/listings": Read {
            operation_id: "listListings",
            tag: "listings",
            summary: "Listings, newest first, filtered",
            description: "Every filter is optional; they combine with AND. Without `status`, \
                deleted listings are left out; `status=deleted` is for admins, auditors and a \
                seller naming themselves in `seller_id` (else 403). A filter value out of its rules \
                is 400 `invalid_parameter`.",
            parameters: [paging(CursorKind::Listings), listing_filters()].concat(),
            success: page_of("Listing"),
            forbidden: true,
            not_found: false,
        }.build_linked(&[
            id_links("items/0/id", &["getListing"]),
            id_links("items/0/product_id", &["getProductTimeline"]),
            id_links("items/0/seller_id", &["getSellerStats"]),
        ].concat()),
        "/listings/{id}": Read {
            operation_id: "getListing",
            tag: "listings",
            summary: "One listing with its stock",
            description: "`stock` is what the seller set, `held` what active reservations hold, \
                `available` the difference. A deleted listing is 404 `listing_not_found` except \
                for its seller, admins and auditors.",
            parameters: vec![path_id("The listing.")],
            success: schema("Listing"),
            forbidden: false,
            not_found: true,
        }.build_linked(&[
            id_links("product_id", &["getProductTimeline"]),
            id_links("seller_id", &["getSellerStats"]),
        ].concat()),
    })
}

fn order_paths() -> Value {
    json!({
        "/orders": Read {
            operation_id: "listOrders",
            tag: "orders",
            summary: "The caller's orders in one role, newest first",
            description: "`role` is required (missing: 400 `invalid_query`). Admins and auditors \
                may list another user's orders with `user_id`; anyone else naming another user \
                gets 403.",
            parameters: [
                paging(CursorKind::Orders),
                vec![
                    json!({
                        "name": "role",
                        "in": "query",
                        "required": true,
                        "description": "Orders the user placed (buyer) or received (seller).",
                        "schema": {"type": "string", "enum": ["buyer", "seller"]},
                    }),
                    query("user_id", json!({"type": "string", "format": "uuid"}),
                        "Whose orders (default: the caller's)."),
                ],
            ].concat(),
            success: page_of("Order"),
            forbidden: true,
            not_found: false,
        }.build_linked(&id_links("items/0/id", &["getOrder"])),
        "/orders/{id}": Read {
            operation_id: "getOrder",
            tag: "orders",
            summary: "One order",
            description: "Its buyer, its seller, admins and auditors (403 for others); 404 \
                `order_not_found`.",
            parameters: vec![path_id("The order.")],
            success: schema("Order"),
            forbidden: true,
            not_found: true,
        }.build_linked(&id_links("seller_id", &["getSellerStats"])),
    })
}

fn other_paths() -> Value {
    json!({
        "/products/{id}/timeline": Read {
            operation_id: "getProductTimeline",
            tag: "products",
            summary: "A product's timeline, oldest entry first",
            description: "The life story of one physical product across owners and relistings. \
                404 `product_not_found`.",
            parameters: [vec![path_id("The product.")], paging(CursorKind::Timeline)].concat(),
            success: schema("Timeline"),
            forbidden: false,
            not_found: true,
        }.build(),
        "/sellers/{id}/stats": Read {
            operation_id: "getSellerStats",
            tag: "sellers",
            summary: "A seller's statistics",
            description: "A seller without orders has zero counts and null rates (never 404: the \
                read model cannot tell a seller without orders from any other user).",
            parameters: vec![path_id("The seller (a user id).")],
            success: schema("SellerStats"),
            forbidden: false,
            not_found: true,
        }.build(),
        "/projections": Read {
            operation_id: "getProjections",
            tag: "operations",
            summary: "Checkpoint and lag of each projection, and the relay's checkpoint",
            description: "Operators, admins and auditors (403 for others). `after` waits for every \
                projection.",
            parameters: vec![],
            success: schema("Projections"),
            forbidden: true,
            not_found: false,
        }.build(),
        "/notifications/stream": notification_path(),
    })
}

fn notification_path() -> Value {
    let mut operation = Read {
        operation_id: "streamNotifications",
        tag: "notifications",
        summary: "Server-sent events for the signed-in user",
        description: "A `text/event-stream` that stays open. `event: ready` once notifications \
            flow (the stream reads new events only: after connecting, read the current state \
            from the other routes). Then `event: order_status` (`data`: `{order_id, status, \
            event_type, role, position, recorded_at}`) for the user's orders as buyer or seller, \
            and `event: funds_held` / `event: funds_released` (`data`: `{wallet_id, order_id, \
            amount, currency, event_type, position, recorded_at}`) for the user's wallets; each \
            event's `id` is its position token. Comments keep the connection alive. A client that \
            falls behind gets `event: lagged` and the stream closes. Too many open streams (in \
            all, or for this user): 503. `after` waits for the orders and wallets projections \
            before the stream opens.",
        parameters: vec![],
        success: json!({"type": "string"}),
        forbidden: false,
        not_found: false,
    }
    .build();
    operation["get"]["responses"]["200"] = json!({
        "description": "The event stream.",
        "headers": {"X-Request-Id": reference("headers", "RequestId")},
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    });
    operation
}

fn components() -> Value {
    json!({
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "An RS256 JWT with `sub` (a UUID), `role` (buyer, seller, admin, auditor or \
                    operator) and `exp`. Missing or invalid: 401.",
            },
        },
        "parameters": {
            "After": {
                "name": "after",
                "in": "query",
                "required": false,
                "description": "A position token from the command API. The answer waits, bounded, until \
                    the read models include that write; past the bound, 503 `not_caught_up`. Not a \
                    token: 400 `invalid_position`.",
                "schema": {"type": "string", "pattern": "^[0-7][0-9a-fA-F]{15}[0-7][0-9a-fA-F]{15}$"},
            },
            "Limit": {
                "name": "limit",
                "in": "query",
                "required": false,
                "description": "Page size. Out of range or not an integer: 400 `invalid_limit`.",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
            },
            "RequestId": {
                "name": "X-Request-Id",
                "in": "header",
                "required": false,
                "description": "Echoed back; one is made up when absent.",
                "schema": {"type": "string"},
            },
        },
        "headers": {
            "RequestId": {
                "description": "The request's id (the client's X-Request-Id, or a new UUID).",
                "schema": {"type": "string"},
            },
            "RetryAfter": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer"},
            },
        },
        "responses": {
            "BadRequest": error_response(
                "A query parameter the route does not take, given twice or undecodable, or a missing \
                 required one (`invalid_query`); a bad `limit` (`invalid_limit`), `cursor` \
                 (`invalid_cursor`) or `after` (`invalid_position`); a filter out of its rules \
                 (`invalid_parameter`); a path id that is not a UUID (`invalid_id`)."
            ),
            "Unauthorized": error_response("No bearer token, or one that does not verify (`unauthorized`)."),
            "Forbidden": error_response("The caller may not see this (`forbidden`)."),
            "NotFound": error_response(
                "Not in the read model (`wallet_not_found`, `listing_not_found`, `order_not_found`, \
                 `product_not_found`; a write not yet projected is not found either: pass its \
                 position as `after`), or a path that names no route, such as an empty id \
                 (`not_found`)."
            ),
            "PayloadTooLarge": error_response("A request body larger than the limit (`payload_too_large`)."),
            "Internal": error_response("A bug; details are in the server log (`internal`)."),
            "Unavailable": {
                "description": "The read models did not catch up with `after` in time \
                    (`not_caught_up`), the database is unreachable, too many requests are in flight \
                    or too many notification streams are open (`unavailable`).",
                "headers": {"Retry-After": reference("headers", "RetryAfter")},
                "content": {"application/json": {"schema": schema("Error")}},
            },
        },
        "schemas": merge([service_schemas(), wallet_schemas(), listing_schemas(), order_schemas(), other_schemas()]),
    })
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema("Error")}},
    })
}

fn service_schemas() -> Value {
    json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "description": "Stable, machine-readable."},
                        "message": {"type": "string", "description": "For people."},
                    },
                },
            },
        },
        "Health": object(json!({
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "database": {"type": "string", "enum": ["up", "down"]},
            "notifications": {
                "type": "string",
                "enum": ["live", "connecting"],
                "description": "Whether the notification consumer reads the event stream.",
            },
        })),
        "Position": {
            "type": "string",
            "pattern": "^[0-9a-f]{32}$",
            "description": "A position token: a place in the global order of events.",
        },
        "Currency": {
            "type": "string",
            "pattern": "^[A-Z]{3}$",
            "description": "An ISO 4217 code Souk accepts. Others: 400 `invalid_parameter`.",
        },
        "Money": object(json!({
            "amount": integer("Minor units (cents); never floating point."),
            "currency": {"type": "string"},
        })),
    })
}

fn wallet_schemas() -> Value {
    json!({
        "Wallet": object(json!({
            "id": uuid("The wallet."),
            "owner_id": uuid("Its owner."),
            "currency": {"type": "string"},
            "available": integer("Spendable and withdrawable, in minor units."),
            "held": integer("Escrow locked for the owner's orders."),
            "pending_incoming": integer("Escrow the owner will receive when orders are delivered."),
            "created_at": timestamp("When it was opened."),
            "updated_at": timestamp("Its last event."),
            "version": count("Its number of events."),
        })),
        "WalletEntry": object(json!({
            "sequence": count("The wallet event's sequence number."),
            "kind": {"type": "string", "description": "The event type (FundsDeposited, FundsHeld, ...)."},
            "amount": integer("The amount moved, in minor units."),
            "available": integer("Available after the event."),
            "held": integer("Held after the event."),
            "pending_incoming": integer("Pending incoming after the event."),
            "order_id": nullable(uuid("The order it is for, if any.")),
            "reference": nullable(json!({"type": "string", "description": "A deposit's or withdrawal's reference."})),
            "counterparty_wallet_id": nullable(uuid("The other wallet of an escrow movement.")),
            "recorded_at": timestamp("When the event was recorded."),
        })),
    })
}

fn listing_schemas() -> Value {
    let counts = json!({
        "type": "object",
        "description": "Matches by value.",
        "additionalProperties": {"type": "integer", "minimum": 0},
    });
    json!({
        "SearchPage": object(json!({
            "items": {"type": "array", "maxItems": MAX_LIMIT, "items": schema("Listing")},
            "next_cursor": nullable(json!({
                "type": "string",
                "description": "Pass as `cursor` for the next page; null on the last page.",
            })),
            "total": count("How many listings match (Meilisearch: its estimate)."),
            "facets": object(json!({"category": counts, "condition": counts})),
        })),
        "Listing": object(json!({
            "id": uuid("The listing."),
            "seller_id": uuid("Its seller."),
            "product_id": uuid("The product whose timeline tells its story."),
            "title": {"type": "string"},
            "description": {"type": "string"},
            "category": {"type": "string"},
            "subcategory": nullable(json!({"type": "string"})),
            "condition": {"type": "string", "enum": CONDITIONS},
            "price": schema("Money"),
            "location": object(json!({
                "city": {"type": "string"},
                "country": {"type": "string"},
                "lat": nullable(json!({"type": "number"})),
                "lon": nullable(json!({"type": "number"})),
            })),
            "attributes": {"type": "object", "description": "Free-form attributes: JSON scalars by name."},
            "images": {"type": "array", "items": {"type": "string"}},
            "status": {"type": "string", "enum": STATUSES},
            "payout_wallet_id": nullable(uuid("Where the seller is paid, for wallet escrow.")),
            "stock": count("Units the seller put in stock."),
            "held": count("Units held by active reservations."),
            "available": count("Units that can still be reserved."),
            "created_at": timestamp("When it was listed."),
            "updated_at": timestamp("Its last change."),
            "version": count("Its number of events."),
        })),
    })
}

fn order_schemas() -> Value {
    json!({
        "Order": object(json!({
            "id": uuid("The order."),
            "checkout_id": uuid("Shared by the orders of one checkout (one per seller)."),
            "buyer_id": uuid("The buyer."),
            "seller_id": uuid("The seller."),
            "status": {"type": "string", "enum": ORDER_STATUSES},
            "payment_method": {"type": "string", "enum": ["wallet_escrow", "bank_transfer", "cod"]},
            "total": schema("Money"),
            "lines": {"type": "array", "items": {"type": "object"}, "description": "Listing, quantity and unit price at order time, per line."},
            "shipping_address": {"type": "object"},
            "buyer_wallet_id": nullable(uuid("The buyer's wallet, for wallet escrow.")),
            "seller_wallet_id": nullable(uuid("The seller's payout wallet, for wallet escrow.")),
            "carrier": nullable(json!({"type": "string"})),
            "tracking_number": nullable(json!({"type": "string"})),
            "reject_reason": nullable(json!({"type": "string"})),
            "cancel_reason": nullable(json!({"type": "string"})),
            "return_reason": nullable(json!({"type": "string"})),
            "escrow_released": {"type": "boolean"},
            "review": nullable(object(json!({
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "comment": {"type": "string"},
            }))),
            "placed_at": timestamp("When it was placed."),
            "confirmed_at": nullable(timestamp("When it was confirmed.")),
            "shipped_at": nullable(timestamp("When it was shipped.")),
            "delivered_at": nullable(timestamp("When it was delivered.")),
            "completed_at": nullable(timestamp("When it was completed.")),
            "cancelled_at": nullable(timestamp("When it was cancelled.")),
            "returned_at": nullable(timestamp("When it was returned.")),
            "refunded_at": nullable(timestamp("When it was refunded.")),
            "updated_at": timestamp("Its last event."),
            "version": count("Its number of events."),
        })),
    })
}

fn other_schemas() -> Value {
    let partition = object(json!({
        "partition": count("The partition."),
        "checkpoint": schema("Position"),
        "caught_up_to": schema("Position"),
        "events_applied": count("Events applied since the projection started."),
        "last_event_recorded_at": nullable(timestamp("When the last applied event was recorded.")),
        "updated_at": nullable(timestamp("When the checkpoint last moved; null before it ever did.")),
        "lag_events": count("Events of this partition in the store that it has not applied."),
        "lag_seconds": {"type": "number", "minimum": 0, "description": "Age of the oldest unapplied event; 0 when none."},
    }));
    json!({
        "Timeline": object(json!({
            "product_id": uuid("The product."),
            "owner_id": uuid("Its current owner."),
            "entries": count("Entries in the whole timeline."),
            "updated_at": timestamp("Its last entry."),
            "items": {"type": "array", "maxItems": MAX_LIMIT, "items": object(json!({
                "sequence": count("The entry's sequence number."),
                "kind": {"type": "string", "description": "listed, price_changed, reserved, sold, shipped, \
                    delivered, returned, relisted, story, ownership_transferred, customization_*"},
                "data": {"description": "The entry's details (JSON, by kind)."},
                "actor_id": nullable(uuid("Who caused it.")),
                "recorded_at": timestamp("When it was recorded."),
            }))},
            "next_cursor": nullable(json!({"type": "string"})),
        })),
        "SellerStats": object(json!({
            "seller_id": uuid("The seller."),
            "orders": object(json!({
                "placed": count("Orders placed with the seller."),
                "confirmed": count("Orders confirmed."),
                "shipped": count("Orders shipped."),
                "delivered": count("Orders delivered."),
                "cancelled": count("Orders cancelled."),
                "returned": count("Orders returned."),
            })),
            "fulfillment_rate": nullable(json!({"type": "number", "minimum": 0, "maximum": 1,
                "description": "Delivered / confirmed; null without confirmed orders."})),
            "return_rate": nullable(json!({"type": "number", "minimum": 0, "maximum": 1,
                "description": "Returned / delivered; null without delivered orders."})),
            "average_fulfillment_seconds": nullable(json!({"type": "number", "minimum": 0,
                "description": "Mean time from confirmation to delivery; null without delivered orders."})),
            "rating": object(json!({
                "average": nullable(json!({"type": "number", "minimum": 1, "maximum": 5})),
                "count": count("Reviews received."),
            })),
        })),
        "Projections": object(json!({
            "partitions": count("Partitions of every projection."),
            "lag_events_cap": {"type": "integer", "enum": [LAG_EVENTS_CAP],
                "description": "Most unapplied events counted per projection (and for the relay)."},
            "projections": {"type": "array", "items": object(json!({
                "name": {"type": "string", "enum": ["listings", "orders", "wallets", "timelines"]},
                "aggregate_types": {"type": "array", "items": {"type": "string"}},
                "caught_up_to": nullable(json!({"type": "string", "pattern": "^[0-9a-f]{32}$",
                    "description": "Its slowest partition's mark (a position token); null while a \
                        partition has no checkpoint."})),
                "lag_events": count("Unapplied events over all partitions."),
                "lag_events_capped": {"type": "boolean", "description": "The count reached the cap: a lower bound."},
                "lag_seconds": {"type": "number", "minimum": 0},
                "dead_letters": count("Events parked because they could not be applied."),
                "partitions": {"type": "array", "items": partition},
            }))},
            "relay": nullable(object(json!({
                "stream": {"type": "string"},
                "checkpoint": schema("Position"),
                "published": count("Events published."),
                "updated_at": timestamp("When it last moved."),
                "lag_events": count("Committed events not yet published."),
                "lag_events_capped": {"type": "boolean"},
                "lag_seconds": {"type": "number", "minimum": 0},
            }))),
        })),
    })
}
