//! The OpenAPI 3.1 document of the query API, served at `/openapi.json`,
//! derived with utoipa: each handler's `#[utoipa::path]` says what it takes
//! and answers, the response types (`routes::*View`, `*Page`) give the
//! bodies, and the parameter types below document the query strings that
//! `params` reads strictly, with the code's own bounds and choices
//! (`MAX_LIMIT`, the cursor patterns, `domain`'s conditions, statuses and
//! currencies, the search limits). `http_kit::openapi::Conventions` adds
//! what every operation shares (bearer security, `X-Request-Id`, the
//! standard refusals, closed response objects), and [`links`] the links
//! between operations that Schemathesis follows. A test holds the router
//! against this document: every route served is documented, and nothing
//! else is.

use std::borrow::Cow;
use std::sync::LazyLock;

use axum::http::Method;
use domain::values::{Label, MAX_AMOUNT};
use http_kit::openapi::{
    Conventions, ErrorBody, ErrorDetail, MoneyBody, POSITION_INPUT_PATTERN, query_parameter,
    string_enum,
};
use projections::search::{MAX_QUERY_CHARS, MAX_QUERY_WORDS, Sort};
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{KnownFormat, Object, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Required};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToSchema};

use crate::params::{CursorKind, DEFAULT_LIMIT, MAX_CURSOR_LEN, MAX_LIMIT};
use crate::routes::handlers::*;
use crate::routes::{
    Facets, ListingPage, ListingView, Location, ORDER_ROLES, OrderCounts, OrderPage, OrderView,
    PartitionView, ProjectionView, ProjectionsView, RatingView, RelayView, Review, SearchPage,
    SellerStatsView, TicketView, TimelineEntryView, TimelineView, WalletEntryPage, WalletEntryView,
    WalletView, condition_schema, status_schema,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Souk query API",
        description = "The read side of Souk: the read models the projectors build from the \
            event store. Every route is a GET. Every refusal is `{\"error\": {\"code\", \
            \"message\"}}` with a stable code. Query strings are strict: a parameter the route \
            does not take, or one given twice, is 400 `invalid_query`. Every route takes \
            `after`, a position token from the command API: the answer then includes that write \
            (read your writes). The request waits, bounded (5 s by default), until every \
            partition of the projections the route reads has caught up with it, else it is \
            answered 503 `not_caught_up` with `Retry-After`. Lists are pages of `{\"items\", \
            \"next_cursor\"}`: pass `next_cursor` back as `cursor` for the next page, until it \
            is null."
    ),
    paths(
        crate::app::health,
        wallet,
        entries,
        search,
        listings,
        listing,
        orders,
        order,
        timeline,
        stats,
        projections,
        stream,
        ticket,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        MoneyBody,
        Health,
        WalletView,
        WalletEntryView,
        WalletEntryPage,
        ListingView,
        Location,
        ListingPage,
        SearchPage,
        Facets,
        OrderView,
        Review,
        OrderPage,
        TimelineView,
        TimelineEntryView,
        SellerStatsView,
        OrderCounts,
        RatingView,
        ProjectionsView,
        ProjectionView,
        PartitionView,
        RelayView,
        TicketView,
    )),
    tags(
        (name = "service", description = "Health, metrics and this document."),
        (name = "wallets", description = "Balances and ledgers: the wallet's owner, admins and auditors."),
        (name = "listings", description = "Browse listings and their stock: any signed-in user."),
        (name = "orders", description = "Orders: their buyer, their seller, admins and auditors."),
        (name = "products", description = "Product timelines: any signed-in user."),
        (name = "sellers", description = "Seller statistics: any signed-in user."),
        (name = "operations", description = "Projection checkpoints and lag: operators, admins, auditors."),
        (name = "notifications", description = "Live updates for the signed-in user."),
    ),
    security(("bearerAuth" = [])),
    modifiers(&Finish),
)]
struct QueryApi;

