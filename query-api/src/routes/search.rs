//! `/search`: listings by free text (typo tolerant), with the filters of
//! `/listings`, an order, facet counts over the filtered matches and offset
//! cursors, for any signed-in user.
//!
//! The index (`projections::search`, embedded or Meilisearch) answers ids,
//! the total and the facets; the items are read from `rm_listings`, so they
//! are exactly `/listings` items. `?after=` waits for the listings
//! projection, then for the search indexer (no change at or before the
//! position left in `search_pending`).

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::State;
use http_kit::openapi::{ErrorBody, Routes};
use http_kit::{ApiError, AuthUser};
use projections::search::{
    MAX_OFFSET, MAX_QUERY_CHARS, MAX_QUERY_WORDS, SearchError, SearchFilters, SearchQuery, Sort,
    words,
};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::listings::{COLUMNS, FILTER_PARAMS, Filters, ListingRow, ListingView};
use super::{db_error, page_items};
use crate::app::AppState;
use crate::catch_up::Projection;
use crate::openapi::{After, ListingFilters, SearchPaging, SearchParams};
use crate::params::{Cursor, CursorKind, QueryParams, invalid_parameter};

pub fn routes() -> Routes<AppState> {
    Routes::new().get("/search", search)
}

/// A page of search results, with the total and facet counts of all
/// matches.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SearchPage {
    #[schema(schema_with = page_items::<ListingView>)]
    items: Vec<ListingView>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
    /// How many listings match (Meilisearch: its estimate).
    total: u64,
    facets: Facets,
}

/// Matches by value, per facet.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Facets {
    /// Matches by category.
    category: BTreeMap<String, u64>,
    /// Matches by condition.
    condition: BTreeMap<String, u64>,
}

/// A backend failure: 503 when it cannot be reached, else a 500 logged in
/// full.
pub(crate) fn search_error(error: SearchError) -> ApiError {
    match error {
        SearchError::Unavailable(_) => {
            tracing::warn!(%error, "search index unavailable");
            ApiError::Unavailable
        }
        error => ApiError::Internal(anyhow::Error::new(error).context("searching")),
    }
}

/// `?q=`: at most [`MAX_QUERY_CHARS`] characters, no control characters,
/// at most [`MAX_QUERY_WORDS`] words.
fn text(q: Option<&str>) -> Result<String, ApiError> {
    let text = q.unwrap_or("").trim();
    if text.chars().count() > MAX_QUERY_CHARS || text.chars().any(char::is_control) {
        return Err(invalid_parameter(format!(
            "q must be at most {MAX_QUERY_CHARS} characters, without control characters"
        )));
    }
    if words(text).len() > MAX_QUERY_WORDS {
        return Err(invalid_parameter(format!(
            "q must have at most {MAX_QUERY_WORDS} words"
        )));
    }
    Ok(text.to_owned())
}

/// Listings by free text, typo tolerant, with facet counts
///
/// `q` matches titles and descriptions: a word of 5 to 8 characters
/// tolerates one typo, a longer one two, and the last word also matches as a
/// prefix (`iphne` finds "iPhone"). Without `q`, every listing the filters
/// let through matches. The filters are those of `/listings` (same rules,
/// same 403 for `status=deleted`). `sort`: `relevance` (the default with
/// `q`), `price_asc`, `price_desc` or `newest` (the default without `q`).
/// `facets` counts the matches by category and by condition (up to 100
/// values each), `total` the matches. Pages reach the first 1,000 matches.
/// With `after`, the answer also waits for the search index to include that
/// write.
#[utoipa::path(
    get,
    path = "/search",
    operation_id = "searchListings",
    tag = "listings",
    params(SearchPaging, SearchParams, ListingFilters, After),
    responses(
        (status = 200, description = "The read model's answer.", body = SearchPage),
        (status = 403, description = "`status=deleted` for someone who may not see them (`forbidden`).", body = ErrorBody),
    ),
)]
pub(crate) async fn search(
    State(state): State<AppState>,
    user: AuthUser,
    query: QueryParams,
) -> Result<Json<SearchPage>, ApiError> {
    let params =
        query.accept(&[&["q", "sort", "after", "limit", "cursor"], FILTER_PARAMS].concat())?;
    let after = params.after()?;
    let limit = params.limit()?;
    let offset: i64 = params.cursor(CursorKind::Search)?.unwrap_or(0);
    if offset > MAX_OFFSET as i64 {
        return Err(ApiError::BadRequest {
            code: "invalid_cursor",
            message: "cursor must be a next_cursor this list answered".to_owned(),
        });
    }
    let text = text(params.get("q"))?;
    let sort = match params.choice("sort", Sort::NAMES)? {
        Some(name) => Sort::parse(name).unwrap_or_default(),
        None if words(&text).is_empty() => Sort::Newest,
        None => Sort::Relevance,
    };
    let filters = Filters::parse(&params, &user)?;
    let Some(index) = state.search.clone() else {
        tracing::warn!("/search asked while search is off (SEARCH_BACKEND=off)");
        return Err(ApiError::Unavailable);
    };
    state.read_after(after, &[Projection::Listings]).await?;
    if let Some(after) = after {
        state.catch_up.wait_search(after, &*index).await?;
    }
    let page = index
        .search(SearchQuery {
            text,
            filters: SearchFilters {
                category: filters.category.clone(),
                condition: filters.condition.map(str::to_owned),
                seller_id: filters.seller_id,
                currency: filters.currency.clone(),
                min_price: filters.min_price,
                max_price: filters.max_price,
                status: filters.status.map(str::to_owned),
            },
            sort,
            offset: offset as usize,
            limit: limit as usize,
        })
        .await
        .map_err(search_error)?;

    let rows: Vec<ListingRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM rm_listings WHERE listing_id = ANY($1)"
    ))
    .bind(&page.ids)
    .fetch_all(&state.pool)
    .await
    .map_err(db_error)?;
    // In the index's order; a listing whose status changed since it was
    // indexed is left out rather than shown against the filter.
    let mut rows: HashMap<Uuid, ListingRow> =
        rows.into_iter().map(|row| (row.listing_id, row)).collect();
    let items: Vec<ListingView> = page
        .ids
        .iter()
        .filter_map(|id: &Uuid| rows.remove(id))
        .filter(|row| filters.admits(&row.status))
        .map(ListingRow::view)
        .collect();
    let next = offset + limit;
    let next_cursor = (next < page.total as i64 && next <= MAX_OFFSET as i64)
        .then(|| Cursor::encode(CursorKind::Search, &next));
    let mut facets = page.facets;
    Ok(Json(SearchPage {
        items,
        next_cursor,
        total: page.total,
        facets: Facets {
            category: facets.remove("category").unwrap_or_default(),
            condition: facets.remove("condition").unwrap_or_default(),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_texts_are_bounded() {
        assert_eq!(text(Some("  iphone ")).unwrap(), "iphone");
        assert_eq!(text(None).unwrap(), "");
        for bad in ["a\u{0}b".to_owned(), "x".repeat(201), "a ".repeat(9)] {
            assert_eq!(text(Some(&bad)).unwrap_err().code(), "invalid_parameter");
        }
    }
}
