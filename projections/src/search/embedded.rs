//! The embedded backend: a tantivy index on disk, in
//! `<SEARCH_INDEX_DIR>/listings-v<DOCUMENT_VERSION>`.
//!
//! One process writes it (the projector's indexer; tantivy's lock file keeps
//! a second writer out, which then stands by) and any number of processes on
//! the same machine read it (the query API). A reader reloads when the
//! writer's commit changes `meta.json` (tantivy watches it), and on
//! [`SearchIndex::refresh`], which a read-your-writes request calls: the
//! indexer commits before it deletes its pending rows, so once they are gone
//! a reload sees the documents. Tantivy's meta lock keeps the writer from
//! removing the files of a segment while a reader opens it.
//!
//! Typo tolerance, Meilisearch's rules: each word of the query matches the
//! terms within its typo budget ([`super::typo_budget`], a transposition
//! counts as one typo, a typo on the first letter as two), the last word
//! also as a prefix, in the title (boosted) and the description. Every word
//! must match. An exact match of a word scores above a fuzzy one. A sort
//! breaks ties by listing id, as the Meilisearch backend does.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tantivy::collector::sort_key::{SortByStaticFastValue, SortByString};
use tantivy::collector::{Collector, Count, SegmentCollector, TopDocs};
use tantivy::columnar::StrColumn;
use tantivy::directory::MmapDirectory;
use tantivy::query::{
    AllQuery, AutomatonWeight, BooleanQuery, BoostQuery, DfaWrapper, EnableScoring, FuzzyTermQuery,
    Occur, Query, RangeQuery, TermQuery, Weight,
};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value as _,
};
use tantivy::tokenizer::{
    AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer,
};
use tantivy::{
    DocAddress, DocId, Index, IndexReader, IndexWriter, Order, ReloadPolicy, Score, Searcher,
    SegmentOrdinal, SegmentReader, TantivyDocument, Term,
};
use tantivy_fst::Automaton;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{
    DOCUMENT_VERSION, FACETS, ListingDoc, MAX_FACET_VALUES, MAX_QUERY_WORDS, SearchError,
    SearchIndex, SearchPage, SearchQuery, Sort, typo_budget,
};

/// The tokenizer of the text fields and of queries.
const TOKENIZER: &str = "souk";
/// The indexer's memory budget (tantivy's minimum is 15 MB per thread).
const WRITER_MEMORY_BYTES: usize = 20_000_000;

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .build()
}

/// `text` split into the terms the index holds.
pub(super) fn analyze(text: &str) -> Vec<String> {
    let mut analyzer = analyzer();
    let mut stream = analyzer.token_stream(text);
    let mut words = Vec::new();
    while stream.advance() {
        words.push(stream.token().text.clone());
    }
    words
}

/// The fields of the schema.
#[derive(Debug, Clone, Copy)]
struct Fields {
    id: Field,
    title: Field,
    description: Field,
    category: Field,
    condition: Field,
    seller_id: Field,
    status: Field,
    currency: Field,
    price: Field,
    created_at: Field,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(TOKENIZER)
            .set_index_option(IndexRecordOption::WithFreqs),
    );
    let fields = Fields {
        id: builder.add_text_field("id", STRING | STORED | FAST),
        title: builder.add_text_field("title", text.clone()),
        description: builder.add_text_field("description", text),
        category: builder.add_text_field("category", STRING | FAST),
        condition: builder.add_text_field("condition", STRING | FAST),
        seller_id: builder.add_text_field("seller_id", STRING),
        status: builder.add_text_field("status", STRING),
        currency: builder.add_text_field("currency", STRING),
        price: builder.add_i64_field("price", INDEXED | FAST),
        created_at: builder.add_i64_field("created_at", INDEXED | FAST),
    };
    (builder.build(), fields)
}

fn backend(error: impl std::fmt::Display) -> SearchError {
    SearchError::Backend(error.to_string())
}

/// An open index: what a search needs.
struct Opened {
    reader: IndexReader,
    fields: Fields,
}

impl Opened {
    fn open(index: Index, fields: Fields, policy: ReloadPolicy) -> tantivy::Result<Self> {
        index.tokenizers().register(TOKENIZER, analyzer());
        let reader = index.reader_builder().reload_policy(policy).try_into()?;
        Ok(Self { reader, fields })
    }
}

