//! `/search` on the full path: listings created and changed through the
//! command API, relayed to a JetStream stream of the test's own, projected
//! and indexed by the projector, and searched through the query API with
//! `?after=`. Every test runs on both backends: the embedded index (in a
//! directory of the test's own) and a real Meilisearch server (an index of
//! the test's own on the test process's server, `tests::meili`).

mod parity;

use std::collections::HashSet;
use std::sync::Arc;

use event_store::Position;
use projections::search::{DOCUMENT_VERSION, SearchConfig};
use serde_json::{Value, json};
use tests::meili::MeiliServer;
use tests::{TempDir, User};
use uuid::Uuid;

use crate::query_api::{FullPath, position_of};

/// The catch-up bound of these tests: generous, the machine may be busy.
const CATCH_UP_MS: u64 = 30_000;

/// The search backend of a test, with the index of its own.
enum Backend {
    Embedded(TempDir),
    Meili {
        server: Arc<MeiliServer>,
        name: String,
    },
}

impl Backend {
    fn embedded() -> Self {
        Self::Embedded(TempDir::new("search"))
    }

    /// `None`: no meilisearch binary here, the test is skipped (not in CI).
    async fn meili() -> Option<Self> {
        Some(Self::Meili {
            server: MeiliServer::shared().await?,
            name: MeiliServer::index_name(),
        })
    }

    fn config(&self) -> SearchConfig {
        match self {
            Self::Embedded(dir) => SearchConfig::embedded(dir.path()),
            Self::Meili { server, name } => {
                SearchConfig::meilisearch(server.url(), Some(server.key()), name)
            }
        }
    }

    /// Loses the whole index (the embedded one only while no projector
    /// runs).
    async fn wipe(&self) {
        match self {
            Self::Embedded(dir) => std::fs::remove_dir_all(dir.path()).expect("removing the index"),
            Self::Meili { server, name } => server
                .delete_index(&format!("{name}_v{DOCUMENT_VERSION}"))
                .await
                .expect("deleting the index"),
        }
    }
}

/// Runs each named test (an `async fn(Backend)`) on both backends, as
/// `<test>::embedded` and `<test>::meilisearch`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test]
            async fn embedded() {
                super::$test(super::Backend::embedded()).await;
            }

            #[tokio::test]
            async fn meilisearch() {
                if let Some(backend) = super::Backend::meili().await {
                    super::$test(backend).await;
                }
            }
        }
    )*};
}

on_both_backends!(
    a_typo_still_finds_the_listing_and_filters_sorts_and_facets_apply,
    search_pages_walk_every_match_exactly_once,
    a_price_change_and_a_delete_show_in_search_after_their_position,
    a_stream_of_changes_leaves_each_listing_indexed_at_its_last_price,
    a_restarted_projector_and_a_lost_index_give_the_same_results,
    a_crashed_projector_leaves_the_index_exact,
    a_listings_rebuild_queues_every_listing_for_the_index_again,
    bad_search_parameters_are_refused_with_a_code_that_names_the_problem,
);

async fn start(backend: &Backend) -> FullPath {
    FullPath::start_with(CATCH_UP_MS, backend.config()).await
}

