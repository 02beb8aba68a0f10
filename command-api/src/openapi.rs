//! The OpenAPI 3.1 document of the command API, served at `/openapi.json`,
//! derived with utoipa: each handler's `#[utoipa::path]` says what it takes
//! and answers, the request types of `routes` (`CreateListing`, `Checkout`,
//! ...) derive their schemas, and the functions below give the schemas a
//! derive cannot compute, from the code's own constants: `domain`'s
//! currencies, conditions, payment methods, text bounds and limits.
//! `http_kit::openapi::Conventions` adds what every operation shares
//! (bearer security, `X-Request-Id`, the standard refusals, closed response
//! objects); [`command_headers`] adds the headers of a command
//! (`Idempotency-Key`, `X-Correlation-Id`, `Idempotent-Replayed`) and
//! [`LINKS`] the links between operations that Schemathesis follows. A test
//! holds the router (`app::routes`) against this document: every route
//! served is documented, and nothing else is.

use std::borrow::Cow;
use std::sync::LazyLock;

use axum::http::Method;
use domain::listing::{
    Condition, MAX_ATTRIBUTE_KEY_LEN, MAX_ATTRIBUTE_TEXT_LEN, MAX_ATTRIBUTES, MAX_IMAGES,
};
use domain::order::{MAX_LINE_QUANTITY, MAX_LINES, OrderStatus, PaymentMethod, Rating};
use domain::process::MAX_HOLD_TTL_SECONDS;
use domain::reservation::MAX_HOLD_QUANTITY;
use domain::timeline::MAX_MEDIA;
use domain::values::MAX_AMOUNT;
use http_kit::openapi::{Conventions, ErrorBody, ErrorDetail, string_enum};
use serde::Deserialize;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema,
    SchemaType, Type,
};
use utoipa::openapi::{HeaderBuilder, Ref, RefOr, Required};
use utoipa::{Number, OpenApi, PartialSchema, ToSchema};
use uuid::Uuid;

use crate::routes::MAX_STOCK;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Souk command API",
        description = "The write side of Souk. Every command answers with the id and version of \
            the aggregate it changed and a position token (pass it to the query API to read your \
            own writes). Every refusal is `{\"error\": {\"code\", \"message\"}}` with a stable \
            code. Request bodies are strict JSON: `Content-Type: application/json` (else 415), \
            valid syntax (else 400 `malformed_json`), no unknown or missing fields and the right \
            types (else 422 `invalid_body`), and every value within its rules (else 422 with the \
            rule's code)."
    ),
    paths(crate::app::health),
    components(schemas(ErrorBody, ErrorDetail, Health, ListingCreated, CheckoutAccepted)),
    tags(
        (name = "service", description = "Health, metrics and this document."),
        (name = "wallets", description = "Open wallets, deposit (the payment provider, as an admin), withdraw."),
        (name = "listings", description = "Listings, their stock and holds on it."),
        (name = "orders", description = "Checkout and the life cycle of an order."),
        (name = "products", description = "Product timelines: stories and customizations."),
    ),
    security(("bearerAuth" = [])),
)]
struct CommandApi;

