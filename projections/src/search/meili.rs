//! The Meilisearch backend (`SEARCH_BACKEND=meilisearch`): one index,
//! `<MEILI_INDEX>_v<DOCUMENT_VERSION>`, primary key `id`, the same documents
//! and the same query as the embedded index. Typo tolerance and prefix
//! search on the last word are Meilisearch's own (its defaults are the ones
//! the embedded index copies). [`Meili::configure`] creates the index and
//! applies [`settings`]; a write returns once Meilisearch reports its task
//! done. Nothing is kept on the process's disk: any number of projector and
//! query API processes, on any hosts, share the server.
//!
//! So that both backends answer alike: the query is sent as its words
//! (`super::words`: no phrase or negation syntax), every word must match
//! (`matchingStrategy: all`), an explicit sort ranks before relevance (the
//! `sort` ranking rule first) and breaks ties by id, and categories are
//! lowercased. Tested end to end against a real server (`tests/e2e/search.rs`).

use std::time::Duration;

use futures::future::BoxFuture;
use meilisearch_sdk::client::Client;
use meilisearch_sdk::errors::{Error, ErrorCode, ErrorType};
use meilisearch_sdk::indexes::Index;
use meilisearch_sdk::search::{MatchingStrategies, Selectors};
use meilisearch_sdk::settings::{
    FacetingSettings, MinWordSizeForTypos, PaginationSetting, Settings, TypoToleranceSettings,
};
use meilisearch_sdk::task_info::TaskInfo;
use serde::Deserialize;
use uuid::Uuid;

use super::meili_http::Http;
use super::{
    DOCUMENT_VERSION, Durable, FACETS, ListingDoc, MAX_FACET_VALUES, MAX_OFFSET, MAX_QUERY_WORDS,
    SearchError, SearchFilters, SearchIndex, SearchPage, SearchQuery, Sort, words,
};

/// How long a write waits for its Meilisearch task.
const TASK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a waiting write asks about its task.
const TASK_POLL: Duration = Duration::from_millis(20);
/// The ranking rules: Meilisearch's defaults with `sort` first, so that an
/// explicit sort orders every match (relevance only orders ties, and the
/// sort's last key, the id, leaves none).
const RANKING_RULES: [&str; 6] = [
    "sort",
    "words",
    "typo",
    "proximity",
    "attribute",
    "exactness",
];
/// The longest name of the index (Meilisearch allows 400 bytes).
const MAX_INDEX_NAME: usize = 200;

/// A Meilisearch index of listings.
#[derive(Clone)]
pub struct Meili {
    client: Client<Http>,
    index: Index<Http>,
}

impl std::fmt::Debug for Meili {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds the API key: only the index is shown.
        f.debug_struct("Meili")
            .field("index", &self.index.uid)
            .finish_non_exhaustive()
    }
}

/// What a failed request to Meilisearch means for Souk. Unreachable, slow,
/// or answering with a 5xx (Meilisearch's `internal` and `system` errors:
/// the machine's limits, or its search queue full) is the server being
/// unavailable for now; anything else (a refused request or key) is
/// Souk's own error.
fn failed(error: Error) -> SearchError {
    match error {
        Error::HttpError(error) => SearchError::Unavailable(error.to_string()),
        Error::Timeout => SearchError::Unavailable("a Meilisearch task timed out".to_owned()),
        // `system` is not in the SDK's `ErrorType`: it reads as `Unknown`.
        Error::Meilisearch(error)
            if matches!(error.error_type, ErrorType::Internal | ErrorType::Unknown) =>
        {
            SearchError::Unavailable(error.to_string())
        }
        Error::MeilisearchCommunication(error) if error.status_code >= 500 => {
            SearchError::Unavailable(error.to_string())
        }
        error => SearchError::Backend(error.to_string()),
    }
}

fn not_found(error: &Error) -> bool {
    matches!(error, Error::Meilisearch(error) if error.error_code == ErrorCode::IndexNotFound)
}

