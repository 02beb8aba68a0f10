//! The OpenAPI pieces both APIs share, on utoipa: the error body
//! ([`ErrorBody`]), money ([`MoneyBody`]), the answer to an accepted command
//! ([`AcceptedBody`]), position tokens and currencies as the code knows them,
//! the bearer security scheme and the conventions every operation follows
//! ([`Conventions`]: request ids, the refusals every route can meet, closed
//! response objects), and the check that a router serves exactly what its
//! document describes ([`Routes`], [`undocumented`]).

use std::collections::BTreeMap;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use domain::values::{Text, Url};
use serde::{Deserialize, Serialize};
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{
    AdditionalProperties, Object, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, HeaderBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder};
use utoipa::{PartialSchema, ToSchema};

/// The regular expression of a position token ([`event_store::Position`]'s
/// `token`: 32 lowercase hex digits).
pub const POSITION_TOKEN_PATTERN: &str = "^[0-9a-f]{32}$";

/// What `Position::parse_token` accepts: 32 hex digits of either case, each
/// half a non-negative 64-bit number.
pub const POSITION_INPUT_PATTERN: &str = "^[0-7][0-9a-fA-F]{15}[0-7][0-9a-fA-F]{15}$";

/// `{"error": {"code", "message"}}`: the body of every refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable.
    pub code: String,
    /// For people.
    pub message: String,
}

/// An amount of money: integer minor units (cents) and a currency; never
/// floating point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Money)]
pub struct MoneyBody {
    /// Minor units (cents); never floating point.
    pub amount: i64,
    #[schema(schema_with = currency)]
    pub currency: String,
}

impl MoneyBody {
    pub fn new(amount: i64, currency: impl Into<String>) -> Self {
        Self {
            amount,
            currency: currency.into(),
        }
    }
}

/// The answer to an accepted command: the aggregate, its new version and
/// the position of its last event, which the query API's `?after=` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = Accepted)]
pub struct AcceptedBody {
    /// The aggregate's id.
    pub id: String,
    /// Its number of events after the command.
    #[schema(minimum = 0)]
    pub version: i64,
    #[schema(schema_with = position_token)]
    pub position: String,
}

/// A currency: one of the ISO 4217 codes Souk accepts (`domain`'s list).
pub fn currency() -> Object {
    string_enum(domain::values::CURRENCIES.iter().copied())
        .description(Some("An ISO 4217 code Souk accepts."))
        .build()
}

/// A position token as Souk writes it.
pub fn position_token() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(POSITION_TOKEN_PATTERN))
        .description(Some(
            "A position token: a place in the global order of events.",
        ))
        .build()
}

/// A position token, or null.
pub fn position_token_or_null() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .pattern(Some(POSITION_TOKEN_PATTERN))
        .description(Some(
            "A position token (a place in the global order of events), or null.",
        ))
        .build()
}

/// A string that is one of `values`.
pub fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
}

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

/// The bounds of a text type: `domain::values::Text`'s, so that a field's
/// schema says what its parser accepts (`text::<Title>`).
pub trait TextBounds {
    const MIN_CHARS: usize;
    const MAX_CHARS: usize;
}

impl<const MIN: usize, const MAX: usize> TextBounds for Text<MIN, MAX> {
    const MIN_CHARS: usize = Self::MIN_CHARS;
    const MAX_CHARS: usize = Self::MAX_CHARS;
}

/// A text field that `T::parse` accepts: `MIN_CHARS..=MAX_CHARS`
/// characters after trimming, with a pattern that holds exactly for the
/// characters `Text` takes.
pub fn text<T: TextBounds>() -> Object {
    text_builder::<T>().schema_type(Type::String).build()
}

/// [`text`], or null (an absent value).
pub fn text_or_null<T: TextBounds>() -> Object {
    text_builder::<T>()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .build()
}

fn text_builder<T: TextBounds>() -> ObjectBuilder {
    let (min, max) = (T::MIN_CHARS, T::MAX_CHARS);
    let pattern = if min == 0 {
        format!("^[{WHITESPACE}]*[^{FORBIDDEN}]*[{WHITESPACE}]*$")
    } else {
        format!("^[{WHITESPACE}]*[^{INVISIBLE}][^{FORBIDDEN}]*[{WHITESPACE}]*$")
    };
    ObjectBuilder::new()
        .min_length((min > 0).then_some(min))
        .max_length(Some(max))
        .pattern(Some(pattern))
        .description(Some(format!(
            "{min} to {max} characters after trimming surrounding whitespace; control \
             characters other than tab and newline are refused."
        )))
}