/// The responses every operation that needs a token can give, besides its
/// own.
const REFUSALS: &[(&str, &str)] = &[
    (
        "400",
        "A query parameter the route does not take, given twice or undecodable, or a missing \
         required one (`invalid_query`); a bad `limit` (`invalid_limit`), `cursor` \
         (`invalid_cursor`) or `after` (`invalid_position`); a filter out of its rules \
         (`invalid_parameter`); a path id that is not a UUID (`invalid_id`).",
    ),
    (
        "401",
        "No bearer token, or one that does not verify (`unauthorized`).",
    ),
    (
        "404",
        "A path that names no route, such as an empty id (`not_found`).",
    ),
    (
        "413",
        "A request body larger than the limit (`payload_too_large`).",
    ),
    ("500", "A bug; details are in the server log (`internal`)."),
    (
        "503",
        "The read models did not catch up with `after` in time (`not_caught_up`), the database \
         is unreachable, too many requests are in flight or too many notification streams are \
         open (`unavailable`).",
    ),
];

/// The responses any operation can give, the public ones (health, metrics,
/// this document) included: the router's own refusals.
const PUBLIC_REFUSALS: &[(&str, &str)] = &[
    (
        "413",
        "A request body larger than the limit (`payload_too_large`).",
    ),
    ("500", "A bug; details are in the server log (`internal`)."),
    ("503", "The API is shedding load (`unavailable`)."),
];

struct Finish;

impl Modify for Finish {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi.merge(http_kit::router::ServiceApi::openapi());
        Conventions {
            refusals: REFUSALS,
            public_refusals: PUBLIC_REFUSALS,
            // Every schema here is a response body: every field is always
            // there (null when absent), and no other.
            closed: &|_| true,
        }
        .apply(openapi);
        links(openapi);
    }
}

/// The links from a read's answer to the reads that take a value of it
/// (Schemathesis follows them): `(path, [(operation, $response.body pointer
/// of its id)])`.
const LINKS: &[(&str, &[(&str, &str)])] = &[
    ("/wallets/{id}", &[("getWalletEntries", "id")]),
    (
        "/search",
        &[
            ("getListing", "items/0/id"),
            ("getSellerStats", "items/0/seller_id"),
        ],
    ),
    (
        "/listings",
        &[
            ("getListing", "items/0/id"),
            ("getProductTimeline", "items/0/product_id"),
            ("getSellerStats", "items/0/seller_id"),
        ],
    ),
    (
        "/listings/{id}",
        &[
            ("getProductTimeline", "product_id"),
            ("getSellerStats", "seller_id"),
        ],
    ),
    ("/orders", &[("getOrder", "items/0/id")]),
    ("/orders/{id}", &[("getSellerStats", "seller_id")]),
];

/// Adds [`LINKS`] to the 200 answers of their reads.
fn links(openapi: &mut utoipa::openapi::OpenApi) {
    for (path, targets) in LINKS {
        for (operation_id, field) in *targets {
            let value = format!("$response.body#/{field}");
            http_kit::openapi::link(
                openapi,
                (Method::GET, *path, "200"),
                operation_id,
                &[("id", value.as_str())],
            );
        }
    }
}

static DOCUMENT: LazyLock<serde_json::Value> = LazyLock::new(|| {
    serde_json::to_value(QueryApi::openapi()).unwrap_or_else(|error| {
        tracing::error!(%error, "the OpenAPI document does not serialize");
        serde_json::Value::Null
    })
});

/// The document served at `/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    QueryApi::openapi()
}

/// [`document`] as JSON, built once.
pub fn document_json() -> &'static serde_json::Value {
    &DOCUMENT
}

/// `/health`'s body.
pub(crate) struct Health;

impl PartialSchema for Health {
    fn schema() -> RefOr<Schema> {
        http_kit::openapi::health_schema(&[(
            "notifications",
            &["live", "connecting"],
            "Whether the notification consumer reads the event stream.",
        )])
    }
}

impl ToSchema for Health {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Health")
    }
}

pub(crate) use http_kit::openapi::HealthOrError;

/// `?after=`, which every read takes.
#[derive(Debug)]
pub(crate) struct After;

impl IntoParams for After {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![query_parameter(
            "after",
            after_schema(),
            "A position token from the command API. The answer waits, bounded, until the read \
             models include that write; past the bound, 503 `not_caught_up`. Not a token: 400 \
             `invalid_position`.",
        )]
    }
}

/// The parameters of `/notifications/stream`: `after`, the ticket, and
/// where a reconnecting client resumes.
#[derive(Debug)]
pub(crate) struct StreamParams;