struct Inner {
    dir: PathBuf,
    /// Opened on first use by a reader (the writer may create it later).
    opened: Mutex<Option<Arc<Opened>>>,
    writer: Option<Mutex<IndexWriter>>,
    /// One permit per core for searches on the blocking pool. A search is
    /// CPU work: more at once only interleave (tokio's pool would grow to
    /// 512 threads under a burst, each with its own allocator heap), so
    /// the others wait here, in order, as cheap tasks.
    searches: Arc<Semaphore>,
}

/// The embedded tantivy index (see the module doc).
#[derive(Clone)]
pub struct Embedded(Arc<Inner>);

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("dir", &self.0.dir)
            .field("writer", &self.0.writer.is_some())
            .finish()
    }
}

fn search_permits() -> Arc<Semaphore> {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    Arc::new(Semaphore::new(cores))
}

fn versioned(dir: &Path) -> PathBuf {
    dir.join(format!("listings-v{DOCUMENT_VERSION}"))
}

impl Embedded {
    /// A reader of the index under `dir`, opened when it first exists.
    pub fn reader(dir: &Path) -> Self {
        Self(Arc::new(Inner {
            dir: versioned(dir),
            opened: Mutex::new(None),
            writer: None,
            searches: search_permits(),
        }))
    }

    /// The writer of the index under `dir`, created if missing. Blocking.
    pub fn writer(dir: &Path) -> Result<Self, SearchError> {
        let dir = versioned(dir);
        std::fs::create_dir_all(&dir)
            .map_err(|error| SearchError::Config(format!("creating {}: {error}", dir.display())))?;
        let (schema, fields) = schema();
        let directory = MmapDirectory::open(&dir).map_err(backend)?;
        let index = Index::open_or_create(directory, schema).map_err(backend)?;
        let writer = index
            .writer_with_num_threads(1, WRITER_MEMORY_BYTES)
            .map_err(|error| match error {
                tantivy::TantivyError::LockFailure(..) => SearchError::Unavailable(format!(
                    "another process writes {}: {error}",
                    dir.display()
                )),
                error => backend(error),
            })?;
        let opened = Opened::open(index, fields, ReloadPolicy::Manual).map_err(backend)?;
        Ok(Self(Arc::new(Inner {
            dir,
            opened: Mutex::new(Some(Arc::new(opened))),
            writer: Some(Mutex::new(writer)),
            searches: search_permits(),
        })))
    }

    /// The open index, opening it if it exists; `None` while it does not.
    /// A reader forgets an index whose directory was removed (the writer
    /// creates a new one, which it opens then).
    fn opened(&self) -> Result<Option<Arc<Opened>>, SearchError> {
        let mut opened = self.0.opened.lock().map_err(backend)?;
        let exists = self.0.dir.join("meta.json").exists();
        if !exists && self.0.writer.is_none() {
            *opened = None;
        }
        if opened.is_none() && exists {
            let (_, fields) = schema();
            let index = Index::open_in_dir(&self.0.dir).map_err(backend)?;
            *opened = Some(Arc::new(
                Opened::open(index, fields, ReloadPolicy::OnCommitWithDelay).map_err(backend)?,
            ));
        }
        Ok(opened.clone())
    }

    /// Runs `work` on the blocking pool.
    fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(Embedded) -> Result<T, SearchError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, SearchError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || work(this))
                .await
                .map_err(backend)?
        })
    }

    /// Applies `change` with the writer, commits and reloads.
    fn with_writer(
        &self,
        change: impl FnOnce(&mut IndexWriter, Fields) -> Result<(), SearchError>,
    ) -> Result<(), SearchError> {
        let Some(writer) = &self.0.writer else {
            return Err(SearchError::Config(
                "this process opened the search index read-only".to_owned(),
            ));
        };
        let opened = self.opened()?.ok_or_else(|| backend("no index"))?;
        let mut writer = writer.lock().map_err(backend)?;
        change(&mut writer, opened.fields)?;
        writer.commit().map_err(backend)?;
        opened.reader.reload().map_err(backend)
    }

    fn write_now(
        writer: &mut IndexWriter,
        f: Fields,
        upserts: Vec<ListingDoc>,
        deletes: Vec<Uuid>,
    ) -> Result<(), SearchError> {
        for id in deletes {
            writer.delete_term(Term::from_field_text(f.id, &id.to_string()));
        }
        for doc in upserts {
            // A delete applies to the documents added before it, so the new
            // document replaces the old one in one commit.
            writer.delete_term(Term::from_field_text(f.id, &doc.id.to_string()));
            let mut document = TantivyDocument::default();
            document.add_text(f.id, doc.id.to_string());
            document.add_text(f.title, &doc.title);
            document.add_text(f.description, &doc.description);
            document.add_text(f.category, &doc.category);
            document.add_text(f.condition, &doc.condition);
            document.add_text(f.seller_id, doc.seller_id.to_string());
            document.add_text(f.status, &doc.status);
            document.add_text(f.currency, &doc.currency);
            document.add_i64(f.price, doc.price);
            document.add_i64(f.created_at, doc.created_at);
            writer.add_document(document).map_err(backend)?;
        }
        Ok(())
    }
}