/// An http or https URL as `domain::values::Url::parse` accepts it.
pub fn url() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(Url::MAX_LEN))
        .pattern(Some(format!("^https?://[^/{INVISIBLE}][^{INVISIBLE}]*$")))
        .description(Some(format!(
            "An http or https URL of at most {} bytes, without whitespace or control characters.",
            Url::MAX_LEN
        )))
        .build()
}

/// A country as `domain::values::CountryCode::parse` accepts it.
pub fn country_code() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Z]{2}$"))
        .description(Some("An ISO 3166-1 alpha-2 code, upper case."))
        .build()
}

/// The body of `/health` (`router::health`): `status` and `database`,
/// then the service's own `extra` fields: `(name, values, description)`.
pub fn health_schema(extra: &[(&str, &[&str], &str)]) -> RefOr<Schema> {
    let mut health = ObjectBuilder::new()
        .property("status", string_enum(["ok", "degraded"]))
        .property("database", string_enum(["up", "down"]));
    for (name, values, description) in extra {
        health = health.property(
            *name,
            string_enum(values.iter().copied()).description(Some(*description)),
        );
    }
    health.into()
}

/// `/health`'s 503: a `Health` body (the database is down) or an `Error`
/// (the API sheds load).
#[derive(Debug)]
pub struct HealthOrError;

impl PartialSchema for HealthOrError {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(Ref::from_schema_name("Health"))
            .item(Ref::from_schema_name(ErrorBody::name()))
            .into()
    }
}

impl ToSchema for HealthOrError {}

/// A link from the `status` answer of `method path` to the operation
/// `operation_id` (also the link's name), with its parameters as runtime
/// expressions (`$response.body#/id`, `$request.path.id`). Schemathesis
/// follows links to chain calls.
pub fn link(
    openapi: &mut OpenApi,
    (method, path, status): (Method, &str, &str),
    operation_id: &str,
    parameters: &[(&str, &str)],
) {
    let Some(item) = openapi.paths.paths.get_mut(path) else {
        return;
    };
    let operation = match method {
        Method::GET => item.get.as_mut(),
        Method::POST => item.post.as_mut(),
        _ => None,
    };
    let Some(operation) = operation else {
        return;
    };
    let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status) else {
        return;
    };
    let mut link = LinkBuilder::new().operation_id(operation_id);
    for (name, value) in parameters {
        link = link.parameter(*name, *value);
    }
    response
        .links
        .insert(operation_id.to_owned(), RefOr::T(link.build()));
}

/// What the fields of request bodies mean, for the fields whose schema a
/// function gives (`#[schema(schema_with = ...)]`): utoipa drops the doc
/// comment of such a field, so its meaning is listed here instead, as
/// `(schema, field, description)`, and put before what the schema already
/// says (its bounds). A modifier of the document that derives those schemas:
/// `#[openapi(..., modifiers(&FIELDS))]`.
#[derive(Debug, Clone, Copy)]
pub struct FieldDocs(pub &'static [(&'static str, &'static str, &'static str)]);

impl utoipa::Modify for FieldDocs {
    fn modify(&self, openapi: &mut OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for (schema, field, description) in self.0 {
            let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(*schema) else {
                continue;
            };
            let Some(RefOr::T(property)) = object.properties.get_mut(*field) else {
                continue;
            };
            describe(property, description);
        }
    }
}

/// Puts `description` before what `schema` already says of itself.
fn describe(schema: &mut Schema, description: &str) {
    let slot = match schema {
        Schema::Object(object) => &mut object.description,
        Schema::Array(array) => &mut array.description,
        Schema::OneOf(one_of) => &mut one_of.description,
        Schema::AnyOf(any_of) => &mut any_of.description,
        Schema::AllOf(all_of) => &mut all_of.description,
        _ => return,
    };
    *slot = Some(match slot.take() {
        Some(bounds) => format!("{description} {bounds}"),
        None => description.to_owned(),
    });
}

/// The name of the bearer security scheme.
pub const BEARER: &str = "bearerAuth";

/// The conventions every operation of a Souk API follows, applied to a
/// derived document: the bearer security scheme, `X-Request-Id` taken and
/// echoed, the refusals any route can meet, and response objects that carry
/// every field they describe and no other.
#[derive(Clone, Copy)]
pub struct Conventions<'a> {
    /// Responses every operation that needs a token can answer, by status,
    /// unless it documents that status itself: `(status, description)`.
    pub refusals: &'a [(&'a str, &'a str)],
    /// Responses every operation can answer, the public ones (health,
    /// metrics, the document) included: what the router's layers refuse
    /// before any handler runs (load shedding, a panic, ...).
    pub public_refusals: &'a [(&'a str, &'a str)],
    /// The component schemas that are response bodies: closed (every
    /// property required, no other allowed) throughout.
    pub closed: &'a dyn Fn(&str) -> bool,
}