/// The responses every command can give, besides its own.
const REFUSALS: &[(&str, &str)] = &[
    (
        "400",
        "Malformed JSON (`malformed_json`), a path id that is not a UUID (`invalid_id`), or a bad \
         Idempotency-Key or X-Correlation-Id header (`invalid_idempotency_key`, \
         `invalid_correlation_id`).",
    ),
    (
        "401",
        "No bearer token, or one that does not verify (`unauthorized`).",
    ),
    ("403", "The caller may not do this (`forbidden`)."),
    (
        "404",
        "The aggregate does not exist (`listing_not_found`, `order_not_found`, \
         `wallet_not_found`, ...), or a path that names no route (`not_found`).",
    ),
    (
        "409",
        "The command does not fit the aggregate's state (`illegal_transition`, \
         `listing_unavailable`, ...), or concurrent changes persisted after the retries \
         (`concurrency_conflict`).",
    ),
    (
        "413",
        "The body is larger than the configured limit (`payload_too_large`).",
    ),
    (
        "415",
        "The body is not sent as `application/json` (`unsupported_media_type`).",
    ),
    (
        "422",
        "JSON of the wrong shape (`invalid_body`), a value out of its rules (the rule's code, \
         e.g. `too_long`, `invalid_currency`), a refusal by the domain, or an Idempotency-Key \
         reused for another request (`idempotency_key_reused`).",
    ),
    ("500", "A bug; details are in the server log (`internal`)."),
    (
        "503",
        "The database is unreachable, or too many requests are in flight (`unavailable`).",
    ),
];

/// The responses any operation can give, the public ones (health, metrics,
/// this document) included: the router's own refusals.
const PUBLIC_REFUSALS: &[(&str, &str)] = &[
    ("500", "A bug; details are in the server log (`internal`)."),
    ("503", "Too many requests are in flight (`unavailable`)."),
];

/// The component schemas that are response bodies: closed (every property
/// required, no other allowed). Request bodies stay as derived: their
/// optional fields are optional, and `deny_unknown_fields` closes them.
const RESPONSES: &[&str] = &[
    "Accepted",
    "ListingCreated",
    "CheckoutAccepted",
    "CheckoutOrder",
    "Health",
    "Error",
    "ErrorDetail",
];

/// The description of a command's success.
pub(crate) const ACCEPTED: &str =
    "Accepted; an idempotent replay answers the same, with `Idempotent-Replayed: true`.";

/// The links from a command's answer to the commands that take what it
/// returned: `(path, [(operation, [(parameter, runtime expression)])])`.
type Links = &'static [(&'static str, &'static [(&'static str, &'static str)])];

const BODY_ID: &[(&str, &str)] = &[("id", "$response.body#/id")];
const BODY_PRODUCT_ID: &[(&str, &str)] = &[("id", "$response.body#/product_id")];
const CUSTOMIZATION: &[(&str, &str)] = &[
    ("id", "$request.path.id"),
    ("customization_id", "$response.body#/id"),
];

const LINKS: &[(&str, Links)] = &[
    ("/wallets", &[("deposit", BODY_ID), ("withdraw", BODY_ID)]),
    (
        "/listings",
        &[
            ("changePrice", BODY_ID),
            ("updateListingDetails", BODY_ID),
            ("deleteListing", BODY_ID),
            ("pauseListing", BODY_ID),
            ("resumeListing", BODY_ID),
            ("setStock", BODY_ID),
            ("reserveStock", BODY_ID),
            ("addStory", BODY_PRODUCT_ID),
            ("requestCustomization", BODY_PRODUCT_ID),
        ],
    ),
    (
        "/orders",
        &[
            ("confirmPayment", BODY_ID),
            ("ship", BODY_ID),
            ("deliver", BODY_ID),
            ("releaseEscrow", BODY_ID),
            ("complete", BODY_ID),
            ("cancel", BODY_ID),
            ("requestReturn", BODY_ID),
            ("markReturned", BODY_ID),
            ("refund", BODY_ID),
            ("review", BODY_ID),
        ],
    ),
    (
        "/products/{id}/customizations",
        &[
            ("acceptCustomization", CUSTOMIZATION),
            ("completeCustomization", CUSTOMIZATION),
        ],
    ),
];

/// The document served at `/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut document = CommandApi::openapi();
    document.merge(http_kit::router::ServiceApi::openapi());
    document.merge(crate::routes::openapi());
    Conventions {
        refusals: REFUSALS,
        public_refusals: PUBLIC_REFUSALS,
        closed: &|name| RESPONSES.contains(&name),
    }
    .apply(&mut document);
    for item in document.paths.paths.values_mut() {
        if let Some(operation) = item.post.as_mut() {
            command_headers(operation);
        }
    }
    for (path, links) in LINKS {
        for (operation_id, parameters) in *links {
            // Every command that creates something answers 201.
            http_kit::openapi::link(
                &mut document,
                (Method::POST, *path, "201"),
                operation_id,
                parameters,
            );
        }
    }
    document
}