impl SearchIndex for Embedded {
    fn search(&self, query: SearchQuery) -> BoxFuture<'_, Result<SearchPage, SearchError>> {
        Box::pin(async move {
            // Held by the blocking work itself, so a search whose request
            // was dropped still counts until it ends.
            let permit = self.0.searches.clone().acquire_owned().await;
            let permit = permit.map_err(backend)?;
            self.blocking(move |this| {
                let _permit = permit;
                match this.opened()? {
                    Some(opened) => search(&opened, &query),
                    None => Ok(SearchPage::empty()),
                }
            })
            .await
        })
    }

    fn write(
        &self,
        upserts: Vec<ListingDoc>,
        deletes: Vec<Uuid>,
    ) -> BoxFuture<'_, Result<(), SearchError>> {
        self.blocking(move |this| {
            this.with_writer(|writer, fields| Self::write_now(writer, fields, upserts, deletes))
        })
    }

    fn clear(&self) -> BoxFuture<'_, Result<(), SearchError>> {
        self.blocking(|this| {
            this.with_writer(|writer, _| writer.delete_all_documents().map(drop).map_err(backend))
        })
    }

    fn count(&self) -> BoxFuture<'_, Result<u64, SearchError>> {
        self.blocking(|this| {
            Ok(match this.opened()? {
                Some(opened) => opened.reader.searcher().num_docs(),
                None => 0,
            })
        })
    }

    fn refresh(&self) -> BoxFuture<'_, Result<(), SearchError>> {
        self.blocking(|this| match this.opened()? {
            Some(opened) => opened.reader.reload().map_err(backend),
            None => Ok(()),
        })
    }
}

fn fuzzy(term: Term, distance: u8, prefix: bool) -> FuzzyTermQuery {
    if prefix {
        FuzzyTermQuery::new_prefix(term, distance, true)
    } else {
        FuzzyTermQuery::new(term, distance, true)
    }
}

/// The terms within `distance` typos of a word (as a prefix for the last
/// word of a query) that begin with the word's first letter.
#[derive(Debug, Clone)]
struct FirstLetterKept {
    fuzzy: FuzzyTermQuery,
    field: Field,
    first: Vec<u8>,
}

impl FirstLetterKept {
    fn new(term: Term, distance: u8, prefix: bool) -> Self {
        let first = term
            .value()
            .as_str()
            .and_then(|word| word.chars().next())
            .map(|letter| letter.to_string().into_bytes())
            .unwrap_or_default();
        Self {
            field: term.field(),
            fuzzy: fuzzy(term, distance, prefix),
            first,
        }
    }
}

impl Query for FirstLetterKept {
    fn weight(&self, _: EnableScoring<'_>) -> tantivy::Result<Box<dyn Weight>> {
        let automaton = FirstLetterAutomaton {
            first: self.first.clone(),
            typos: self.fuzzy.automaton()?,
        };
        Ok(Box::new(AutomatonWeight::new(self.field, automaton)))
    }
}

/// A Levenshtein automaton restricted to terms that begin with `first`.
struct FirstLetterAutomaton {
    first: Vec<u8>,
    typos: DfaWrapper,
}

impl Automaton for FirstLetterAutomaton {
    /// How many bytes of `first` were read (`None`: another byte came), and
    /// the Levenshtein automaton's state.
    type State = (Option<usize>, u32);

    fn start(&self) -> Self::State {
        (Some(0), self.typos.start())
    }

    fn is_match(&self, (read, state): &Self::State) -> bool {
        *read == Some(self.first.len()) && self.typos.is_match(state)
    }

    fn can_match(&self, (read, state): &Self::State) -> bool {
        read.is_some() && self.typos.can_match(state)
    }