/// The settings Souk applies to its index (README lists them).
pub fn settings() -> Settings {
    Settings::new()
        .with_searchable_attributes(["title", "description"])
        .with_filterable_attributes([
            "category",
            "condition",
            "seller_id",
            "currency",
            "status",
            "price",
        ])
        .with_sortable_attributes(["price", "created_at", "id"])
        .with_ranking_rules(RANKING_RULES)
        .with_typo_tolerance(TypoToleranceSettings {
            enabled: Some(true),
            disable_on_attributes: Some(Vec::new()),
            disable_on_words: Some(Vec::new()),
            // `super::typo_budget`.
            min_word_size_for_typos: Some(MinWordSizeForTypos {
                one_typo: Some(5),
                two_typos: Some(9),
            }),
            disable_on_numbers: Some(false),
        })
        .with_faceting(FacetingSettings {
            max_values_per_facet: MAX_FACET_VALUES,
            sort_facet_values_by: None,
        })
        // The deepest page: offset at most MAX_OFFSET, then one page (the
        // query API's largest is 100 listings).
        .with_pagination(PaginationSetting {
            max_total_hits: MAX_OFFSET + 100,
        })
}

/// A filter value, quoted for Meilisearch's filter syntax.
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `filters` in Meilisearch's filter syntax (the attributes are filterable
/// per [`Meili::configure`]).
pub fn filter_expression(filters: &SearchFilters) -> String {
    let mut parts = Vec::new();
    let seller = filters.seller_id.map(|id| id.to_string());
    for (attribute, value) in [
        ("category", filters.category.as_deref()),
        ("condition", filters.condition.as_deref()),
        ("seller_id", seller.as_deref()),
        ("currency", filters.currency.as_deref()),
        ("status", filters.status.as_deref()),
    ] {
        if let Some(value) = value {
            parts.push(format!("{attribute} = {}", quoted(value)));
        }
    }
    if filters.status.is_none() {
        parts.push("status != \"deleted\"".to_owned());
    }
    if let Some(min) = filters.min_price {
        parts.push(format!("price >= {min}"));
    }
    if let Some(max) = filters.max_price {
        parts.push(format!("price <= {max}"));
    }
    parts.join(" AND ")
}

/// The sort of `sort`, ties broken by id (see [`Sort`]).
fn sort_expression(sort: Sort) -> &'static [&'static str] {
    match sort {
        Sort::Relevance => &[],
        Sort::PriceAsc => &["price:asc", "id:asc"],
        Sort::PriceDesc => &["price:desc", "id:asc"],
        Sort::Newest => &["created_at:desc", "id:desc"],
    }
}

#[derive(Deserialize)]
struct Hit {
    id: Uuid,
}

impl Meili {
    /// A client of the server at `url` for the index `name` (no request is
    /// made yet).
    pub fn new(url: &str, api_key: Option<&str>, name: &str) -> Result<Self, SearchError> {
        if name.is_empty()
            || name.len() > MAX_INDEX_NAME
            || !name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
        {
            return Err(SearchError::Config(format!(
                "MEILI_INDEX must be 1 to {MAX_INDEX_NAME} letters, digits, '_' or '-'"
            )));
        }
        let http = Http::new(api_key).map_err(SearchError::Config)?;
        let client = Client::new_with_client(url, api_key, http);
        let index = client.index(format!("{name}_v{DOCUMENT_VERSION}"));
        Ok(Self { client, index })
    }

    async fn finish(&self, task: TaskInfo) -> Result<(), SearchError> {
        let task = task
            .wait_for_completion(&self.client, Some(TASK_POLL), Some(TASK_TIMEOUT))
            .await
            .map_err(failed)?;
        if task.is_failure() {
            return Err(SearchError::Backend(format!(
                "a Meilisearch task failed: {task:?}"
            )));
        }
        Ok(())
    }

    /// The index's name on the server.
    pub fn uid(&self) -> &str {
        &self.index.uid
    }