impl IntoParams for StreamParams {
    fn into_params(parameter_in: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let mut params = After::into_params(parameter_in);
        let ticket = ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(crate::tickets::MAX_TICKET_LEN))
            .build();
        params.push(query_parameter(
            "ticket",
            ticket,
            "A single-use ticket from `POST /notifications/tickets`, instead of a bearer token. \
             Used, expired or forged: 401.",
        ));
        let resume = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(POSITION_INPUT_PATTERN))
                .build()
        };
        params.push(query_parameter(
            "last_event_id",
            resume(),
            "The `id` of the last event received, for clients that cannot send `Last-Event-ID` \
             (the header wins). Malformed: 400 `invalid_last_event_id`.",
        ));
        params.push(
            utoipa::openapi::path::ParameterBuilder::new()
                .name("Last-Event-ID")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "The `id` of the last event received: the user's notifications after it are \
                     replayed first (the last 24 hours; else `event: reset`). Malformed: 400 \
                     `invalid_last_event_id`.",
                ))
                .schema(Some(resume()))
                .build(),
        );
        params
    }
}

fn after_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(POSITION_INPUT_PATTERN))
        .build()
}

/// `limit` and the `cursor` of the list `kind`.
fn paging(kind: CursorKind) -> Vec<Parameter> {
    vec![
        query_parameter(
            "limit",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(MAX_LIMIT))
                .default(Some(DEFAULT_LIMIT.into())),
            "Page size. Out of range or not an integer: 400 `invalid_limit`.",
        ),
        query_parameter(
            "cursor",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(MAX_CURSOR_LEN))
                .pattern(Some(kind.pattern())),
            "The `next_cursor` of the previous page of this list. Anything else (a cursor of \
             another list included): 400 `invalid_cursor`.",
        ),
    ]
}

/// The paging parameters of each list: `limit` and a `cursor` whose
/// pattern is the list's own (`CursorKind::pattern`), which a derive cannot
/// compute.
macro_rules! paging_params {
    ($($name:ident => $kind:expr),* $(,)?) => {$(
        #[derive(Debug)]
        pub(crate) struct $name;

        impl IntoParams for $name {
            fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
                paging($kind)
            }
        }
    )*};
}

paging_params! {
    WalletEntryPaging => CursorKind::WalletEntries,
    ListingPaging => CursorKind::Listings,
    SearchPaging => CursorKind::Search,
    OrderPaging => CursorKind::Orders,
    TimelinePaging => CursorKind::Timeline,
}

/// The filters `/listings` and `/search` share (`routes::listings::Filters`
/// reads them).
#[derive(Debug)]
pub(crate) struct ListingFilters;

impl IntoParams for ListingFilters {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            query_parameter(
                "category",
                category_schema(),
                "Exact category (surrounding whitespace is trimmed; no control characters).",
            ),
            query_parameter("condition", condition_schema(), "Item condition."),
            query_parameter("seller_id", uuid_schema(), "The seller."),
            query_parameter(
                "currency",
                http_kit::openapi::currency(),
                "Only prices in this currency.",
            ),
            query_parameter(
                "min_price",
                price_schema(),
                "Lowest price, in minor units, inclusive. Above `max_price`: 400.",
            ),
            query_parameter(
                "max_price",
                price_schema(),
                "Highest price, in minor units, inclusive.",
            ),
            query_parameter("status", status_schema(), "Listing status."),
        ]
    }
}

fn uuid_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
        .build()
}

fn category_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(Label::MIN_CHARS))
        .max_length(Some(Label::MAX_CHARS))
        .build()
}

fn price_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(MAX_AMOUNT))
        .build()
}

/// `/search`'s own parameters (`routes::search` reads them).
#[derive(Debug)]
pub(crate) struct SearchParams;

impl IntoParams for SearchParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            query_parameter(
                "q",
                query_text_schema(),
                &format!(
                    "Free text: at most {MAX_QUERY_CHARS} characters and {MAX_QUERY_WORDS} \
                     words, no control characters (else 400 `invalid_parameter`)."
                ),
            ),
            query_parameter("sort", sort_schema(), "The order of the results."),
        ]
    }
}

fn query_text_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(MAX_QUERY_CHARS))
        .build()
}

