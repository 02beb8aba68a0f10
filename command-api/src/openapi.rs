//! The OpenAPI 3.0.3 document of the command API, served at `/openapi.json`.
//!
//! It describes exactly what the handlers in `routes` accept and answer, and
//! CI fuzzes the running API from it (`scripts/schemathesis.sh`), so a route
//! or a rule that changes there must change here too. The document is built
//! from one function per resource; `components` holds the shared shapes
//! (money, text fields, the error body, the accepted-command body) and the
//! standard error responses. Limits come from the domain's own constants
//! where it exports them.

use domain::values::{MAX_AMOUNT, Url};
use serde_json::{Map, Value, json};

/// Most units a seller can put in one listing's stock
/// (`routes::listings::MAX_STOCK`, private to the routes).
const MAX_STOCK: u32 = 1_000_000;

/// Currencies `domain::values::Currency::parse` accepts.
const CURRENCIES: &[&str] = &[
    "AED", "AUD", "BGN", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EGP", "EUR", "GBP", "HKD",
    "HUF", "IDR", "ILS", "INR", "JPY", "KRW", "MAD", "MXN", "NOK", "NZD", "PLN", "RON", "SAR",
    "SEK", "SGD", "THB", "TND", "TRY", "UAH", "USD", "ZAR",
];

/// Every `OrderStatus::as_str`.
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

/// Characters Rust's `str::trim` removes (`char::is_whitespace`), as the
/// inside of a regular-expression character class.
const WHITESPACE: &str =
    r"\t\n\u000b\u000c\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
/// Control characters other than tab and newline, which text fields refuse
/// (`char::is_control`), as the inside of a character class.
const FORBIDDEN: &str = r"\u0000-\u0008\u000b-\u001f\u007f-\u009f";
/// Control characters and whitespace, as the inside of a character class.
const INVISIBLE: &str =
    r"\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

const TEXT_RULES: &str = "Surrounding whitespace is trimmed; the length is counted in \
    characters after trimming. Control characters other than tab and newline are refused.";

/// The OpenAPI 3.0 document served at `/openapi.json`.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Souk command API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The write side of Souk. Every command answers with the id and \
                version of the aggregate it changed and a position token (pass it to the query \
                API to read your own writes). Every refusal is \
                `{\"error\": {\"code\", \"message\"}}` with a stable code. Request bodies are \
                strict JSON: `Content-Type: application/json` (else 415), valid syntax (else 400 \
                `malformed_json`), no unknown or missing fields and the right types (else 422 \
                `invalid_body`), and every value within its rules (else 422 with the rule's code).",

        },
        "tags": [
            {"name": "service", "description": "Health, metrics and this document."},
            {"name": "wallets"},
            {"name": "listings"},
            {"name": "orders"},
            {"name": "products", "description": "Product timelines: stories and customizations."},
        ],
        "security": [{"bearerAuth": []}],
        "paths": merge([
            service_paths(),
            wallet_paths(),
            listing_paths(),
            order_paths(),
            product_paths(),
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

/// A text field of `min..=max` characters after trimming, with a pattern
/// that holds exactly for the characters `domain::values::Text` accepts.
fn text(min: usize, max: usize, description: &str) -> Value {
    let pattern = if min == 0 {
        format!("^[{WHITESPACE}]*[^{FORBIDDEN}]*[{WHITESPACE}]*$")
    } else {
        format!("^[{WHITESPACE}]*[^{INVISIBLE}][^{FORBIDDEN}]*[{WHITESPACE}]*$")
    };
    let mut field = json!({
        "type": "string",
        "maxLength": max,
        "pattern": pattern,
        "description": format!("{description} {TEXT_RULES}"),
    });
    if min > 0 {
        field["minLength"] = json!(min);
    }
    field
}

fn uuid(description: &str) -> Value {
    json!({"type": "string", "format": "uuid", "description": description})
}

fn nullable(mut field: Value) -> Value {
    field["nullable"] = json!(true);
    field
}

fn path_id(name: &str, description: &str) -> Value {
    json!({
        "name": name,
        "in": "path",
        "required": true,
        "description": format!("{description} Anything but a UUID is 400 `invalid_id`."),
        "schema": {"type": "string", "format": "uuid"},
    })
}

/// A command: a POST with the standard headers, an optional JSON body, one
/// success response and the errors any command can meet.
struct Command<'a> {
    operation_id: &'a str,
    tag: &'a str,
    summary: &'a str,
    description: &'a str,
    path_ids: Vec<Value>,
    body: Option<Value>,
    status: u16,
    success: Value,
}

/// A link from a command's success response to an operation that takes
/// what it returned: the operation's id (also the link's name) and the
/// values of its parameters.
type Link<'a> = (&'a str, Value);