static DOCUMENT: LazyLock<serde_json::Value> = LazyLock::new(|| {
    serde_json::to_value(document()).unwrap_or_else(|error| {
        tracing::error!(%error, "the OpenAPI document does not serialize");
        serde_json::Value::Null
    })
});

/// [`document`] as JSON, built once.
pub fn document_json() -> &'static serde_json::Value {
    &DOCUMENT
}

/// The headers every command takes (`http_kit::RequestMeta` reads them) and
/// the one its success answers carry.
fn command_headers(operation: &mut Operation) {
    let header = |name: &str, schema: ObjectBuilder, description: &str| {
        RefOr::T(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(schema))
                .build(),
        )
    };
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    parameters.push(header(
        "Idempotency-Key",
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(http_kit::extract::MAX_IDEMPOTENCY_KEY_LEN))
            .pattern(Some("^[!-~]+$")),
        "Makes the command safe to retry: the same key (per user) with the same method, path \
         and body answers the stored response; with another request it is 422 \
         `idempotency_key_reused`. Invalid: 400 `invalid_idempotency_key`.",
    ));
    parameters.push(header(
        "X-Correlation-Id",
        ObjectBuilder::new().schema_type(Type::String).format(Some(
            utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Uuid),
        )),
        "Recorded on the command's events. Not a UUID: 400 `invalid_correlation_id`.",
    ));
    for (status, response) in operation.responses.responses.iter_mut() {
        if let (true, RefOr::T(response)) = (status.starts_with('2'), response) {
            response.headers.insert(
                "Idempotent-Replayed".to_owned(),
                HeaderBuilder::new()
                    .schema(Some(string_enum(["true"])))
                    .description(Some(
                        "`true` when the response is the stored one of an earlier request \
                         with the same Idempotency-Key.",
                    ))
                    .build()
                    .into(),
            );
        }
    }
}

/// `/health`'s body.
pub(crate) struct Health;

impl PartialSchema for Health {
    /// `status`, `database` and `migrations` always; `relay` (its role,
    /// NATS, a refused stream or a replica mismatch) only in a process that
    /// runs the relay, so it is the one optional, free-form property.
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property("status", string_enum(["ok", "degraded"]))
            .property("database", string_enum(["up", "down"]))
            .property(
                "migrations",
                string_enum(["applied", "pending"])
                    .description(Some("Whether this process has applied the migrations.")),
            )
            .property(
                "relay",
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .description(Some("The outbox relay's state, in a process that runs it.")),
            )
            .required("status")
            .required("database")
            .required("migrations")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for Health {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Health")
    }
}

/// The answer to `POST /listings`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ListingCreated {
    /// The new listing.
    pub id: Uuid,
    /// The listing's version.
    #[schema(minimum = 0)]
    pub version: i64,
    #[schema(schema_with = http_kit::openapi::position_token)]
    pub position: String,
    /// The product whose timeline tells this listing's story.
    pub product_id: Uuid,
}

/// The answer to `POST /orders`: one order per seller; `id` and `version`
/// are the first order's.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CheckoutAccepted {
    /// The first order.
    pub id: Uuid,
    /// The first order's version.
    #[schema(minimum = 0)]
    pub version: i64,
    #[schema(schema_with = http_kit::openapi::position_token)]
    pub position: String,
    /// Shared by the orders of this checkout.
    pub checkout_id: Uuid,
    /// One order per seller.
    #[schema(min_items = 1)]
    pub orders: Vec<CheckoutOrder>,
}