impl std::fmt::Debug for Conventions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conventions")
            .field("refusals", &self.refusals)
            .field("public_refusals", &self.public_refusals)
            .finish_non_exhaustive()
    }
}

impl Conventions<'_> {
    pub fn apply(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An RS256 JWT with `sub` (a UUID), `role` (buyer, seller, admin, auditor \
                         or operator) and `exp`. Missing or invalid: 401.",
                    ))
                    .build(),
            ),
        );
        for (name, schema) in components.schemas.iter_mut() {
            if (self.closed)(name) {
                close(schema);
            }
        }
        components
            .schemas
            .entry(ErrorBody::name().into_owned())
            .or_insert_with(ErrorBody::schema);
        components
            .schemas
            .entry(ErrorDetail::name().into_owned())
            .or_insert_with(ErrorDetail::schema);
        for item in openapi.paths.paths.values_mut() {
            for operation in operations(item) {
                self.apply_to(operation);
            }
        }
    }

    fn apply_to(&self, operation: &mut Operation) {
        let request_id = ParameterBuilder::new()
            .name("X-Request-Id")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some("Echoed back; one is made up when absent."))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .build();
        operation
            .parameters
            .get_or_insert_with(Vec::new)
            .push(RefOr::T(request_id));
        // A public operation (health, metrics, this document) says
        // `security: []`; it is not refused for want of a token.
        let public = operation
            .security
            .as_ref()
            .is_some_and(|requirements| requirements.iter().all(is_empty_requirement));
        let responses = &mut operation.responses.responses;
        let refusals = if public {
            self.public_refusals
        } else {
            self.refusals
        };
        for (status, description) in refusals {
            responses
                .entry((*status).to_owned())
                .or_insert_with(|| RefOr::T(error_response(status, description)));
        }
        for response in responses.values_mut() {
            if let RefOr::T(response) = response {
                response
                    .headers
                    .entry("X-Request-Id".to_owned())
                    .or_insert_with(|| {
                        HeaderBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                            .description(Some(
                                "The request's id (the client's X-Request-Id, or a new UUID).",
                            ))
                            .build()
                            .into()
                    });
            }
        }
    }
}

fn is_empty_requirement(requirement: &utoipa::openapi::security::SecurityRequirement) -> bool {
    serde_json::to_value(requirement)
        .map(|value| value.as_object().is_some_and(serde_json::Map::is_empty))
        .unwrap_or(false)
}

/// An error response with the [`ErrorBody`] schema (503 with `Retry-After`).
pub fn error_response(status: &str, description: &str) -> utoipa::openapi::Response {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
            ErrorBody::name(),
        )))),
    );
    if status == "503" {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                .description(Some("Seconds to wait before retrying."))
                .build(),
        );
    }
    response.build()
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
        item.head.as_mut(),
        item.options.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// Makes every object in `schema` (properties, items and alternatives
/// included) closed: all its properties required and no other allowed.
/// Objects without properties (free-form maps) are left as they are.
pub fn close(schema: &mut RefOr<Schema>) {
    let RefOr::T(schema) = schema else {
        return;
    };
    match schema {
        Schema::Object(object) => {
            if !object.properties.is_empty() && object.additional_properties.is_none() {
                object.required = object.properties.keys().cloned().collect();
                object.additional_properties =
                    Some(Box::new(AdditionalProperties::FreeForm(false)));
            }
            for property in object.properties.values_mut() {
                close(property);
            }
        }
        Schema::Array(array) => {
            if let utoipa::openapi::schema::ArrayItems::RefOrSchema(items) = &mut array.items {
                close(items);
            }
        }
        Schema::OneOf(one_of) => one_of.items.iter_mut().for_each(close),
        Schema::AllOf(all_of) => all_of.items.iter_mut().for_each(close),
        Schema::AnyOf(any_of) => any_of.items.iter_mut().for_each(close),
        _ => {}
    }
}

/// A router that also lists what it serves, so that a test can hold it
/// against its OpenAPI document ([`undocumented`]).
#[derive(Debug)]
pub struct Routes<S = ()> {
    router: Router<S>,
    served: Vec<(Method, &'static str)>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Self {
            router: Router::new(),
            served: Vec::new(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `GET path` with `handler`.
    pub fn get<H: Handler<T, S>, T: 'static>(mut self, path: &'static str, handler: H) -> Self {
        self.router = self.router.route(path, axum::routing::get(handler));
        self.served.push((Method::GET, path));
        self
    }

    /// Serves `POST path` with `handler`.
    pub fn post<H: Handler<T, S>, T: 'static>(mut self, path: &'static str, handler: H) -> Self {
        self.router = self.router.route(path, axum::routing::post(handler));
        self.served.push((Method::POST, path));
        self
    }