impl Command<'_> {
    fn build(self) -> Value {
        self.build_linked(&[])
    }

    fn build_linked(self, links: &[Link<'_>]) -> Value {
        let mut parameters = self.path_ids;
        for header in ["IdempotencyKey", "CorrelationId", "RequestId"] {
            parameters.push(reference("parameters", header));
        }
        let mut responses = Map::new();
        responses.insert(
            self.status.to_string(),
            json!({
                "description": "Accepted; an idempotent replay answers the same, with \
                    `Idempotent-Replayed: true`.",
                "headers": {
                    "Idempotent-Replayed": reference("headers", "IdempotentReplayed"),
                    "X-Request-Id": reference("headers", "RequestId"),
                },
                "content": {"application/json": {"schema": self.success}},
            }),
        );
        if !links.is_empty() {
            let links: Map<String, Value> = links
                .iter()
                .map(|(operation_id, parameters)| {
                    let link = json!({"operationId": operation_id, "parameters": parameters});
                    ((*operation_id).to_owned(), link)
                })
                .collect();
            responses[&self.status.to_string()]["links"] = Value::Object(links);
        }
        let mut errors = vec![
            ("400", "BadRequest"),
            ("401", "Unauthorized"),
            ("403", "Forbidden"),
            ("404", "NotFound"),
            ("409", "Conflict"),
        ];
        if self.body.is_some() {
            errors.extend([("413", "PayloadTooLarge"), ("415", "UnsupportedMediaType")]);
        }
        errors.extend([
            ("422", "Unprocessable"),
            ("500", "Internal"),
            ("503", "Unavailable"),
        ]);
        for (status, name) in errors {
            responses.insert(status.to_owned(), reference("responses", name));
        }
        let mut operation = json!({
            "operationId": self.operation_id,
            "tags": [self.tag],
            "summary": self.summary,
            "description": self.description,
            "parameters": parameters,
            "responses": responses,
        });
        if let Some(body) = self.body {
            operation["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": body}},
            });
        }
        json!({"post": operation})
    }
}

/// Links that pass the `field` of a success body as the `id` path parameter
/// of each of `operation_ids`.
fn body_links<'a>(field: &str, operation_ids: &[&'a str]) -> Vec<Link<'a>> {
    let parameters = json!({"id": format!("$response.body#/{field}")});
    operation_ids
        .iter()
        .map(|operation_id| (*operation_id, parameters.clone()))
        .collect()
}

fn service_paths() -> Value {
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
        "/metrics": {"get": {
            "operationId": "metrics",
            "tags": ["service"],
            "summary": "Prometheus metrics",
            "security": [],
            "responses": {
                "200": {
                    "description": "The Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "500": reference("responses", "Internal"),
                "503": reference("responses", "Unavailable"),
            },
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi",
            "tags": ["service"],
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "The OpenAPI 3.0 document of this API.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "500": reference("responses", "Internal"),
                "503": reference("responses", "Unavailable"),
            },
        }},
    })
}

fn wallet_paths() -> Value {
    let wallet_id = || path_id("id", "The wallet.");
    let movement = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["amount", "reference"],
        "properties": {
            "amount": schema("Money"),
            "reference": text(1, 128, "The payment provider's or bank's reference."),
        },
    });
    json!({
        "/wallets": Command {
            operation_id: "openWallet",
            tag: "wallets",
            summary: "Open a wallet",
            description: "Opens a wallet owned by the caller in one currency. 201 with the new \
                wallet's id.",
            path_ids: vec![],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["currency"],
                "properties": {"currency": schema("Currency")},
            })),
            status: 201,
            success: schema("Accepted"),
        }.build_linked(&body_links("id", &["deposit", "withdraw"])),
        "/wallets/{id}/deposits": Command {
            operation_id: "deposit",
            tag: "wallets",
            summary: "Deposit into a wallet",
            description: "Credits the available balance (the payment provider, as an admin).",
            path_ids: vec![wallet_id()],
            body: Some(movement.clone()),
            status: 200,
            success: schema("Accepted"),
        }.build(),
        "/wallets/{id}/withdrawals": Command {
            operation_id: "withdraw",
            tag: "wallets",
            summary: "Withdraw from a wallet",
            description: "Debits the available balance (the owner); held and pending funds cannot \
                be withdrawn.",
            path_ids: vec![wallet_id()],
            body: Some(movement),
            status: 200,
            success: schema("Accepted"),
        }.build(),
    })
}

