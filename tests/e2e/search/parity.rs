//! The two search backends answer alike: the same generated listings in
//! the embedded index and in a real Meilisearch index, the same queries
//! (typos, several words, prefixes, filters, every sort, facets, deep
//! pages), and the same matching set, the same order wherever a sort is
//! asked, the same totals and facet counts. Relevance orders the same set
//! differently (README says how): it is compared as a set.

use std::collections::BTreeSet;

use projections::search::{
    Embedded, ListingDoc, MAX_OFFSET, Meili, SearchFilters, SearchIndex, SearchPage, SearchQuery,
    Sort,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tests::TempDir;
use tests::meili::MeiliServer;
use uuid::Uuid;

/// How many listings both indexes hold.
pub(crate) const LISTINGS: usize = 3_000;
/// The page size of the comparison (the query API's largest).
const PAGE: usize = 100;

const NOUNS: &[&str] = &[
    "leather",
    "jacket",
    "bag",
    "lamp",
    "chair",
    "table",
    "headphones",
    "camera",
    "bicycle",
    "guitar",
    "watch",
    "teapot",
    "mirror",
    "sofa",
    "record",
    "keyboard",
    "blanket",
    "vase",
];
const ADJECTIVES: &[&str] = &[
    "vintage", "brown", "black", "wooden", "modern", "antique", "wireless", "handmade", "classic",
    "brass", "velvet", "compact", "sturdy", "elegant",
];
const FILLER: &[&str] = &[
    "works",
    "well",
    "good",
    "shape",
    "barely",
    "used",
    "from",
    "smoke",
    "free",
    "home",
    "small",
    "scratches",
    "original",
    "box",
    "included",
];
const CATEGORIES: &[&str] = &["fashion", "home", "music", "electronics", "sports", "books"];
const CONDITIONS: &[&str] = &["new", "like_new", "good", "fair", "poor"];
const STATUSES: &[&str] = &[
    "active", "active", "active", "active", "active", "paused", "sold_out", "deleted",
];

fn words(rng: &mut StdRng, count: usize) -> String {
    (0..count)
        .map(|_| {
            let list = match rng.gen_range(0..3) {
                0 => NOUNS,
                1 => ADJECTIVES,
                _ => FILLER,
            };
            *list.choose(rng).expect("a word")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `count` listings from a fixed seed; prices and times repeat, so that
/// sorts have ties to break.
pub(crate) fn generate(count: usize, sellers: &[Uuid]) -> Vec<ListingDoc> {
    let mut rng = StdRng::seed_from_u64(14);
    (0..count)
        .map(|_| {
            let (extra, described) = (rng.gen_range(0..3), rng.gen_range(4..12));
            let title = format!(
                "{} {} {}",
                ADJECTIVES.choose(&mut rng).expect("a word"),
                NOUNS.choose(&mut rng).expect("a word"),
                words(&mut rng, extra),
            );
            ListingDoc {
                id: Uuid::new_v4(),
                title: title.trim().to_owned(),
                description: words(&mut rng, described),
                category: (*CATEGORIES.choose(&mut rng).expect("a category")).to_owned(),
                condition: (*CONDITIONS.choose(&mut rng).expect("a condition")).to_owned(),
                seller_id: *sellers.choose(&mut rng).expect("a seller"),
                status: (*STATUSES.choose(&mut rng).expect("a status")).to_owned(),
                currency: if rng.gen_bool(0.9) { "EUR" } else { "USD" }.to_owned(),
                price: rng.gen_range(1..120) * 500,
                created_at: 1_700_000_000_000_000 + rng.gen_range(0..2_000) * 1_000_000,
            }
        })
        .collect()
}

/// The queries compared: text and filters; each runs with every sort.
pub(crate) fn queries(sellers: &[Uuid]) -> Vec<(&'static str, SearchFilters)> {
    let none = SearchFilters::default;
    vec![
        ("", none()),
        ("vintge lether", none()),
        ("vintage leather", none()),
        ("lether", none()),
        ("headphnoes", none()),
        ("hedphones wireles", none()),
        ("xeadphones", none()),
        ("ehadphones", none()),
        ("ntique", none()),
        ("bicyle", none()),
        ("lam", none()),
        ("w", none()),
        ("brass teapot", none()),
        ("-lamp \"brass\"", none()),
        (
            "black",
            SearchFilters {
                category: Some("Fashion".to_owned()),
                ..none()
            },
        ),
        (
            "",
            SearchFilters {
                condition: Some("good".to_owned()),
                min_price: Some(10_000),
                max_price: Some(30_000),
                ..none()
            },
        ),
        (
            "chair",
            SearchFilters {
                seller_id: Some(sellers[0]),
                currency: Some("EUR".to_owned()),
                ..none()
            },
        ),
        (
            "",
            SearchFilters {
                status: Some("deleted".to_owned()),
                ..none()
            },
        ),
        (
            "modern",
            SearchFilters {
                max_price: Some(20_000),
                ..none()
            },
        ),
    ]
}

/// Every page of `query` (up to the deepest reachable one); the first
/// page's total and facets.
pub(crate) async fn all_pages(
    index: &dyn SearchIndex,
    mut query: SearchQuery,
) -> (Vec<Uuid>, SearchPage) {
    query.limit = PAGE;
    query.offset = 0;
    let first = index.search(query.clone()).await.expect("searching");
    let mut ids = first.ids.clone();
    let reachable = (first.total as usize).min(MAX_OFFSET + PAGE);
    while query.offset + PAGE < reachable {
        query.offset += PAGE;
        let page = index.search(query.clone()).await.expect("searching");
        assert_eq!(page.total, first.total, "the total changed between pages");
        assert_eq!(
            page.facets, first.facets,
            "the facets changed between pages"
        );
        ids.extend(page.ids);
    }
    (ids, first)
}

#[tokio::test]
async fn both_backends_find_count_and_sort_the_same_listings() {
    let Some(server) = MeiliServer::shared().await else {
        return;
    };
    let sellers: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let docs = generate(LISTINGS, &sellers);

    let dir = TempDir::new("parity");
    let embedded = Embedded::writer(dir.path()).expect("the embedded index");
    embedded
        .write(docs.clone(), vec![])
        .await
        .expect("indexing");
    let meili = Meili::new(server.url(), Some(server.key()), &MeiliServer::index_name())
        .expect("a Meilisearch client");
    meili.configure().await.expect("configuring Meilisearch");
    meili.write(docs.clone(), vec![]).await.expect("indexing");
    assert_eq!(embedded.count().await.unwrap(), LISTINGS as u64);
    assert_eq!(meili.count().await.unwrap(), LISTINGS as u64);

    let mut compared = 0;
    for (text, filters) in queries(&sellers) {
        for sort in [
            Sort::Relevance,
            Sort::PriceAsc,
            Sort::PriceDesc,
            Sort::Newest,
        ] {
            let query = SearchQuery {
                text: text.to_owned(),
                filters: filters.clone(),
                sort,
                ..SearchQuery::default()
            };
            let what = format!("q={text:?} {filters:?} {sort:?}");
            let (ours, our_page) = all_pages(&embedded, query.clone()).await;
            let (theirs, their_page) = all_pages(&meili, query).await;
            assert_eq!(our_page.total, their_page.total, "total of {what}");
            assert_eq!(our_page.facets, their_page.facets, "facets of {what}");
            if sort == Sort::Relevance {
                if (our_page.total as usize) <= MAX_OFFSET + PAGE {
                    let ours: BTreeSet<Uuid> = ours.into_iter().collect();
                    let theirs: BTreeSet<Uuid> = theirs.into_iter().collect();
                    assert_eq!(ours, theirs, "the matches of {what}");
                }
            } else {
                assert_eq!(ours, theirs, "the order of {what}");
            }
            compared += 1;
        }
    }
    assert_eq!(compared, queries(&sellers).len() * 4);
    // The typo queries found something: the comparison is not of nothing.
    let typo = SearchQuery {
        text: "vintge lether".to_owned(),
        limit: 1,
        ..SearchQuery::default()
    };
    assert!(embedded.search(typo).await.unwrap().total > 0);
}