/// Creates a listing; returns its id and the position of the write.
async fn create(
    full: &FullPath,
    seller: &User,
    title: &str,
    category: &str,
    condition: &str,
    price: i64,
) -> (Uuid, String) {
    let created = full
        .app
        .post(
            "/listings",
            Some(seller),
            &json!({
                "title": title,
                "description": format!("{title}, works well."),
                "category": category,
                "condition": condition,
                "price": {"amount": price, "currency": "EUR"},
                "quantity": 1,
                "location": {"city": "Lyon", "country": "FR"},
            }),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    (created.id(), position_of(&created))
}

fn titles(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {page}"))
        .iter()
        .map(|item| item["title"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn sorted(mut titles: Vec<String>) -> Vec<String> {
    titles.sort();
    titles
}

/// Four listings of two sellers; returns the second seller and the
/// position of the last write.
async fn catalogue(full: &FullPath) -> (User, String) {
    let alice = User::new("seller");
    let bob = User::new("seller");
    create(
        full,
        &alice,
        "Apple iPhone 13",
        "phones",
        "like_new",
        50_000,
    )
    .await;
    create(full, &alice, "Samsung Galaxy S21", "phones", "good", 30_000).await;
    create(full, &bob, "Brass lamp", "home", "good", 3_000).await;
    let (_, last) = create(
        full,
        &bob,
        "iPhone leather case",
        "accessories",
        "new",
        1_500,
    )
    .await;
    (bob, last)
}

async fn a_typo_still_finds_the_listing_and_filters_sorts_and_facets_apply(backend: Backend) {
    let full = start(&backend).await;
    let buyer = User::new("buyer");
    let (bob, after) = catalogue(&full).await;
    let (api, buyer, after) = (&full.api, &buyer, &after);
    let search = |query: String| async move {
        api.ok(&format!("/search?{query}&after={after}"), buyer)
            .await
    };

    let typo = search("q=iphne".into()).await;
    assert_eq!(
        sorted(titles(&typo)),
        ["Apple iPhone 13", "iPhone leather case"]
    );
    assert_eq!(typo["total"], 2);
    assert_eq!(
        typo["facets"],
        json!({"category": {"phones": 1, "accessories": 1}, "condition": {"like_new": 1, "new": 1}})
    );
    assert_eq!(typo["items"][0]["price"]["currency"], "EUR");
    assert_eq!(
        titles(&search("q=samsnug%20galaxy".into()).await),
        ["Samsung Galaxy S21"],
        "a transposition is one typo"
    );
    assert_eq!(
        titles(&search("q=lam".into()).await),
        ["Brass lamp"],
        "prefix"
    );
    assert!(titles(&search("q=ipad".into()).await).is_empty());

    assert_eq!(
        titles(&search("q=iphne&category=phones".into()).await),
        ["Apple iPhone 13"]
    );
    assert_eq!(
        sorted(titles(&search(format!("seller_id={}", bob.id)).await)),
        ["Brass lamp", "iPhone leather case"]
    );
    assert_eq!(
        titles(&search("condition=good&sort=price_asc".into()).await),
        ["Brass lamp", "Samsung Galaxy S21"]
    );
    assert_eq!(
        titles(&search("min_price=2000&max_price=30000&sort=price_desc".into()).await),
        ["Samsung Galaxy S21", "Brass lamp"]
    );
    assert_eq!(
        titles(&search("sort=price_asc".into()).await),
        [
            "iPhone leather case",
            "Brass lamp",
            "Samsung Galaxy S21",
            "Apple iPhone 13"
        ]
    );
    let newest = search(String::new()).await;
    assert_eq!(
        titles(&newest),
        [
            "iPhone leather case",
            "Brass lamp",
            "Samsung Galaxy S21",
            "Apple iPhone 13"
        ],
        "without q, newest first"
    );
    assert_eq!(newest["total"], 4);
    assert_eq!(
        newest["facets"],
        json!({
            "category": {"phones": 2, "home": 1, "accessories": 1},
            "condition": {"like_new": 1, "good": 2, "new": 1},
        })
    );
    assert_eq!(newest["next_cursor"], Value::Null);
    full.stop().await;
}

async fn search_pages_walk_every_match_exactly_once(backend: Backend) {
    let full = start(&backend).await;
    let seller = User::new("seller");
    let mut after = String::new();
    for n in 0..7 {
        after = create(
            &full,
            &seller,
            &format!("Vinyl record {n}"),
            "music",
            "good",
            1_000 + n,
        )
        .await
        .1;
    }
    let buyer = User::new("buyer");
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/search?q=vinyl&sort=price_asc&limit=3&after={after}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = full.api.ok(&path, &buyer).await;
        assert_eq!(page["total"], 7);
        seen.extend(titles(&page));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 10, "the pages never end");
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..7).map(|n| format!("Vinyl record {n}")).collect();
    assert_eq!(seen, expected, "every match once, in price order");
    full.stop().await;
}

async fn a_price_change_and_a_delete_show_in_search_after_their_position(backend: Backend) {
    let full = start(&backend).await;
    let seller = User::new("seller");
    let buyer = User::new("buyer");
    let (listing, _) = create(&full, &seller, "Road bike", "sports", "good", 40_000).await;

    let changed = full
        .app
        .post(
            &format!("/listings/{listing}/price"),
            Some(&seller),
            &json!({"price": {"amount": 25_000, "currency": "EUR"}}),
        )
        .await;
    assert_eq!(changed.status, 200, "{:?}", changed.body);
    let after = position_of(&changed);
    let cheap = full
        .api
        .ok(
            &format!("/search?q=bike&max_price=30000&after={after}"),
            &buyer,
        )
        .await;
    assert_eq!(titles(&cheap), ["Road bike"]);
    assert_eq!(cheap["items"][0]["price"]["amount"], 25_000);

    let deleted = full
        .app
        .post(
            &format!("/listings/{listing}/delete"),
            Some(&seller),
            &json!({}),
        )
        .await;
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    let after = position_of(&deleted);
    let gone = full
        .api
        .ok(&format!("/search?q=bike&after={after}"), &buyer)
        .await;
    assert_eq!(gone["total"], 0);
    assert!(titles(&gone).is_empty());
    let admin = User::new("admin");
    let shown = full
        .api
        .ok(
            &format!("/search?q=bike&status=deleted&after={after}"),
            &admin,
        )
        .await;
    assert_eq!(titles(&shown), ["Road bike"], "admins see deleted listings");
    let refused = full
        .api
        .get("/search?q=bike&status=deleted", Some(&buyer))
        .await;
    assert_eq!(refused.status, 403);
    full.stop().await;
}

/// The indexer queues new changes while earlier batches are in flight and
/// leaves out the listings in flight: a listing changed again meanwhile must
/// still end at its last price.
async fn a_stream_of_changes_leaves_each_listing_indexed_at_its_last_price(backend: Backend) {
    let full = start(&backend).await;
    let seller = User::new("seller");
    let buyer = User::new("buyer");
    let mut listings = Vec::new();
    for i in 0..5 {
        let title = format!("Folding kayak {i}");
        let (listing, _) = create(&full, &seller, &title, "sports", "good", 10_000).await;
        listings.push(listing);
    }
    for round in 1..=30 {
        let body = json!({"price": {"amount": 10_000 + round, "currency": "EUR"}});
        let paths: Vec<String> = listings
            .iter()
            .map(|listing| format!("/listings/{listing}/price"))
            .collect();
        let changes = paths
            .iter()
            .map(|path| full.app.post(path, Some(&seller), &body));
        for changed in futures::future::join_all(changes).await {
            assert_eq!(changed.status, 200, "{:?}", changed.body);
        }
    }
    // The last change of each in turn: the last position is the greatest.
    let mut after = String::new();
    for listing in &listings {
        let changed = full
            .app
            .post(
                &format!("/listings/{listing}/price"),
                Some(&seller),
                &json!({"price": {"amount": 50_000, "currency": "EUR"}}),
            )
            .await;
        assert_eq!(changed.status, 200, "{:?}", changed.body);
        after = position_of(&changed);
    }
    let current = full
        .api
        .ok(
            &format!("/search?q=kayak&min_price=50000&after={after}"),
            &buyer,
        )
        .await;
    assert_eq!(current["total"], 5, "{current}");
    let stale = full.api.ok("/search?q=kayak&max_price=49999", &buyer).await;
    assert_eq!(
        stale["total"], 0,
        "a listing is indexed at an older price: {stale}"
    );
    full.stop().await;
}

async fn a_restarted_projector_and_a_lost_index_give_the_same_results(backend: Backend) {
    let mut full = start(&backend).await;
    let (_, after) = catalogue(&full).await;
    let buyer = User::new("buyer");
    // Relevance scores depend on the index's statistics (documents deleted
    // but not yet merged away count), so equal scores may swap: relevance
    // is compared as a set, the sorted orders exactly.
    let queries = [
        "q=iphne&sort=price_asc",
        "q=iphne",
        "sort=price_asc",
        "category=phones&sort=newest",
    ];
    let answers = async |full: &FullPath| {
        let mut answers = Vec::new();
        for query in queries {
            let mut page = full
                .api
                .ok(&format!("/search?{query}&after={after}"), &buyer)
                .await;
            if !query.contains("sort=") {
                let items = page["items"].as_array_mut().expect("items");
                items.sort_by_key(|item| item["id"].as_str().unwrap_or_default().to_owned());
            }
            answers.push(page);
        }
        answers
    };
    let before = answers(&full).await;

    // Indexed again from scratch twice: the same answers, no duplicates.
    for _ in 0..2 {
        full.restart_projector(|| {}).await;
        let pool = full.app.db.pool().await;
        let mut conn = pool.acquire().await.expect("a connection");
        let queued = projections::search::enqueue_all(&mut conn, Position::START)
            .await
            .expect("queueing every listing");
        assert_eq!(queued, 4);
        assert_eq!(answers(&full).await, before);
    }

    // The index lost while the projector is down: it is refilled from the
    // read model at start, and `after` waits for it.
    full.stop_projector().await;
    backend.wipe().await;
    full.start_projector().await;
    assert_eq!(answers(&full).await, before, "after a lost index");
    if matches!(backend, Backend::Meili { .. }) {
        // Meilisearch's index removed while the indexer runs: it notices,
        // configures a new one and refills it.
        backend.wipe().await;
        assert_eq!(answers(&full).await, before, "after an index removed live");
    }
    full.stop().await;
}

async fn a_crashed_projector_leaves_the_index_exact(backend: Backend) {
    let mut full = start(&backend).await;
    let mut projector = Some(full.crashable_projector().await);
    let seller = User::new("seller");
    let buyer = User::new("buyer");
    let mut listings = Vec::new();
    let mut after = String::new();
    for n in 0..40_i64 {
        let price = 1_000 + (n * 7) % 13 * 100;
        let (id, _) = create(
            &full,
            &seller,
            &format!("Teapot {n}"),
            "home",
            "good",
            price,
        )
        .await;
        listings.push((price, id));
        if n % 4 == 0 {
            // A price change: the index must hold the last one.
            let price = price + 50;
            let changed = full
                .app
                .post(
                    &format!("/listings/{id}/price"),
                    Some(&seller),
                    &json!({"price": {"amount": price, "currency": "EUR"}}),
                )
                .await;
            assert_eq!(changed.status, 200, "{:?}", changed.body);
            listings.last_mut().expect("a listing").0 = price;
            after = position_of(&changed);
        }
        if n == 25
            && let Some(projector) = projector.take()
        {
            // Killed while it projects and indexes: nothing is flushed.
            projector.crash();
        }
    }
    full.start_projector().await;
    // Cheapest first, ties by id: the order of both backends.
    listings.sort_unstable();
    let expected: Vec<String> = listings.iter().map(|(_, id)| id.to_string()).collect();
    let page = full
        .api
        .ok(
            &format!("/search?q=teapot&sort=price_asc&limit=100&after={after}"),
            &buyer,
        )
        .await;
    let ids: Vec<String> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids, expected, "every listing once, at its last price");
    assert_eq!(page["total"], 40);
    let prices: Vec<i64> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["price"]["amount"].as_i64().unwrap_or_default())
        .collect();
    let expected_prices: Vec<i64> = listings.iter().map(|(price, _)| *price).collect();
    assert_eq!(prices, expected_prices);
    full.stop().await;
}