/// One order of a checkout.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CheckoutOrder {
    /// The order.
    pub id: Uuid,
    #[schema(minimum = 0)]
    pub version: i64,
    #[schema(schema_with = order_status)]
    pub status: String,
    /// Why the order was rejected (`insufficient_stock`,
    /// `insufficient_funds`, ...); null otherwise.
    pub reason: Option<String>,
}

fn order_status() -> Object {
    string_enum(OrderStatus::ALL.iter().map(OrderStatus::as_str)).build()
}

/// An amount of money as a command takes it: positive, at most
/// `MAX_AMOUNT` minor units.
pub(crate) fn amount() -> Object {
    integer(1, MAX_AMOUNT)
        .description(Some("Minor units (cents); never floating point."))
        .build()
}

fn integer(minimum: impl Into<Number>, maximum: impl Into<Number>) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(minimum))
        .maximum(Some(maximum))
}

/// Units in one listing's stock.
pub(crate) fn stock_quantity() -> Object {
    integer(0, MAX_STOCK)
        .description(Some("The units in stock."))
        .build()
}

/// Units of one hold.
pub(crate) fn hold_quantity() -> Object {
    integer(1, MAX_HOLD_QUANTITY).build()
}

/// How long a hold lasts.
pub(crate) fn hold_ttl_seconds() -> Object {
    integer(1, MAX_HOLD_TTL_SECONDS).build()
}

/// Units of one order line.
pub(crate) fn line_quantity() -> Object {
    integer(1, MAX_LINE_QUANTITY).build()
}

/// A rating of a seller.
pub(crate) fn rating() -> Object {
    integer(Rating::MIN, Rating::MAX).build()
}

/// A listing's condition.
pub(crate) fn condition() -> Object {
    string_enum(Condition::ALL.iter().map(Condition::as_str)).build()
}

/// A listing's condition, or null (unchanged).
pub(crate) fn condition_or_null() -> Schema {
    or_null(condition())
}

/// How an order is paid.
pub(crate) fn payment_method() -> Object {
    string_enum(PaymentMethod::ALL.iter().map(PaymentMethod::as_str)).build()
}

/// The lines of a checkout.
pub(crate) fn lines() -> Schema {
    ArrayBuilder::new()
        .items(Ref::from_schema_name("CheckoutLine"))
        .min_items(Some(1))
        .max_items(Some(MAX_LINES))
        .description(Some(
            "Each listing at most once (else 422 `duplicate_line`).",
        ))
        .into()
}

/// A listing's images.
pub(crate) fn images() -> Schema {
    urls(MAX_IMAGES)
}

/// A listing's images, or null (unchanged).
pub(crate) fn images_or_null() -> Schema {
    or_null(images())
}

/// The media of a story or a customization.
pub(crate) fn media() -> Schema {
    urls(MAX_MEDIA)
}

fn urls(max: usize) -> Schema {
    ArrayBuilder::new()
        .items(http_kit::openapi::url())
        .max_items(Some(max))
        .into()
}

/// A listing's free-form attributes (`domain::listing::parse_attributes`).
pub(crate) fn attributes() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .max_properties(Some(MAX_ATTRIBUTES))
        .additional_properties(Some(RefOr::T(Schema::AnyOf(
            AnyOfBuilder::new()
                .item(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .max_length(Some(MAX_ATTRIBUTE_TEXT_LEN)),
                )
                .item(ObjectBuilder::new().schema_type(Type::Number))
                .item(ObjectBuilder::new().schema_type(Type::Boolean))
                .build(),
        ))))
        .description(Some(format!(
            "Free-form attributes by name. Names are 1 to {MAX_ATTRIBUTE_KEY_LEN} characters of \
             a-z, 0-9 and _ (else 422 `invalid_attribute`); values are strings of at most \
             {MAX_ATTRIBUTE_TEXT_LEN} characters, numbers (integers within 64 bits) or booleans."
        )))
        .build()
}