fn listing_paths() -> Value {
    let listing_id = || path_id("id", "The listing.");
    let lifecycle = |operation_id, summary, description| {
        Command {
            operation_id,
            tag: "listings",
            summary,
            description,
            path_ids: vec![listing_id()],
            body: None,
            status: 200,
            success: schema("Accepted"),
        }
        .build()
    };
    json!({
        "/listings": Command {
            operation_id: "createListing",
            tag: "listings",
            summary: "Create a listing",
            description: "Creates the listing, its stock pool and its product timeline entry in one \
                transaction. 201 with the listing's id and its product's id.",
            path_ids: vec![],
            body: Some(schema("CreateListing")),
            status: 201,
            success: schema("ListingCreated"),
        }.build_linked(&[
            body_links("id", &[
                "changePrice", "updateListingDetails", "deleteListing", "pauseListing", "resumeListing",
                "setStock", "reserveStock",
            ]),
            body_links("product_id", &["addStory", "requestCustomization"]),
        ].concat()),
        "/listings/{id}/price": Command {
            operation_id: "changePrice",
            tag: "listings",
            summary: "Change a listing's price",
            description: "The seller changes the price; the product timeline records it.",
            path_ids: vec![listing_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["price"],
                "properties": {"price": schema("Money")},
            })),
            status: 200,
            success: schema("Accepted"),
        }.build(),
        "/listings/{id}/details": Command {
            operation_id: "updateListingDetails",
            tag: "listings",
            summary: "Change a listing's details",
            description: "Fields that are absent or null keep their value.",
            path_ids: vec![listing_id()],
            body: Some(schema("UpdateListingDetails")),
            status: 200,
            success: schema("Accepted"),
        }.build(),
        "/listings/{id}/delete": lifecycle(
            "deleteListing",
            "Delete a listing",
            "A soft delete: the listing stays in the log.",
        ),
        "/listings/{id}/pause": lifecycle(
            "pauseListing",
            "Pause a listing",
            "A paused listing takes no orders.",
        ),
        "/listings/{id}/resume": lifecycle(
            "resumeListing",
            "Resume a paused listing",
            "The listing takes orders again.",
        ),
        "/listings/{id}/stock": Command {
            operation_id: "setStock",
            tag: "listings",
            summary: "Set a listing's stock",
            description: "The seller sets the units in stock; active holds are kept.",
            path_ids: vec![listing_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["quantity"],
                "properties": {"quantity": {"type": "integer", "minimum": 0, "maximum": MAX_STOCK}},
            })),
            status: 200,
            success: schema("Accepted"),
        }.build(),
        "/listings/{id}/reservations": Command {
            operation_id: "reserveStock",
            tag: "listings",
            summary: "Hold stock of an active listing",
            description: "Places a hold for the caller that expires after `ttl_seconds`. 201 with the \
                hold's id (and the stock pool's version). 409 `listing_unavailable` when the listing is \
                not active.",
            path_ids: vec![listing_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["quantity", "ttl_seconds"],
                "properties": {
                    "quantity": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": domain::reservation::MAX_HOLD_QUANTITY,
                    },
                    "ttl_seconds": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": domain::process::MAX_HOLD_TTL_SECONDS,
                    },
                },
            })),
            status: 201,
            success: schema("Accepted"),
        }.build(),
        "/listings/{id}/reservations/{reservation_id}/release": Command {
            operation_id: "releaseReservation",
            tag: "listings",
            summary: "Release a hold",
            description: "Frees a hold and its units: its holder, the listing's seller or an admin. \
                200 with the hold's id. 409 `hold_not_active` when the hold was already released, \
                expired or sold; 409 `reservation_in_order` when an order took it (cancel the order).",
            path_ids: vec![listing_id(), path_id("reservation_id", "The hold (a reservation's id).")],
            body: None,
            status: 200,
            success: schema("Accepted"),
        }.build(),
    })
}