    /// Creates the index if it is missing and applies [`settings`].
    pub async fn configure(&self) -> Result<(), SearchError> {
        match self.client.get_index(&self.index.uid).await {
            Ok(_) => {}
            Err(error) if not_found(&error) => {
                let created = self
                    .client
                    .create_index(&self.index.uid, Some("id"))
                    .await
                    .map_err(failed)?;
                // Created by another process meanwhile is fine too.
                let _ = self.finish(created).await;
            }
            Err(error) => return Err(failed(error)),
        }
        let task = self.index.set_settings(&settings()).await.map_err(failed)?;
        self.finish(task).await
    }
}

impl SearchIndex for Meili {
    fn search(&self, query: SearchQuery) -> BoxFuture<'_, Result<SearchPage, SearchError>> {
        Box::pin(async move {
            let filter = filter_expression(&query.filters);
            // The words only: Meilisearch's phrase (`"..."`) and negation
            // (`-word`) syntax has no counterpart in the embedded index.
            let text = words(&query.text)
                .into_iter()
                .take(MAX_QUERY_WORDS)
                .collect::<Vec<_>>()
                .join(" ");
            let mut search = self.index.search();
            search
                .with_query(&text)
                .with_matching_strategy(MatchingStrategies::ALL)
                .with_filter(&filter)
                .with_facets(Selectors::Some(FACETS))
                .with_offset(query.offset)
                .with_limit(query.limit.max(1))
                .with_attributes_to_retrieve(Selectors::Some(&["id"]));
            let sort = sort_expression(query.sort);
            if !sort.is_empty() {
                search.with_sort(sort);
            }
            let results = match search.execute::<Hit>().await {
                Ok(results) => results,
                // Not created yet: the indexer creates it when it starts.
                Err(error) if not_found(&error) => return Ok(SearchPage::empty()),
                Err(error) => return Err(failed(error)),
            };
            let mut page = SearchPage {
                ids: results.hits.into_iter().map(|hit| hit.result.id).collect(),
                total: results.estimated_total_hits.unwrap_or(0) as u64,
                ..SearchPage::empty()
            };
            let distribution = results.facet_distribution.unwrap_or_default();
            for facet in FACETS {
                let counts = page.facets.entry((*facet).to_owned()).or_default();
                if let Some(values) = distribution.get(*facet) {
                    for (value, count) in values {
                        counts.insert(value.clone(), *count as u64);
                    }
                }
            }
            Ok(page)
        })
    }

    fn write(
        &self,
        upserts: Vec<ListingDoc>,
        deletes: Vec<Uuid>,
    ) -> BoxFuture<'_, Result<(), SearchError>> {
        Box::pin(async move { self.submit(upserts, deletes).await?.await })
    }

    /// Enqueues the tasks (the server applies an index's tasks in the order
    /// they were enqueued) and returns the wait for their completion.
    fn submit(
        &self,
        upserts: Vec<ListingDoc>,
        deletes: Vec<Uuid>,
    ) -> BoxFuture<'_, Result<Durable<'_>, SearchError>> {
        Box::pin(async move {
            let mut tasks = Vec::with_capacity(2);
            if !upserts.is_empty() {
                tasks.push(
                    self.index
                        .add_or_replace(&upserts, Some("id"))
                        .await
                        .map_err(failed)?,
                );
            }
            if !deletes.is_empty() {
                let ids: Vec<String> = deletes.iter().map(Uuid::to_string).collect();
                tasks.push(self.index.delete_documents(&ids).await.map_err(failed)?);
            }
            Ok(Box::pin(async move {
                for task in tasks {
                    self.finish(task).await?;
                }
                Ok(())
            }) as Durable<'_>)
        })
    }

    fn clear(&self) -> BoxFuture<'_, Result<(), SearchError>> {
        Box::pin(async move {
            let task = self.index.delete_all_documents().await.map_err(failed)?;
            self.finish(task).await
        })
    }

    fn count(&self) -> BoxFuture<'_, Result<u64, SearchError>> {
        Box::pin(async move {
            match self.index.get_stats().await {
                Ok(stats) => Ok(stats.number_of_documents as u64),
                Err(error) if not_found(&error) => Ok(0),
                Err(error) => Err(failed(error)),
            }
        })
    }

    fn ensure(&self) -> BoxFuture<'_, Result<(), SearchError>> {
        Box::pin(async move {
            // An index removed, or created again by a document write, lacks
            // Souk's ranking rules.
            let configured = match self.index.get_ranking_rules().await {
                Ok(rules) => rules == RANKING_RULES,
                Err(error) if not_found(&error) => false,
                Err(error) => return Err(failed(error)),
            };
            if !configured {
                tracing::warn!(index = %self.index.uid, "the Meilisearch index lacks its settings: configuring it");
                self.configure().await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use meilisearch_sdk::errors::MeilisearchCommunicationError;

    use super::*;

    /// Meilisearch's error body, as the SDK parses it.
    fn answered(code: &str, kind: &str) -> Error {
        let body = serde_json::json!({"message": "m", "code": code, "type": kind, "link": "l"});
        Error::Meilisearch(serde_json::from_value(body).expect("an error body"))
    }

    #[test]
    fn a_busy_or_failing_server_is_unavailable_and_a_refused_request_is_an_error() {
        for busy in [
            answered("too_many_search_requests", "system"),
            answered("internal", "internal"),
            answered("no_space_left_on_device", "system"),
            // A 5xx whose body is not Meilisearch's (a proxy in front).
            Error::MeilisearchCommunication(MeilisearchCommunicationError {
                status_code: 502,
                message: None,
                url: "http://127.0.0.1:7700/indexes/l/search".to_owned(),
            }),
        ] {
            assert!(
                matches!(failed(busy), SearchError::Unavailable(_)),
                "a 5xx of Meilisearch is unavailability"
            );
        }
        for refused in [
            answered("invalid_search_filter", "invalid_request"),
            answered("invalid_api_key", "auth"),
            Error::MeilisearchCommunication(MeilisearchCommunicationError {
                status_code: 413,
                message: None,
                url: "http://127.0.0.1:7700/indexes/l/documents".to_owned(),
            }),
        ] {
            assert!(matches!(failed(refused), SearchError::Backend(_)));
        }
    }

    #[test]
    fn filters_become_one_meilisearch_expression_with_quoted_values() {
        // Meilisearch compares strings without case: the category as typed.
        assert_eq!(
            filter_expression(&SearchFilters::default()),
            "status != \"deleted\""
        );
        let seller = Uuid::nil();
        let filters = SearchFilters {
            category: Some("say \"hi\"".to_owned()),
            condition: Some("like_new".to_owned()),
            seller_id: Some(seller),
            currency: None,
            min_price: Some(100),
            max_price: Some(2_000),
            status: Some("deleted".to_owned()),
        };
        assert_eq!(
            filter_expression(&filters),
            format!(
                "category = \"say \\\"hi\\\"\" AND condition = \"like_new\" AND seller_id = \
                 \"{seller}\" AND status = \"deleted\" AND price >= 100 AND price <= 2000"
            )
        );
    }

    #[test]
    fn sorts_name_sortable_attributes() {
        assert!(sort_expression(Sort::Relevance).is_empty());
        assert_eq!(
            sort_expression(Sort::Newest),
            ["created_at:desc", "id:desc"]
        );
    }

    #[test]
    fn the_client_is_built_without_a_request_and_hides_its_key() {
        let meili = Meili::new("http://127.0.0.1:7700", Some("secret"), "souk").unwrap();
        assert!(!format!("{meili:?}").contains("secret"));
        assert_eq!(meili.uid(), format!("souk_v{DOCUMENT_VERSION}"));
        for bad in ["", "a b", "x/y", &"x".repeat(201)] {
            assert!(
                Meili::new("http://127.0.0.1:7700", None, bad).is_err(),
                "{bad:?}"
            );
        }
    }
}