async fn a_listings_rebuild_queues_every_listing_for_the_index_again(backend: Backend) {
    let full = start(&backend).await;
    let (_, after) = catalogue(&full).await;
    let buyer = User::new("buyer");
    let before = full
        .api
        .ok(&format!("/search?sort=price_asc&after={after}"), &buyer)
        .await;
    let pool = full.app.db.pool().await;
    let report = projections::rebuild(&pool, "listings", event_store::fanout::DEFAULT_PARTITIONS)
        .await
        .expect("rebuilding listings");
    assert!(report.swapped);
    let after_rebuild = report.position.token();
    let again = full
        .api
        .ok(
            &format!("/search?sort=price_asc&after={after_rebuild}"),
            &buyer,
        )
        .await;
    assert_eq!(again, before);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM search_pending")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the indexer drained what the swap queued");
    full.stop().await;
}

async fn bad_search_parameters_are_refused_with_a_code_that_names_the_problem(backend: Backend) {
    let full = start(&backend).await;
    let buyer = User::new("buyer");
    let listings_cursor = format!("4c{}", "00".repeat(16));
    let far_cursor = format!("53{:016x}", 5_000);
    let long = "x".repeat(201);
    let many = ["a"; 9].join("+");
    for (query, status, code) in [
        (format!("q={long}"), 400, "invalid_parameter"),
        (format!("q={many}"), 400, "invalid_parameter"),
        ("q=a%00b".to_owned(), 400, "invalid_parameter"),
        ("sort=cheapest".to_owned(), 400, "invalid_parameter"),
        ("limit=0".to_owned(), 400, "invalid_limit"),
        ("limit=101".to_owned(), 400, "invalid_limit"),
        ("cursor=zz".to_owned(), 400, "invalid_cursor"),
        (format!("cursor={listings_cursor}"), 400, "invalid_cursor"),
        (format!("cursor={far_cursor}"), 400, "invalid_cursor"),
        (
            "min_price=10&max_price=5".to_owned(),
            400,
            "invalid_parameter",
        ),
        ("condition=mint".to_owned(), 400, "invalid_parameter"),
        ("seller_id=bob".to_owned(), 400, "invalid_parameter"),
        ("after=nope".to_owned(), 400, "invalid_position"),
        ("qq=phone".to_owned(), 400, "invalid_query"),
        ("q=a&q=b".to_owned(), 400, "invalid_query"),
        ("status=deleted".to_owned(), 403, "forbidden"),
    ] {
        let answer = full
            .api
            .get(&format!("/search?{query}"), Some(&buyer))
            .await;
        assert_eq!(answer.status, status, "{query}: {:?}", answer.body);
        assert_eq!(answer.code(), code, "{query}");
    }
    let anonymous = full.api.get("/search?q=phone", None).await;
    assert_eq!(anonymous.status, 401);
    let empty = full.api.ok("/search?q=phone", &buyer).await;
    assert_eq!(
        empty,
        json!({"items": [], "next_cursor": null, "total": 0, "facets": {"category": {}, "condition": {}}})
    );
    let seen: HashSet<&str> = ["items", "next_cursor", "total", "facets"].into();
    assert_eq!(
        empty
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect::<HashSet<_>>(),
        seen
    );
    full.stop().await;
}