fn order_paths() -> Value {
    let order_id = || path_id("id", "The order.");
    let step = |operation_id, summary, description| {
        Command {
            operation_id,
            tag: "orders",
            summary,
            description,
            path_ids: vec![order_id()],
            body: None,
            status: 200,
            success: schema("Accepted"),
        }
        .build()
    };
    let with_reason = |operation_id, summary, description| {
        Command {
            operation_id,
            tag: "orders",
            summary,
            description,
            path_ids: vec![order_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {"reason": text(0, 1000, "Why.")},
            })),
            status: 200,
            success: schema("Accepted"),
        }
        .build()
    };
    json!({
        "/orders": Command {
            operation_id: "checkout",
            tag: "orders",
            summary: "Check out",
            description: "Places one order per seller (sharing a checkout id), reserves the \
                stock of every line, holds the buyer's funds for `wallet_escrow` and confirms each \
                order, in one transaction. An order whose stock or funds fall short is recorded as \
                rejected (with the reason) rather than failing the request. 201; `id` and \
                `version` are those of the first order.",
            path_ids: vec![],
            body: Some(schema("Checkout")),
            status: 201,
            success: schema("CheckoutAccepted"),
        }.build_linked(&body_links("id", &[
            "confirmPayment", "ship", "deliver", "releaseEscrow", "complete", "cancel", "requestReturn",
            "markReturned", "refund", "review",
        ])),
        "/orders/{id}/confirm-payment": Command {
            operation_id: "confirmPayment",
            tag: "orders",
            summary: "Confirm a bank transfer",
            description: "An admin confirms that a `bank_transfer` order was paid.",
            path_ids: vec![order_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["reference"],
                "properties": {"reference": text(1, 128, "The bank's reference of the transfer.")},
            })),
            status: 200,
            success: schema("Accepted"),
        }.build(),
        "/orders/{id}/ship": Command {
            operation_id: "ship",
            tag: "orders",
            summary: "Ship an order",
            description: "The seller ships: the stock holds become sales and, for `wallet_escrow`, the \
                escrow auto-release timer is armed.",
            path_ids: vec![order_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["carrier", "tracking_number"],
                "properties": {
                    "carrier": text(1, 64, "The carrier."),
                    "tracking_number": text(1, 64, "The carrier's tracking number."),
                },
            })),
            status: 200,
            success: schema("Accepted"),
        }.build(),
        "/orders/{id}/deliver": step(
            "deliver",
            "Confirm delivery",
            "The buyer confirms delivery; the escrow is released to the seller.",
        ),
        "/orders/{id}/release-escrow": step(
            "releaseEscrow",
            "Release the escrow",
            "An admin releases a shipped order's escrow to the seller.",
        ),
        "/orders/{id}/complete": step("complete", "Complete an order", "Closes a delivered order."),
        "/orders/{id}/cancel": with_reason(
            "cancel",
            "Cancel an order",
            "Before shipment: releases the stock holds and refunds the escrow.",
        ),
        "/orders/{id}/return": with_reason(
            "requestReturn",
            "Request a return",
            "The buyer asks to return a delivered order within the return window.",
        ),
        "/orders/{id}/returned": step(
            "markReturned",
            "Mark an order returned",
            "The seller received the returned items.",
        ),
        "/orders/{id}/refund": step(
            "refund",
            "Refund a returned order",
            "Moves the payment back from the seller's wallet to the buyer's.",
        ),
        "/orders/{id}/review": Command {
            operation_id: "review",
            tag: "orders",
            summary: "Review the seller",
            description: "The buyer rates the seller once, after delivery.",
            path_ids: vec![order_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["rating"],
                "properties": {
                    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                    "comment": text(0, 2000, "The review."),
                },
            })),
            status: 200,
            success: schema("Accepted"),
        }.build(),
    })
}