    fn accept(&self, (read, state): &Self::State, byte: u8) -> Self::State {
        let read = match *read {
            Some(read) if read < self.first.len() => (self.first[read] == byte).then_some(read + 1),
            read => read,
        };
        (read, self.typos.accept(state, byte))
    }
}

/// The query of `search`: its words (fuzzy) and its filters.
fn query_of(f: &Fields, search: &SearchQuery) -> Box<dyn Query> {
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    let words: Vec<String> = analyze(&search.text)
        .into_iter()
        .take(MAX_QUERY_WORDS)
        .collect();
    if words.is_empty() {
        clauses.push((Occur::Must, Box::new(AllQuery)));
    }
    let last = words.len().saturating_sub(1);
    for (index, word) in words.iter().enumerate() {
        let budget = typo_budget(word);
        let prefix = index == last;
        let mut either: Vec<Box<dyn Query>> = Vec::new();
        for (field, boost) in [(f.title, 2.0), (f.description, 1.0)] {
            let term = Term::from_field_text(field, word);
            either.push(Box::new(BoostQuery::new(
                Box::new(FirstLetterKept::new(term.clone(), budget, prefix)),
                boost,
            )));
            if budget == 2 {
                // A typo on the first letter counts as two: one more is left.
                either.push(Box::new(BoostQuery::new(
                    Box::new(fuzzy(term.clone(), 1, prefix)),
                    boost,
                )));
            }
            either.push(Box::new(BoostQuery::new(
                Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)),
                boost * 2.0,
            )));
        }
        clauses.push((Occur::Must, Box::new(BooleanQuery::union(either))));
    }
    let filters = &search.filters;
    let exact = |field: Field, value: &str| -> Box<dyn Query> {
        Box::new(TermQuery::new(
            Term::from_field_text(field, value),
            IndexRecordOption::Basic,
        ))
    };
    let seller = filters.seller_id.map(|id| id.to_string());
    let category = filters.category.as_deref().map(str::to_lowercase);
    for (field, value) in [
        (f.category, category.as_deref()),
        (f.condition, filters.condition.as_deref()),
        (f.seller_id, seller.as_deref()),
        (f.currency, filters.currency.as_deref()),
        (f.status, filters.status.as_deref()),
    ] {
        if let Some(value) = value {
            clauses.push((Occur::Must, exact(field, value)));
        }
    }
    if filters.status.is_none() {
        clauses.push((Occur::MustNot, exact(f.status, "deleted")));
    }
    if filters.min_price.is_some() || filters.max_price.is_some() {
        let bound = |value: Option<i64>| {
            value.map_or(Bound::Unbounded, |value| {
                Bound::Included(Term::from_field_i64(f.price, value))
            })
        };
        clauses.push((
            Occur::Must,
            Box::new(RangeQuery::new(
                bound(filters.min_price),
                bound(filters.max_price),
            )),
        ));
    }
    Box::new(BooleanQuery::new(clauses))
}

/// Counts the matches by value of each facet (a `STRING | FAST` field),
/// over the term ordinals of its fast field: an array increment per match
/// and facet, the values' text looked up once per segment. It answers what
/// tantivy's terms aggregation did (exactly, where that one estimated past
/// 1,000 values in a segment), without building and reading its JSON
/// request and result on every search.
struct FacetCounts;

/// One segment's counts: per facet, its column and the matches by ordinal.
struct SegmentFacetCounts {
    columns: Vec<Option<(StrColumn, Vec<u64>)>>,
}

/// Per facet (in [`FACETS`]' order), the matches by value.
type FacetFruit = Vec<BTreeMap<String, u64>>;

impl Collector for FacetCounts {
    type Fruit = FacetFruit;
    type Child = SegmentFacetCounts;

    fn for_segment(
        &self,
        _: SegmentOrdinal,
        segment: &SegmentReader,
    ) -> tantivy::Result<SegmentFacetCounts> {
        let mut columns = Vec::with_capacity(FACETS.len());
        for facet in FACETS {
            // A segment without a value of the facet has no column.
            columns.push(segment.fast_fields().str(facet)?.map(|column| {
                let terms = column.num_terms();
                (column, vec![0; terms])
            }));
        }
        Ok(SegmentFacetCounts { columns })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, segments: Vec<FacetFruit>) -> tantivy::Result<FacetFruit> {
        let mut merged = vec![BTreeMap::new(); FACETS.len()];
        for segment in segments {
            for (counts, into) in segment.into_iter().zip(&mut merged) {
                for (value, count) in counts {
                    *into.entry(value).or_insert(0) += count;
                }
            }
        }
        Ok(merged.into_iter().map(most_frequent).collect())
    }
}