fn sort_schema() -> Object {
    string_enum(Sort::NAMES.iter().copied()).build()
}

/// `/orders`'s own parameters (`routes::orders` reads them).
#[derive(Debug)]
pub(crate) struct OrderListParams;

impl IntoParams for OrderListParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let mut role = query_parameter(
            "role",
            order_role_schema(),
            "Orders the user placed (buyer) or received (seller).",
        );
        role.required = Required::True;
        vec![
            role,
            query_parameter(
                "user_id",
                uuid_schema(),
                "Whose orders (default: the caller's).",
            ),
        ]
    }
}

fn order_role_schema() -> Object {
    string_enum(ORDER_ROLES.iter().copied()).build()
}

#[cfg(test)]
mod tests {
    use http_kit::openapi::undocumented;

    use super::*;

    #[test]
    fn every_route_the_router_serves_is_documented_and_nothing_else() {
        let routes = crate::app::routes();
        assert!(routes.served().len() >= 13, "{:?}", routes.served());
        let problems = undocumented(routes.served(), &document());
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn the_document_takes_its_constants_from_the_code() {
        let document = document_json();
        let listings = &document["paths"]["/listings"]["get"]["parameters"];
        let parameter = |name: &str| {
            listings
                .as_array()
                .unwrap()
                .iter()
                .find(|parameter| parameter["name"] == name)
                .unwrap_or_else(|| panic!("no parameter {name}"))
                .clone()
        };
        assert_eq!(parameter("limit")["schema"]["maximum"], MAX_LIMIT);
        assert_eq!(
            parameter("cursor")["schema"]["pattern"],
            CursorKind::Listings.pattern()
        );
        assert_eq!(parameter("max_price")["schema"]["maximum"], MAX_AMOUNT);
        assert_eq!(
            parameter("condition")["schema"]["enum"],
            serde_json::json!(
                domain::listing::Condition::ALL
                    .iter()
                    .map(|condition| condition.as_str())
                    .collect::<Vec<_>>()
            )
        );
        assert_eq!(
            parameter("currency")["schema"]["enum"],
            serde_json::json!(domain::values::CURRENCIES)
        );
        let schemas = &document["components"]["schemas"];
        assert_eq!(
            schemas["Order"]["properties"]["status"]["enum"],
            serde_json::json!(
                domain::order::OrderStatus::ALL
                    .iter()
                    .map(|status| status.as_str())
                    .collect::<Vec<_>>()
            )
        );
        assert_eq!(
            schemas["ListingPage"]["properties"]["items"]["maxItems"],
            MAX_LIMIT
        );
    }

    #[test]
    fn response_objects_are_closed_and_carry_every_field() {
        let document = document_json();
        let wallet = &document["components"]["schemas"]["Wallet"];
        assert_eq!(wallet["additionalProperties"], false);
        let required = wallet["required"].as_array().unwrap();
        let properties = wallet["properties"].as_object().unwrap();
        assert_eq!(required.len(), properties.len());
        // A nullable field is required too: it is always there, as null.
        let entry = &document["components"]["schemas"]["WalletEntry"];
        assert!(
            entry["required"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("order_id"))
        );
        // Free-form objects stay open.
        let attributes = &document["components"]["schemas"]["Listing"]["properties"]["attributes"];
        assert!(
            attributes.get("additionalProperties").is_none(),
            "{attributes}"
        );
    }

    #[test]
    fn reads_need_a_token_and_the_service_routes_do_not() {
        let document = document_json();
        assert_eq!(
            document["security"],
            serde_json::json!([{"bearerAuth": []}])
        );
        assert!(document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer");
        let wallet = &document["paths"]["/wallets/{id}"]["get"];
        assert!(wallet.get("security").is_none());
        for status in ["200", "400", "401", "403", "404", "413", "500", "503"] {
            assert!(wallet["responses"][status].is_object(), "{status}");
        }
        let health = &document["paths"]["/health"]["get"];
        assert_eq!(health["security"], serde_json::json!([{}]));
        assert!(health["responses"].get("401").is_none());
        assert_eq!(
            document["paths"]["/listings"]["get"]["responses"]["200"]["links"]["getListing"]["operationId"],
            "getListing"
        );
    }
}
