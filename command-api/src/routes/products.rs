//! ProductTimeline routes: stories by the owner, customizations between the
//! owner and a designer. Timeline entries about listings and orders are
//! written by the listing and order flows themselves.

use axum::extract::State;
use axum::response::Response;
use domain::timeline::{ProductTimeline, TimelineCommand};
use domain::values::{
    Comment, CustomizationId, Description, StoryBody, StoryId, Title, Url, UserId,
};
use http_kit::openapi::Routes;
use http_kit::openapi::{AcceptedBody, FieldDocs, text};
use http_kit::{ApiError, AuthUser, IdPair, IdPath, JsonBody, RequestMeta};
use serde::Deserialize;
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use super::{EMPTY_BODY_SHA256, bounded, created_reply, field, ok_reply, single};
use crate::app::AppState;
use crate::openapi::ACCEPTED;

const PRODUCT_ID: &str = "The product. Anything but a UUID is 400 `invalid_id`.";
const CUSTOMIZATION_ID: &str = "The customization. Anything but a UUID is 400 `invalid_id`.";

/// Most media URLs on one story or customization.
pub const MAX_MEDIA: usize = domain::timeline::MAX_MEDIA;

/// The OpenAPI description of these routes.
#[derive(OpenApi)]
#[openapi(paths(
    add_story,
    request_customization,
    accept_customization,
    complete_customization
), modifiers(&FIELDS))]
pub(super) struct Api;

/// What the fields of these request bodies mean, where a function gives
/// the field's schema (utoipa drops those fields' doc comments).
const FIELDS: FieldDocs = FieldDocs(&[
    ("AddStory", "title", "The story's title."),
    ("AddStory", "body", "The story."),
    ("AddStory", "media", "Pictures or videos of the story."),
    ("RequestCustomization", "description", "What to do."),
    (
        "CompleteCustomization",
        "media",
        "Pictures or videos of the work.",
    ),
    ("CompleteCustomization", "note", "A note to the owner."),
]);

pub fn routes() -> Routes<AppState> {
    Routes::new()
        .post("/products/{id}/stories", add_story)
        .post("/products/{id}/customizations", request_customization)
        .post(
            "/products/{id}/customizations/{customization_id}/accept",
            accept_customization,
        )
        .post(
            "/products/{id}/customizations/{customization_id}/complete",
            complete_customization,
        )
}

fn parse_media(media: &[String]) -> Result<Vec<Url>, ApiError> {
    bounded("media", media, MAX_MEDIA)?;
    media
        .iter()
        .enumerate()
        .map(|(index, url)| field(&format!("media[{index}]"), Url::parse("media", url)))
        .collect()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddStory {
    #[schema(schema_with = text::<Title>)]
    title: String,
    #[schema(schema_with = text::<StoryBody>)]
    body: String,
    #[serde(default)]
    #[schema(schema_with = crate::openapi::media)]
    media: Vec<String>,
}

/// Add a story to a product
///
/// The product's current owner tells part of its story. 201 with the
/// story's id (and the timeline's version).
#[utoipa::path(post, path = "/products/{id}/stories", operation_id = "addStory", tag = "products",
    params(("id" = Uuid, Path, description = PRODUCT_ID)),
    request_body = AddStory,
    responses((status = 201, description = ACCEPTED, body = AcceptedBody)))]
async fn add_story(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<AddStory>,
) -> Result<Response, ApiError> {
    let story_id = StoryId::new();
    let command = TimelineCommand::AddStory {
        actor: user.actor(),
        story_id,
        title: field("title", Title::parse("title", &body.value.title))?,
        body: field("body", StoryBody::parse("body", &body.value.body))?,
        media: parse_media(&body.value.media)?,
    };
    single::<ProductTimeline>(
        &state,
        &user,
        &meta,
        &body.sha256,
        id,
        command,
        created_reply(story_id.as_uuid()),
    )
    .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestCustomization {
    /// The designer's user id.
    designer_id: Uuid,
    #[schema(schema_with = text::<Description>)]
    description: String,
}

/// Ask a designer to customize a product
///
/// The owner asks a designer for a customization. 201 with the
/// customization's id (and the timeline's version).
#[utoipa::path(post, path = "/products/{id}/customizations", operation_id = "requestCustomization", tag = "products",
    params(("id" = Uuid, Path, description = PRODUCT_ID)),
    request_body = RequestCustomization,
    responses((status = 201, description = ACCEPTED, body = AcceptedBody)))]
async fn request_customization(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPath(id): IdPath,
    body: JsonBody<RequestCustomization>,
) -> Result<Response, ApiError> {
    let customization_id = CustomizationId::new();
    let command = TimelineCommand::RequestCustomization {
        actor: user.actor(),
        customization_id,
        designer: UserId::from_uuid(body.value.designer_id),
        description: field(
            "description",
            Description::parse("description", &body.value.description),
        )?,
    };
    single::<ProductTimeline>(
        &state,
        &user,
        &meta,
        &body.sha256,
        id,
        command,
        created_reply(customization_id.as_uuid()),
    )
    .await
}

/// Accept a customization request
///
/// The designer accepts. `id` in the answer is the customization's.
#[utoipa::path(post, path = "/products/{id}/customizations/{customization_id}/accept",
    operation_id = "acceptCustomization", tag = "products",
    params(
        ("id" = Uuid, Path, description = PRODUCT_ID),
        ("customization_id" = Uuid, Path, description = CUSTOMIZATION_ID),
    ),
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn accept_customization(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPair(id, customization_id): IdPair,
) -> Result<Response, ApiError> {
    let command = TimelineCommand::AcceptCustomization {
        actor: user.actor(),
        customization_id: CustomizationId::from_uuid(customization_id),
    };
    single::<ProductTimeline>(
        &state,
        &user,
        &meta,
        &EMPTY_BODY_SHA256,
        id,
        command,
        ok_reply(customization_id),
    )
    .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteCustomization {
    #[serde(default)]
    #[schema(schema_with = crate::openapi::media)]
    media: Vec<String>,
    #[serde(default)]
    #[schema(schema_with = text::<Comment>)]
    note: String,
}

/// Complete a customization
///
/// The designer delivers, with media and a note. `id` in the answer is the
/// customization's.
#[utoipa::path(post, path = "/products/{id}/customizations/{customization_id}/complete",
    operation_id = "completeCustomization", tag = "products",
    params(
        ("id" = Uuid, Path, description = PRODUCT_ID),
        ("customization_id" = Uuid, Path, description = CUSTOMIZATION_ID),
    ),
    request_body = CompleteCustomization,
    responses((status = 200, description = ACCEPTED, body = AcceptedBody)))]
async fn complete_customization(
    State(state): State<AppState>,
    user: AuthUser,
    meta: RequestMeta,
    IdPair(id, customization_id): IdPair,
    body: JsonBody<CompleteCustomization>,
) -> Result<Response, ApiError> {
    let command = TimelineCommand::CompleteCustomization {
        actor: user.actor(),
        customization_id: CustomizationId::from_uuid(customization_id),
        media: parse_media(&body.value.media)?,
        note: field("note", Comment::parse("note", &body.value.note))?,
    };
    single::<ProductTimeline>(
        &state,
        &user,
        &meta,
        &body.sha256,
        id,
        command,
        ok_reply(customization_id),
    )
    .await
}