impl SegmentCollector for SegmentFacetCounts {
    type Fruit = FacetFruit;

    fn collect(&mut self, doc: DocId, _: Score) {
        for (column, counts) in self.columns.iter_mut().flatten() {
            for ordinal in column.ords().values_for_doc(doc) {
                counts[ordinal as usize] += 1;
            }
        }
    }

    fn harvest(self) -> FacetFruit {
        self.columns
            .into_iter()
            .map(|facet| {
                let mut by_value = BTreeMap::new();
                let Some((column, counts)) = facet else {
                    return by_value;
                };
                for (ordinal, count) in counts.into_iter().enumerate() {
                    let mut value = String::new();
                    // Every ordinal below `num_terms` is in the dictionary.
                    if count > 0
                        && column
                            .ord_to_str(ordinal as u64, &mut value)
                            .unwrap_or(false)
                    {
                        by_value.insert(value, count);
                    }
                }
                by_value
            })
            .collect()
    }
}

/// The [`MAX_FACET_VALUES`] values of most matches, ties by value: what
/// tantivy's terms aggregation (size 100, ordered by count) answered.
fn most_frequent(counts: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    if counts.len() <= MAX_FACET_VALUES {
        return counts;
    }
    let mut values: Vec<(String, u64)> = counts.into_iter().collect();
    // Stable: equal counts stay in the order of their values.
    values.sort_by(|(_, left), (_, right)| right.cmp(left));
    values.truncate(MAX_FACET_VALUES);
    values.into_iter().collect()
}

/// The page of `top`, the number of matches and the facet counts, in one
/// pass over the matches.
fn collect<K, C>(
    searcher: &Searcher,
    query: &dyn Query,
    top: C,
) -> Result<(Vec<DocAddress>, usize, FacetFruit), SearchError>
where
    C: Collector<Fruit = Vec<(K, DocAddress)>>,
{
    let (docs, total, facets) = searcher
        .search(query, &(top, Count, FacetCounts))
        .map_err(backend)?;
    Ok((
        docs.into_iter().map(|(_, address)| address).collect(),
        total,
        facets,
    ))
}

/// The fast field and direction of `sort`, and the direction of the ties'
/// order by id (`super::Sort::keys`); `None` for relevance.
fn sort_field(sort: Sort) -> Option<(&'static str, Order, Order)> {
    match sort {
        Sort::Relevance => None,
        Sort::PriceAsc => Some(("price", Order::Asc, Order::Asc)),
        Sort::PriceDesc => Some(("price", Order::Desc, Order::Asc)),
        Sort::Newest => Some(("created_at", Order::Desc, Order::Desc)),
    }
}