    pub fn merge(mut self, other: Routes<S>) -> Self {
        self.router = self.router.merge(other.router);
        self.served.extend(other.served);
        self
    }

    /// What this router serves: method and path (OpenAPI's `{param}` form).
    pub fn served(&self) -> &[(Method, &'static str)] {
        &self.served
    }

    pub fn into_router(self) -> Router<S> {
        self.router
    }
}

/// The routes of `served` that `document` does not describe, and the
/// operations it describes that nothing serves, as `METHOD /path` lines.
pub fn undocumented(served: &[(Method, &'static str)], document: &OpenApi) -> Vec<String> {
    let mut documented: BTreeMap<String, ()> = BTreeMap::new();
    for (path, item) in &document.paths.paths {
        for (method, operation) in [
            (Method::GET, &item.get),
            (Method::PUT, &item.put),
            (Method::POST, &item.post),
            (Method::DELETE, &item.delete),
            (Method::PATCH, &item.patch),
        ] {
            if operation.is_some() {
                documented.insert(format!("{method} {path}"), ());
            }
        }
    }
    let served: BTreeMap<String, ()> = served
        .iter()
        .map(|(method, path)| (format!("{method} {path}"), ()))
        .collect();
    let mut problems: Vec<String> = served
        .keys()
        .filter(|route| !documented.contains_key(*route))
        .map(|route| format!("served but not documented: {route}"))
        .collect();
    problems.extend(
        documented
            .keys()
            .filter(|route| !served.contains_key(*route))
            .map(|route| format!("documented but not served: {route}")),
    );
    problems
}

/// A query parameter documented by hand (for what a derive cannot say).
pub fn query_parameter(
    name: &str,
    schema: impl Into<RefOr<Schema>>,
    description: &str,
) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

#[cfg(test)]
mod tests {
    use event_store::Position;

    use super::*;

    fn matches_token_pattern(text: &str) -> bool {
        text.len() == 32
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    #[test]
    fn position_patterns_say_what_the_event_store_writes_and_reads() {
        for position in [
            Position::START,
            Position {
                transaction_id: u64::MAX >> 1,
                position: i64::MAX,
            },
            Position {
                transaction_id: 7_523_411,
                position: 42,
            },
        ] {
            let token = position.token();
            assert!(matches_token_pattern(&token), "{token}");
            assert_eq!(Position::parse_token(&token).unwrap(), position);
        }
        assert_eq!(POSITION_TOKEN_PATTERN, "^[0-9a-f]{32}$");
        // The input pattern's first digit of each half is 0-7: a half of 8
        // or more is refused by parse_token as a negative position.
        assert!(Position::parse_token(&format!("{:016x}{:016x}", 1, u64::MAX)).is_err());
        assert!(Position::parse_token("0000000000000001000000000000000A").is_ok());
    }

    #[test]
    fn closing_requires_every_property_and_leaves_free_form_maps_open() {
        let mut schema = RefOr::T(Schema::Object(
            ObjectBuilder::new()
                .property("a", ObjectBuilder::new().schema_type(Type::Integer))
                .property(
                    "nested",
                    ObjectBuilder::new()
                        .property("b", ObjectBuilder::new().schema_type(Type::String)),
                )
                .property("free", ObjectBuilder::new().schema_type(Type::Object))
                .build(),
        ));
        close(&mut schema);
        let value = serde_json::to_value(&schema).unwrap();
        assert_eq!(
            value["required"],
            serde_json::json!(["a", "free", "nested"])
        );
        assert_eq!(value["additionalProperties"], false);
        assert_eq!(
            value["properties"]["nested"]["required"],
            serde_json::json!(["b"])
        );
        assert_eq!(value["properties"]["nested"]["additionalProperties"], false);
        assert!(
            value["properties"]["free"]
                .get("additionalProperties")
                .is_none()
        );
    }

    #[test]
    fn a_route_served_without_documentation_and_a_documented_one_not_served_are_named() {
        let document: OpenApi = serde_json::from_value(serde_json::json!({
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "1"},
            "paths": {
                "/a": {"get": {"responses": {}}},
                "/b/{id}": {"get": {"responses": {}}, "post": {"responses": {}}},
            },
        }))
        .unwrap();
        let routes = Routes::<()>::new()
            .get("/a", || async {})
            .get("/b/{id}", || async {})
            .post("/c", || async {});
        assert_eq!(
            undocumented(routes.served(), &document),
            [
                "served but not documented: POST /c",
                "documented but not served: POST /b/{id}",
            ]
        );
        let complete = Routes::<()>::new().get("/a", || async {}).merge(
            Routes::new()
                .get("/b/{id}", || async {})
                .post("/b/{id}", || async {}),
        );
        assert!(undocumented(complete.served(), &document).is_empty());
    }
}