fn product_paths() -> Value {
    let product_id = || path_id("id", "The product.");
    let customization_id = || path_id("customization_id", "The customization.");
    json!({
        "/products/{id}/stories": Command {
            operation_id: "addStory",
            tag: "products",
            summary: "Add a story to a product",
            description: "The product's current owner tells part of its story. 201 with the story's id \
                (and the timeline's version).",
            path_ids: vec![product_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["title", "body"],
                "properties": {
                    "title": text(1, 200, "The story's title."),
                    "body": text(1, 10_000, "The story."),
                    "media": schema("Media"),
                },
            })),
            status: 201,
            success: schema("Accepted"),
        }.build(),
        "/products/{id}/customizations": Command {
            operation_id: "requestCustomization",
            tag: "products",
            summary: "Ask a designer to customize a product",
            description: "The owner asks a designer for a customization. 201 with the customization's id \
                (and the timeline's version).",
            path_ids: vec![product_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "required": ["designer_id", "description"],
                "properties": {
                    "designer_id": uuid("The designer's user id."),
                    "description": text(0, 5000, "What to do."),
                },
            })),
            status: 201,
            success: schema("Accepted"),
        }.build_linked(&["acceptCustomization", "completeCustomization"].map(|operation_id| {
            let parameters =
                json!({"id": "$request.path.id", "customization_id": "$response.body#/id"});
            (operation_id, parameters)
        })),
        "/products/{id}/customizations/{customization_id}/accept": Command {
            operation_id: "acceptCustomization",
            tag: "products",
            summary: "Accept a customization request",
            description: "The designer accepts. `id` in the answer is the customization's.",
            path_ids: vec![product_id(), customization_id()],
            body: None,
            status: 200,
            success: schema("Accepted"),
        }.build(),
        "/products/{id}/customizations/{customization_id}/complete": Command {
            operation_id: "completeCustomization",
            tag: "products",
            summary: "Complete a customization",
            description: "The designer delivers, with media and a note. `id` in the answer is the \
                customization's.",
            path_ids: vec![product_id(), customization_id()],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "media": schema("Media"),
                    "note": text(0, 2000, "A note to the owner."),
                },
            })),
            status: 200,
            success: schema("Accepted"),
        }.build(),
    })
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
            "IdempotencyKey": {
                "name": "Idempotency-Key",
                "in": "header",
                "required": false,
                "description": "Makes the command safe to retry: the same key (per user) with the same \
                    method, path and body answers the stored response; with another request it is 422 \
                    `idempotency_key_reused`. Invalid: 400 `invalid_idempotency_key`.",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
            },
            "CorrelationId": {
                "name": "X-Correlation-Id",
                "in": "header",
                "required": false,
                "description": "Recorded on the command's events. Not a UUID: 400 `invalid_correlation_id`.",
                "schema": {"type": "string", "format": "uuid"},
            },
            "RequestId": {
                "name": "X-Request-Id",
                "in": "header",
                "required": false,
                "description": "Recorded on the command's events and echoed back; one is made up when absent.",
                "schema": {"type": "string"},
            },
        },
        "headers": {
            "IdempotentReplayed": {
                "description": "`true` when the response is the stored one of an earlier request with \
                    the same Idempotency-Key.",
                "schema": {"type": "string", "enum": ["true"]},
            },
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
                "Malformed JSON (`malformed_json`), a path id that is not a UUID (`invalid_id`), \
                 or a bad Idempotency-Key or X-Correlation-Id header (`invalid_idempotency_key`, \
                 `invalid_correlation_id`)."
            ),
            "Unauthorized": error_response("No bearer token, or one that does not verify (`unauthorized`)."),
            "Forbidden": error_response("The caller may not do this (`forbidden`)."),
            "NotFound": error_response(
                "The aggregate does not exist (`listing_not_found`, `order_not_found`, \
                 `wallet_not_found`, ...)."
            ),
            "Conflict": error_response(
                "The command does not fit the aggregate's state (`illegal_transition`, `listing_unavailable`, \
                 ...), or concurrent changes persisted after the retries (`concurrency_conflict`)."
            ),
            "PayloadTooLarge": error_response(
                "The body is larger than the configured limit (`payload_too_large`)."
            ),
            "UnsupportedMediaType": error_response(
                "The body is not sent as `application/json` (`unsupported_media_type`)."
            ),
            "Unprocessable": error_response(
                "JSON of the wrong shape (`invalid_body`), a value out of its rules (the rule's code, e.g. \
                 `too_long`, `invalid_currency`), a refusal by the domain, or an Idempotency-Key reused for \
                 another request (`idempotency_key_reused`)."
            ),
            "Internal": error_response("A bug; details are in the server log (`internal`)."),
            "Unavailable": {
                "description": "The database is unreachable, or too many requests are in flight \
                    (`unavailable`).",
                "headers": {"Retry-After": reference("headers", "RetryAfter")},
                "content": {"application/json": {"schema": schema("Error")}},
            },
        },
        "schemas": merge([response_schemas(), value_schemas(), request_schemas()]),
    })
}