fn search(opened: &Opened, search: &SearchQuery) -> Result<SearchPage, SearchError> {
    let searcher = opened.reader.searcher();
    let query = query_of(&opened.fields, search);
    let top = TopDocs::with_limit(search.limit.max(1)).and_offset(search.offset);
    let (addresses, total, facets) = match sort_field(search.sort) {
        None => collect(&searcher, &*query, top.order_by_score())?,
        Some((field, order, ties)) => collect(
            &searcher,
            &*query,
            top.order_by((
                (SortByStaticFastValue::<i64>::for_field(field), order),
                (SortByString::for_field("id"), ties),
            )),
        )?,
    };
    let mut ids = Vec::with_capacity(addresses.len());
    for address in addresses {
        let document: TantivyDocument = searcher.doc(address).map_err(backend)?;
        let id = document
            .get_first(opened.fields.id)
            .and_then(|value| value.as_str())
            .and_then(|text| Uuid::parse_str(text).ok())
            .ok_or_else(|| backend("a document without an id"))?;
        ids.push(id);
    }
    Ok(SearchPage {
        ids,
        total: total as u64,
        facets: FACETS
            .iter()
            .map(|facet| (*facet).to_owned())
            .zip(facets)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::SearchFilters;

    fn doc(title: &str, category: &str, price: i64, created_at: i64) -> ListingDoc {
        ListingDoc {
            id: Uuid::now_v7(),
            title: title.to_owned(),
            description: "in good shape".to_owned(),
            category: category.to_owned(),
            condition: "good".to_owned(),
            seller_id: Uuid::nil(),
            status: "active".to_owned(),
            currency: "EUR".to_owned(),
            price,
            created_at,
        }
    }

    fn query(text: &str) -> SearchQuery {
        SearchQuery {
            text: text.to_owned(),
            limit: 10,
            ..SearchQuery::default()
        }
    }

    #[tokio::test]
    async fn a_typo_finds_the_word_and_a_reader_in_another_handle_sees_commits() {
        let dir = std::env::temp_dir().join(format!("souk-search-{}", Uuid::now_v7()));
        let writer = Embedded::writer(&dir).unwrap();
        let reader = Embedded::reader(&dir);
        let phone = doc("Apple iPhone 13", "phones", 50_000, 2);
        let lamp = doc("Brass lamp", "home", 3_000, 1);
        writer
            .write(vec![phone.clone(), lamp.clone()], vec![])
            .await
            .unwrap();
        reader.refresh().await.unwrap();
        assert_eq!(
            reader.search(query("iphne")).await.unwrap().ids,
            vec![phone.id]
        );
        assert_eq!(
            reader.search(query("lamp")).await.unwrap().ids,
            vec![lamp.id]
        );
        let all = reader.search(query("")).await.unwrap();
        assert_eq!(all.total, 2);
        assert_eq!(all.facets["category"]["phones"], 1);

        let mut cheap = SearchQuery {
            sort: Sort::PriceAsc,
            ..query("")
        };
        assert_eq!(
            reader.search(cheap.clone()).await.unwrap().ids,
            vec![lamp.id, phone.id]
        );
        cheap.filters = SearchFilters {
            max_price: Some(10_000),
            ..SearchFilters::default()
        };
        assert_eq!(reader.search(cheap).await.unwrap().ids, vec![lamp.id]);

        // Writing the same documents again changes nothing; a delete does.
        writer
            .write(vec![phone.clone()], vec![lamp.id])
            .await
            .unwrap();
        writer
            .write(vec![phone.clone()], vec![lamp.id])
            .await
            .unwrap();
        reader.refresh().await.unwrap();
        assert_eq!(reader.count().await.unwrap(), 1);
        drop((writer, reader));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_typo_on_the_first_letter_counts_as_two_as_in_meilisearch() {
        let dir = std::env::temp_dir().join(format!("souk-search-{}", Uuid::now_v7().simple()));
        let writer = Embedded::writer(&dir).unwrap();
        let headphones = doc("Wireless headphones", "audio", 5_000, 1);
        let vintage = doc("Vintage phone", "phones", 3_000, 2);
        writer
            .write(vec![headphones.clone(), vintage.clone()], vec![])
            .await
            .unwrap();
        let found = async |text: &str| writer.search(query(text)).await.unwrap().ids;
        // Five to eight letters: one typo, not on the first letter.
        assert_eq!(found("vintge").await, vec![vintage.id]);
        assert!(found("ivntage").await.is_empty());
        assert!(found("ohone").await.is_empty());
        // Nine and more: two typos, or one on the first letter.
        assert_eq!(found("heedphonez").await, vec![headphones.id]);
        assert_eq!(found("xeadphones").await, vec![headphones.id]);
        assert!(found("xeadphonez").await.is_empty());
        drop(writer);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn past_the_limit_a_facet_keeps_its_most_frequent_values_ties_by_value() {
        // 150 values: "v000" to "v149", value i matched (i / 2) times.
        let counts: BTreeMap<String, u64> =
            (0..150u64).map(|i| (format!("v{i:03}"), i / 2)).collect();
        let kept = most_frequent(counts.clone());
        assert_eq!(kept.len(), MAX_FACET_VALUES);
        // The counts 74 down to 25 are kept whole (100 values).
        assert!(kept.contains_key("v149") && kept.contains_key("v050"));
        assert!(!kept.contains_key("v049"));
        // Within the limit, every value is kept as counted.
        let few: BTreeMap<String, u64> = counts.into_iter().take(10).collect();
        assert_eq!(most_frequent(few.clone()), few);
        // A tie at the cut keeps the smaller values.
        let tied: BTreeMap<String, u64> = (0..101u64).map(|i| (format!("v{i:03}"), 1)).collect();
        let kept = most_frequent(tied);
        assert!(kept.contains_key("v000") && !kept.contains_key("v100"));
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_index() {
        let dir = std::env::temp_dir().join(format!("souk-search-{}", Uuid::now_v7()));
        let first = Embedded::writer(&dir).unwrap();
        assert!(matches!(
            Embedded::writer(&dir),
            Err(SearchError::Unavailable(_))
        ));
        drop(first);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