/// A listing's attributes, or null (unchanged).
pub(crate) fn attributes_or_null() -> Schema {
    or_null(attributes())
}

/// `schema`, or null.
fn or_null(schema: impl Into<RefOr<Schema>>) -> Schema {
    OneOfBuilder::new()
        .item(schema)
        .item(ObjectBuilder::new().schema_type(SchemaType::Type(Type::Null)))
        .into()
}

#[cfg(test)]
mod tests {
    use http_kit::openapi::undocumented;

    use super::*;

    #[test]
    fn every_route_the_router_serves_is_documented_and_nothing_else() {
        let routes = crate::app::routes();
        assert!(routes.served().len() >= 29, "{:?}", routes.served());
        let problems = undocumented(routes.served(), &document());
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn the_document_takes_its_constants_from_the_code() {
        let document = document_json();
        let schemas = &document["components"]["schemas"];
        assert_eq!(
            schemas["Money"]["properties"]["currency"]["enum"],
            serde_json::json!(domain::values::CURRENCIES)
        );
        assert_eq!(
            schemas["Money"]["properties"]["amount"]["maximum"],
            MAX_AMOUNT
        );
        let create = &schemas["CreateListing"]["properties"];
        assert_eq!(
            create["title"]["maxLength"],
            domain::values::Title::MAX_CHARS
        );
        assert_eq!(create["quantity"]["maximum"], MAX_STOCK);
        assert_eq!(create["images"]["maxItems"], MAX_IMAGES);
        assert_eq!(create["attributes"]["maxProperties"], MAX_ATTRIBUTES);
        assert_eq!(
            create["condition"]["enum"],
            serde_json::json!(
                Condition::ALL
                    .iter()
                    .map(Condition::as_str)
                    .collect::<Vec<_>>()
            )
        );
        let checkout = &schemas["Checkout"]["properties"];
        assert_eq!(checkout["lines"]["maxItems"], MAX_LINES);
        assert_eq!(
            checkout["payment_method"]["enum"],
            serde_json::json!(
                PaymentMethod::ALL
                    .iter()
                    .map(PaymentMethod::as_str)
                    .collect::<Vec<_>>()
            )
        );
        assert_eq!(
            schemas["CheckoutLine"]["properties"]["quantity"]["maximum"],
            MAX_LINE_QUANTITY
        );
        assert_eq!(
            schemas["CheckoutOrder"]["properties"]["status"]["enum"],
            serde_json::json!(
                OrderStatus::ALL
                    .iter()
                    .map(OrderStatus::as_str)
                    .collect::<Vec<_>>()
            )
        );
        assert_eq!(
            schemas["Review"]["properties"]["rating"]["maximum"],
            Rating::MAX
        );
        assert_eq!(
            schemas["Reserve"]["properties"]["ttl_seconds"]["maximum"],
            MAX_HOLD_TTL_SECONDS
        );
        assert_eq!(
            schemas["AddStory"]["properties"]["media"]["maxItems"],
            MAX_MEDIA
        );
    }

    #[test]
    fn every_field_of_every_request_body_says_what_it_means() {
        let document = document_json();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        let mut undescribed = Vec::new();
        for (name, schema) in schemas {
            if RESPONSES.contains(&name.as_str()) {
                continue;
            }
            for (field, property) in schema["properties"].as_object().into_iter().flatten() {
                let description = property["description"].as_str().unwrap_or("");
                if description.is_empty() {
                    undescribed.push(format!("{name}.{field}"));
                }
            }
        }
        assert!(undescribed.is_empty(), "{undescribed:?}");
        // A field's meaning comes before its schema's bounds.
        let title = &schemas["CreateListing"]["properties"]["title"]["description"];
        assert!(
            title
                .as_str()
                .unwrap()
                .starts_with("The listing's title. 1 to 200 characters"),
            "{title}"
        );
        assert!(
            schemas["ShippingAddress"]["properties"]["line2"]["description"]
                .as_str()
                .unwrap()
                .starts_with("More of the address; blank is none.")
        );
    }

    #[test]
    fn request_bodies_refuse_unknown_fields_and_responses_are_closed() {
        let document = document_json();
        let schemas = &document["components"]["schemas"];
        for request in [
            "CreateListing",
            "Checkout",
            "Money",
            "Location",
            "ShippingAddress",
        ] {
            assert_eq!(schemas[request]["additionalProperties"], false, "{request}");
        }
        // Optional request fields stay optional.
        let required = schemas["CreateListing"]["required"].as_array().unwrap();
        assert!(!required.contains(&serde_json::json!("description")));
        assert!(required.contains(&serde_json::json!("title")));
        for response in RESPONSES {
            let schema = &schemas[*response];
            assert!(schema.is_object(), "{response} is not in the document");
            if let Some(properties) = schema["properties"].as_object() {
                assert_eq!(schema["additionalProperties"], false, "{response}");
                let required = schema["required"].as_array().unwrap();
                for name in properties.keys() {
                    // Only a process that runs the relay reports it.
                    let optional = (*response, name.as_str()) == ("Health", "relay");
                    assert_eq!(
                        required.contains(&serde_json::json!(name)),
                        !optional,
                        "{response}.{name}"
                    );
                }
            }
        }
    }

    #[test]
    fn commands_are_authenticated_and_take_the_command_headers() {
        let document = document_json();
        assert_eq!(
            document["security"],
            serde_json::json!([{"bearerAuth": []}])
        );
        let checkout = &document["paths"]["/orders"]["post"];
        assert!(checkout.get("security").is_none());
        for status in [
            "201", "400", "401", "403", "404", "409", "413", "415", "422", "500", "503",
        ] {
            assert!(checkout["responses"][status].is_object(), "{status}");
        }
        let headers: Vec<&str> = checkout["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|parameter| parameter["name"].as_str().unwrap())
            .collect();
        for header in ["Idempotency-Key", "X-Correlation-Id", "X-Request-Id"] {
            assert!(headers.contains(&header), "{headers:?}");
        }
        assert!(checkout["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
        let health = &document["paths"]["/health"]["get"];
        assert_eq!(health["security"], serde_json::json!([{}]));
        assert!(health["responses"].get("401").is_none());
    }

    #[test]
    fn every_link_names_an_operation_and_fills_its_path_parameters() {
        let document = document_json();
        let mut operations = std::collections::BTreeMap::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for operation in item.as_object().unwrap().values() {
                if let Some(id) = operation["operationId"].as_str() {
                    operations.insert(id.to_owned(), path.clone());
                }
            }
        }
        let mut links = 0;
        for (path, links_of_path) in LINKS {
            let answer = &document["paths"][*path]["post"]["responses"]["201"];
            for (operation_id, parameters) in *links_of_path {
                let link = &answer["links"][*operation_id];
                assert_eq!(link["operationId"], *operation_id, "{path}");
                let target = &operations[*operation_id];
                for (name, _) in *parameters {
                    assert!(target.contains(&format!("{{{name}}}")), "{operation_id}");
                }
                links += 1;
            }
        }
        assert!(links >= 20);
    }

    #[test]
    fn every_path_parameter_is_a_documented_uuid() {
        let document = document_json();
        for (path, item) in document["paths"].as_object().unwrap() {
            let in_path: Vec<&str> = path
                .split('/')
                .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for operation in item.as_object().unwrap().values() {
                let documented: Vec<&str> = operation["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|parameter| parameter["in"] == "path")
                    .inspect(|parameter| {
                        assert_eq!(parameter["schema"]["format"], "uuid", "{path}")
                    })
                    .map(|parameter| parameter["name"].as_str().unwrap())
                    .collect();
                assert_eq!(in_path, documented, "{path}");
            }
        }
    }
}