/// The bodies the API answers with.
fn response_schemas() -> Value {
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
        "Health": {
            "type": "object",
            "required": ["status", "database"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded"]},
                "database": {"type": "string", "enum": ["up", "down"]},
            },
        },
        "Position": {
            "type": "string",
            "pattern": "^[0-9a-f]{32}$",
            "description": "An opaque token of the command's place in the global order of events.",
        },
        "Accepted": {
            "type": "object",
            "required": ["id", "version", "position"],
            "properties": {
                "id": uuid("The aggregate (or hold, story, customization) the command created or changed."),
                "version": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "The aggregate's version after the command.",
                },
                "position": schema("Position"),
            },
        },
        "ListingCreated": {
            "type": "object",
            "required": ["id", "version", "position", "product_id"],
            "properties": {
                "id": uuid("The new listing."),
                "version": {"type": "integer", "minimum": 0},
                "position": schema("Position"),
                "product_id": uuid("The product whose timeline tells this listing's story."),
            },
        },
        "CheckoutAccepted": {
            "type": "object",
            "required": ["id", "version", "position", "checkout_id", "orders"],
            "properties": {
                "id": uuid("The first order."),
                "version": {"type": "integer", "minimum": 0, "description": "The first order's version."},
                "position": schema("Position"),
                "checkout_id": uuid("Shared by the orders of this checkout."),
                "orders": {
                    "type": "array",
                    "minItems": 1,
                    "description": "One order per seller.",
                    "items": {
                        "type": "object",
                        "required": ["id", "version", "status", "reason"],
                        "properties": {
                            "id": uuid("The order."),
                            "version": {"type": "integer", "minimum": 0},
                            "status": {"type": "string", "enum": ORDER_STATUSES},
                            "reason": {
                                "type": "string",
                                "nullable": true,
                                "description": "Why the order was rejected (`insufficient_stock`, \
                                    `insufficient_funds`); null otherwise.",
                            },
                        },
                    },
                },
            },
        },
    })
}

