//! Full-text search over listings: what `/search` asks ([`SearchQuery`]),
//! what it gets back ([`SearchPage`]), and the two backends behind one
//! trait, [`SearchIndex`]: the embedded tantivy index (`embedded`, the
//! default, on disk under `SEARCH_INDEX_DIR`) and Meilisearch (`meili`).
//!
//! The index only holds what searching needs (text, filter and sort fields)
//! and answers listing ids; the query API reads the listings themselves from
//! `rm_listings`, so `/search` items are exactly `/listings` items.
//!
//! `feed` keeps the index in step with `rm_listings`: the live listings
//! projection records each changed listing in `search_pending` in the
//! transaction of its batch, and the indexer task drains that table into
//! the index (see `migrations/sql/0005_search.sql`).

mod embedded;
mod feed;
mod meili;
mod meili_http;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Serialize;
use uuid::Uuid;

pub use embedded::Embedded;
pub use feed::{CHANNEL, Indexer, enqueue_all};
pub(crate) use feed::{enqueue, spawn_indexer};
pub use meili::{Meili, filter_expression};

/// Longest accepted query text, in characters.
pub const MAX_QUERY_CHARS: usize = 200;
/// Most words of a query; each expands to the terms within its typo budget.
pub const MAX_QUERY_WORDS: usize = 8;
/// Deepest result reachable by paging (Meilisearch's default `maxTotalHits`).
pub const MAX_OFFSET: usize = 1_000;
/// Most values counted per facet.
pub const MAX_FACET_VALUES: usize = 100;
/// The facets every search counts, over the filtered result set.
pub const FACETS: &[&str] = &["category", "condition"];
/// The version of the documents' shape; a new version is a new, empty index
/// (a directory or a Meilisearch index of its own), which the indexer fills.
/// 2: the embedded index keeps the id as a fast field (ties of a sort).
pub const DOCUMENT_VERSION: u32 = 2;
/// The default name of the Meilisearch index (`_v<DOCUMENT_VERSION>` added).
pub const DEFAULT_MEILI_INDEX: &str = "souk_listings";

/// Which search backend a process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SearchBackend {
    /// The tantivy index in `SEARCH_INDEX_DIR`.
    Embedded,
    /// A Meilisearch server at `MEILI_URL`.
    Meilisearch,
    /// No search in this process (another projector feeds the index).
    Off,
}

/// The search configuration shared by the projector and the query API.
#[derive(Clone, clap::Args)]
pub struct SearchConfig {
    /// The search backend.
    #[arg(long = "search-backend", env = "SEARCH_BACKEND", value_enum, default_value_t = SearchBackend::Embedded)]
    pub backend: SearchBackend,

    /// Directory of the embedded index (the projector writes it, the query
    /// API reads it; both must name the same directory).
    #[arg(
        long = "search-index-dir",
        env = "SEARCH_INDEX_DIR",
        default_value = "./data/search"
    )]
    pub index_dir: PathBuf,

    /// Meilisearch's address, for `SEARCH_BACKEND=meilisearch`.
    #[arg(long = "meili-url", env = "MEILI_URL")]
    pub meili_url: Option<String>,

    /// Meilisearch's API key (never logged).
    #[arg(long = "meili-api-key", env = "MEILI_API_KEY", hide_env_values = true)]
    pub meili_api_key: Option<String>,

    /// The Meilisearch index's name, `_v<document version>` added (several
    /// Souk deployments may share one server under different names).
    #[arg(long = "meili-index", env = "MEILI_INDEX", default_value = DEFAULT_MEILI_INDEX)]
    pub meili_index: String,
}

