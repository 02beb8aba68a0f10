//! ProductTimeline routes: stories by the owner, customizations between the
//! owner and a designer. Timeline entries about listings and orders are
//! written by the listing and order flows themselves.

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use domain::timeline::{ProductTimeline, TimelineCommand};
use domain::values::{
    Comment, CustomizationId, Description, StoryBody, StoryId, Title, Url, UserId,
};
use http_kit::{ApiError, AuthUser, IdPair, IdPath, JsonBody, RequestMeta};
use serde::Deserialize;
use uuid::Uuid;

use super::{EMPTY_BODY_SHA256, bounded, created_reply, field, ok_reply, single};
use crate::app::AppState;

/// Most media URLs on one story or customization.
pub const MAX_MEDIA: usize = 10;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/products/{id}/stories", post(add_story))
        .route("/products/{id}/customizations", post(request_customization))
        .route(
            "/products/{id}/customizations/{customization_id}/accept",
            post(accept_customization),
        )
        .route(
            "/products/{id}/customizations/{customization_id}/complete",
            post(complete_customization),
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddStory {
    title: String,
    body: String,
    #[serde(default)]
    media: Vec<String>,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestCustomization {
    designer_id: Uuid,
    description: String,
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteCustomization {
    #[serde(default)]
    media: Vec<String>,
    #[serde(default)]
    note: String,
}

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