/// Values shared by several request bodies.
fn value_schemas() -> Value {
    json!({
        "Currency": {
            "type": "string",
            "enum": CURRENCIES,
            "description": "An ISO 4217 code. Others: 422 `invalid_currency`.",
        },
        "Money": {
            "type": "object",
            "additionalProperties": false,
            "required": ["amount", "currency"],
            "description": "An amount in minor units (cents) and its currency; never floating point.",
            "properties": {
                "amount": {"type": "integer", "minimum": 1, "maximum": MAX_AMOUNT},
                "currency": schema("Currency"),
            },
        },
        "Url": {
            "type": "string",
            "maxLength": Url::MAX_LEN,
            "pattern": format!("^https?://[^/{INVISIBLE}][^{INVISIBLE}]*$"),
            "description": format!(
                "An http or https URL of at most {} bytes, without whitespace or control characters.",
                Url::MAX_LEN
            ),
        },
        "Media": {
            "type": "array",
            "maxItems": domain::timeline::MAX_MEDIA,
            "items": schema("Url"),
        },
        "CountryCode": {
            "type": "string",
            "pattern": "^[A-Z]{2}$",
            "description": "An ISO 3166-1 alpha-2 code, upper case.",
        },
        "Condition": {"type": "string", "enum": ["new", "like_new", "good", "fair", "poor"]},
        "Location": {
            "type": "object",
            "additionalProperties": false,
            "required": ["city", "country"],
            "description": "`lat` and `lon` go together (both or neither), else 422 `invalid_coordinates`.",
            "properties": {
                "city": text(1, 64, "The city."),
                "country": schema("CountryCode"),
                "lat": {"type": "number", "nullable": true, "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "nullable": true, "minimum": -180, "maximum": 180},
            },
        },
        "Attributes": {
            "type": "object",
            "maxProperties": domain::listing::MAX_ATTRIBUTES,
            "description": format!(
                "Free-form attributes by name. Names are 1 to {} characters of a-z, 0-9 and _ (else 422 \
                 `invalid_attribute`); values are strings of at most {} characters, numbers (integers \
                 within 64 bits) or booleans.",
                domain::listing::MAX_ATTRIBUTE_KEY_LEN,
                domain::listing::MAX_ATTRIBUTE_TEXT_LEN,
            ),
            "additionalProperties": {
                "anyOf": [
                    {"type": "string", "maxLength": domain::listing::MAX_ATTRIBUTE_TEXT_LEN},
                    {"type": "number"},
                    {"type": "boolean"},
                ],
            },
        },
        "Images": {
            "type": "array",
            "maxItems": domain::listing::MAX_IMAGES,
            "items": schema("Url"),
        },
    })
}

/// The larger request bodies.
fn request_schemas() -> Value {
    json!({
        "CreateListing": {
            "type": "object",
            "additionalProperties": false,
            "required": ["title", "category", "condition", "price", "quantity", "location"],
            "properties": {
                "title": text(1, 200, "The listing's title."),
                "description": text(0, 5000, "The listing's description."),
                "category": text(1, 64, "The category."),
                "subcategory": nullable(text(1, 64, "The subcategory.")),
                "condition": schema("Condition"),
                "price": schema("Money"),
                "quantity": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_STOCK,
                    "description": "The units in stock.",
                },
                "location": schema("Location"),
                "attributes": schema("Attributes"),
                "images": schema("Images"),
                "product_id": nullable(uuid(
                    "An existing product the seller owns (a relisting); a new product when absent.",
                )),
                "payout_wallet_id": nullable(uuid(
                    "The seller's wallet, in the price's currency, that receives `wallet_escrow` payments.",
                )),
            },
        },
        "UpdateListingDetails": {
            "type": "object",
            "additionalProperties": false,
            "description": "Fields that are absent or null keep their value.",
            "properties": {
                "title": nullable(text(1, 200, "The listing's title.")),
                "description": nullable(text(0, 5000, "The listing's description.")),
                "category": nullable(text(1, 64, "The category.")),
                "subcategory": nullable(text(1, 64, "The subcategory.")),
                "condition": {"allOf": [schema("Condition")], "nullable": true},
                "location": {"allOf": [schema("Location")], "nullable": true},
                "attributes": {"allOf": [schema("Attributes")], "nullable": true},
                "images": {"allOf": [schema("Images")], "nullable": true},
            },
        },
        "ShippingAddress": {
            "type": "object",
            "additionalProperties": false,
            "required": ["name", "line1", "city", "postal_code", "country"],
            "properties": {
                "name": text(1, 64, "The recipient."),
                "line1": text(1, 200, "The street address."),
                "line2": nullable(text(0, 200, "More of the address; blank is none.")),
                "city": text(1, 64, "The city."),
                "postal_code": text(1, 20, "The postal code."),
                "country": schema("CountryCode"),
            },
        },
        "Checkout": {
            "type": "object",
            "additionalProperties": false,
            "required": ["lines", "shipping_address", "payment_method"],
            "properties": {
                "lines": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": domain::order::MAX_LINES,
                    "description": "Each listing at most once (else 422 `duplicate_line`).",
                    "items": {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["listing_id", "quantity"],
                        "properties": {
                            "listing_id": uuid("An active listing."),
                            "quantity": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": domain::order::MAX_LINE_QUANTITY,
                            },
                            "reservation_id": nullable(uuid(
                                "The buyer's own active hold on the listing, of the line's quantity: \
                                the order takes it instead of a new hold. Someone else's, an expired \
                                or a closed hold rejects the order (`reservation_not_yours`, \
                                `reservation_expired`, `reservation_not_active`, \
                                `reservation_quantity_mismatch`).",
                            )),
                        },
                    },
                },
                "shipping_address": schema("ShippingAddress"),
                "payment_method": {"type": "string", "enum": ["wallet_escrow", "bank_transfer", "cod"]},
                "wallet_id": nullable(uuid(
                    "The buyer's wallet; required for `wallet_escrow` (else 422 `wallet_required`).",
                )),
            },
        },
    })
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema("Error")}},
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every route of `app::router` and `routes::*::routes`, listed by hand:
    /// the router does not list its routes, and a route added there must be
    /// added here and to the document.
    const ROUTES: &[&str] = &[
        "GET /health",
        "GET /metrics",
        "GET /openapi.json",
        "POST /wallets",
        "POST /wallets/{id}/deposits",
        "POST /wallets/{id}/withdrawals",
        "POST /listings",
        "POST /listings/{id}/price",
        "POST /listings/{id}/details",
        "POST /listings/{id}/delete",
        "POST /listings/{id}/pause",
        "POST /listings/{id}/resume",
        "POST /listings/{id}/stock",
        "POST /listings/{id}/reservations",
        "POST /listings/{id}/reservations/{reservation_id}/release",
        "POST /orders",
        "POST /orders/{id}/confirm-payment",
        "POST /orders/{id}/ship",
        "POST /orders/{id}/deliver",
        "POST /orders/{id}/release-escrow",
        "POST /orders/{id}/complete",
        "POST /orders/{id}/cancel",
        "POST /orders/{id}/return",
        "POST /orders/{id}/returned",
        "POST /orders/{id}/refund",
        "POST /orders/{id}/review",
        "POST /products/{id}/stories",
        "POST /products/{id}/customizations",
        "POST /products/{id}/customizations/{customization_id}/accept",
        "POST /products/{id}/customizations/{customization_id}/complete",
    ];

    fn operations(document: &Value) -> impl Iterator<Item = (&str, &str, &Value)> {
        document["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .iter()
                    .map(move |(method, operation)| (path.as_str(), method.as_str(), operation))
            })
    }

    /// Every `$ref` in `value`.
    fn references(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    found.push(target.clone());
                }
                map.values().for_each(|value| references(value, found));
            }
            Value::Array(items) => items.iter().for_each(|value| references(value, found)),
            _ => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_0_3_json() {
        let document = document();
        let text = serde_json::to_string(&document).unwrap();
        let reparsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reparsed["openapi"], "3.0.3");
        assert!(reparsed["info"]["title"].is_string());
        assert!(reparsed["info"]["version"].is_string());
    }

    #[test]
    fn every_route_of_the_router_is_documented_and_nothing_else() {
        let document = document();
        let documented: BTreeSet<String> = operations(&document)
            .map(|(path, method, _)| format!("{} {path}", method.to_uppercase()))
            .collect();
        let routed: BTreeSet<String> = ROUTES.iter().map(|route| (*route).to_owned()).collect();
        assert_eq!(documented, routed);
    }

    #[test]
    fn every_reference_resolves() {
        let document = document();
        let mut found = Vec::new();
        references(&document, &mut found);
        assert!(!found.is_empty());
        for target in found {
            let pointer = target.strip_prefix('#').expect("local references only");
            assert!(
                document.pointer(pointer).is_some(),
                "{target} does not resolve"
            );
        }
    }

    #[test]
    fn every_link_names_an_operation_and_fills_its_path_parameters() {
        let document = document();
        let by_id: std::collections::BTreeMap<&str, &str> = operations(&document)
            .map(|(path, _, operation)| (operation["operationId"].as_str().unwrap(), path))
            .collect();
        let mut links = 0;
        for (_, _, operation) in operations(&document) {
            for response in operation["responses"].as_object().unwrap().values() {
                for link in response["links"]
                    .as_object()
                    .into_iter()
                    .flat_map(|links| links.values())
                {
                    let target = link["operationId"].as_str().unwrap();
                    let path = by_id
                        .get(target)
                        .unwrap_or_else(|| panic!("no operation {target}"));
                    for name in link["parameters"].as_object().unwrap().keys() {
                        assert!(
                            path.contains(&format!("{{{name}}}")),
                            "{target} takes no {name}"
                        );
                    }
                    links += 1;
                }
            }
        }
        assert!(links > 0);
    }

    #[test]
    fn commands_are_authenticated_and_service_routes_are_not() {
        let document = document();
        assert_eq!(document["security"], json!([{"bearerAuth": []}]));
        for (path, _, operation) in operations(&document) {
            let public = ["/health", "/metrics", "/openapi.json"].contains(&path);
            assert_eq!(
                operation.get("security") == Some(&json!([])),
                public,
                "{path}"
            );
            if !public {
                assert_eq!(
                    operation["responses"]["401"],
                    reference("responses", "Unauthorized"),
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn every_path_parameter_is_a_documented_uuid() {
        let document = document();
        for (path, _, operation) in operations(&document) {
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            let documented: BTreeSet<&str> = operation["parameters"]
                .as_array()
                .map(|parameters| {
                    parameters
                        .iter()
                        .filter(|parameter| parameter["in"] == "path")
                        .inspect(|parameter| {
                            assert_eq!(parameter["schema"]["format"], "uuid", "{path}")
                        })
                        .map(|parameter| parameter["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(in_path, documented, "{path}");
        }
    }
}