impl fmt::Debug for SearchConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SearchConfig")
            .field("backend", &self.backend)
            .field("index_dir", &self.index_dir)
            .field("meili_url", &self.meili_url)
            .field("meili_index", &self.meili_index)
            .field(
                "meili_api_key",
                &self.meili_api_key.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

impl SearchConfig {
    /// The brief's defaults: the embedded index in `./data/search`.
    pub fn embedded(index_dir: impl Into<PathBuf>) -> Self {
        Self {
            backend: SearchBackend::Embedded,
            index_dir: index_dir.into(),
            meili_url: None,
            meili_api_key: None,
            meili_index: DEFAULT_MEILI_INDEX.to_owned(),
        }
    }

    /// The Meilisearch backend: the server at `url`, the index `name`.
    pub fn meilisearch(url: &str, api_key: Option<&str>, name: &str) -> Self {
        Self {
            backend: SearchBackend::Meilisearch,
            meili_url: Some(url.to_owned()),
            meili_api_key: api_key.map(str::to_owned),
            meili_index: name.to_owned(),
            ..Self::embedded("./data/search")
        }
    }

    /// No search in this process.
    pub fn off() -> Self {
        Self {
            backend: SearchBackend::Off,
            ..Self::embedded("./data/search")
        }
    }

    /// The index a query API reads, or `None` when search is off. The
    /// embedded index is opened lazily: the projector may create it later.
    pub fn open_reader(&self) -> Result<Option<Arc<dyn SearchIndex>>, SearchError> {
        Ok(match self.backend {
            SearchBackend::Off => None,
            SearchBackend::Embedded => Some(Arc::new(Embedded::reader(&self.index_dir))),
            SearchBackend::Meilisearch => Some(Arc::new(self.meili()?)),
        })
    }

    /// The index the indexer writes, or `None` when search is off. Fails
    /// when the embedded index is locked by another writer.
    pub async fn open_writer(&self) -> Result<Option<Arc<dyn SearchIndex>>, SearchError> {
        Ok(match self.backend {
            SearchBackend::Off => None,
            SearchBackend::Embedded => {
                let dir = self.index_dir.clone();
                let index = tokio::task::spawn_blocking(move || Embedded::writer(&dir))
                    .await
                    .map_err(|error| SearchError::Backend(error.to_string()))??;
                Some(Arc::new(index))
            }
            SearchBackend::Meilisearch => {
                let index = self.meili()?;
                index.configure().await?;
                Some(Arc::new(index))
            }
        })
    }

    /// Refuses a configuration that cannot work (checked at start).
    pub fn validate(&self) -> Result<(), SearchError> {
        if self.backend == SearchBackend::Meilisearch {
            self.meili()?;
        }
        Ok(())
    }

    fn meili(&self) -> Result<Meili, SearchError> {
        let url = self.meili_url.as_deref().ok_or_else(|| {
            SearchError::Config("SEARCH_BACKEND=meilisearch needs MEILI_URL".to_owned())
        })?;
        Meili::new(url, self.meili_api_key.as_deref(), &self.meili_index)
    }
}

/// Why a search or an index write failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The backend cannot be reached or is busy; trying later may work.
    #[error("the search index is unavailable: {0}")]
    Unavailable(String),
    /// The configuration cannot work.
    #[error("search configuration: {0}")]
    Config(String),
    /// Anything else the backend reported.
    #[error("search backend: {0}")]
    Backend(String),
}

/// One listing as the index holds it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct ListingDoc {
    pub id: Uuid,
    pub title: String,
    pub description: String,
    pub category: String,
    pub condition: String,
    pub seller_id: Uuid,
    pub status: String,
    pub currency: String,
    /// In minor units.
    pub price: i64,
    /// Microseconds since the Unix epoch.
    pub created_at: i64,
}

/// The filters of `/search`, those of `/listings`, already validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchFilters {
    /// Compared without case (Meilisearch's filters ignore case): both
    /// backends index and count categories lowercased.
    pub category: Option<String>,
    pub condition: Option<String>,
    pub seller_id: Option<Uuid>,
    pub currency: Option<String>,
    pub min_price: Option<i64>,
    pub max_price: Option<i64>,
    /// `None`: every status but `deleted`.
    pub status: Option<String>,
}

/// The order of the results. A sort other than relevance breaks ties by
/// listing id (ascending for prices, descending for `newest`), so that both
/// backends answer the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// Best match first.
    #[default]
    Relevance,
    PriceAsc,
    PriceDesc,
    /// Newest listing first.
    Newest,
}

impl Sort {
    pub const NAMES: &'static [&'static str] = &["relevance", "price_asc", "price_desc", "newest"];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "relevance" => Some(Self::Relevance),
            "price_asc" => Some(Self::PriceAsc),
            "price_desc" => Some(Self::PriceDesc),
            "newest" => Some(Self::Newest),
            _ => None,
        }
    }
}

/// A search: the text, filters, order and the page wanted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchQuery {
    /// Free text; empty matches every listing the filters let through.
    pub text: String,
    pub filters: SearchFilters,
    pub sort: Sort,
    pub offset: usize,
    pub limit: usize,
}

/// One page of results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchPage {
    /// The listings of the page, in order.
    pub ids: Vec<Uuid>,
    /// How many listings match (Meilisearch: its estimate).
    pub total: u64,
    /// Per facet, the number of matching listings by value.
    pub facets: BTreeMap<String, BTreeMap<String, u64>>,
}

impl SearchPage {
    /// No match: no ids, a total of 0 and every facet empty.
    pub fn empty() -> Self {
        Self {
            facets: FACETS
                .iter()
                .map(|facet| ((*facet).to_owned(), BTreeMap::new()))
                .collect(),
            ..Self::default()
        }
    }
}

/// What waits until a submitted write is durable (see
/// [`SearchIndex::submit`]).
pub type Durable<'a> = BoxFuture<'a, Result<(), SearchError>>;

/// A search index of listings. Writes are idempotent and durable when they
/// return: the indexer deletes its pending rows only after that.
pub trait SearchIndex: Send + Sync + fmt::Debug {
    /// Runs `query`.
    fn search(&self, query: SearchQuery) -> BoxFuture<'_, Result<SearchPage, SearchError>>;

    /// Replaces the documents of `upserts` and removes those of `deletes`.
    fn write(
        &self,
        upserts: Vec<ListingDoc>,
        deletes: Vec<Uuid>,
    ) -> BoxFuture<'_, Result<(), SearchError>>;

    /// Hands a write to the index and returns what waits until it is
    /// durable, so that the indexer reads and sends its next batch
    /// meanwhile. Writes take effect in the order they were submitted. By
    /// default the whole write is done here (the embedded index commits in
    /// `write`).
    fn submit(
        &self,
        upserts: Vec<ListingDoc>,
        deletes: Vec<Uuid>,
    ) -> BoxFuture<'_, Result<Durable<'_>, SearchError>> {
        Box::pin(async move {
            self.write(upserts, deletes).await?;
            Ok(Box::pin(async { Ok(()) }) as Durable<'_>)
        })
    }

    /// How many documents the index holds.
    fn count(&self) -> BoxFuture<'_, Result<u64, SearchError>>;

    /// Removes every document.
    fn clear(&self) -> BoxFuture<'_, Result<(), SearchError>>;

    /// Makes the next search see every write that was durable before this
    /// call (the embedded index reloads; Meilisearch always does).
    fn refresh(&self) -> BoxFuture<'_, Result<(), SearchError>> {
        Box::pin(async { Ok(()) })
    }

    /// Makes sure the index exists with Souk's settings: Meilisearch
    /// recreates and configures an index removed behind the indexer's back
    /// (the indexer then refills it). The embedded writer holds its index.
    fn ensure(&self) -> BoxFuture<'_, Result<(), SearchError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The words of a query as the index sees them: lowercased, accents folded,
/// split on anything that is not a letter or a digit. The query API refuses
/// more than [`MAX_QUERY_WORDS`]; the backends use the first ones only.
pub fn words(text: &str) -> Vec<String> {
    embedded::analyze(text)
}

/// The typos a word tolerates, as Meilisearch's defaults: none under 5
/// characters, one from 5, two from 9 (a typo on the first letter counts
/// as two).
pub fn typo_budget(word: &str) -> u8 {
    match word.chars().count() {
        0..=4 => 0,
        5..=8 => 1,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_words_tolerate_more_typos() {
        assert_eq!(typo_budget("ipad"), 0);
        assert_eq!(typo_budget("iphne"), 1);
        assert_eq!(typo_budget("headphones"), 2);
    }

    #[test]
    fn query_words_are_folded_and_bounded() {
        assert_eq!(words("Café, iPhone-15!"), vec!["cafe", "iphone", "15"]);
        assert_eq!(words(&"a ".repeat(50)).len(), 50);
    }

    #[test]
    fn the_api_key_is_never_printed() {
        let config = SearchConfig {
            meili_api_key: Some("secret".to_owned()),
            ..SearchConfig::embedded("x")
        };
        assert!(!format!("{config:?}").contains("secret"));
    }
}
