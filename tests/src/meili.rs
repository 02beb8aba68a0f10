//! Meilisearch for tests: one private `meilisearch` server per test process,
//! on a free loopback port, with a temporary database and a master key,
//! shared by the tests that run at the same time (each uses indexes of its
//! own) and killed, its directory removed, when the last of them drops it.
//!
//! The binary: `MEILI_BIN`, else `meilisearch` on `PATH`, else
//! `../shared/bin/meilisearch` beside the repository. Without one, a test
//! is skipped, except in CI (`CI=true`), where it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use uuid::Uuid;

/// `--max-indexing-memory` of the servers the tests start, as README
/// advises a deployment.
pub const MAX_INDEXING_MEMORY: &str = "1GiB";
/// How long the server may take to answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a test waits for one of its Meilisearch tasks.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `meilisearch`, killed and its directory removed on drop.
#[derive(Debug)]
pub struct MeiliServer {
    child: Mutex<Child>,
    dir: PathBuf,
    url: String,
    key: String,
}

/// The server binary (see the module doc), if there is one.
pub fn meili_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("MEILI_BIN") {
        return Some(PathBuf::from(bin)).filter(|bin| bin.is_file());
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("meilisearch"))
            .find(|bin| bin.is_file())
    });
    on_path.or_else(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
        Some(root.join("../shared/bin/meilisearch")).filter(|bin| bin.is_file())
    })
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl MeiliServer {
    /// The server of this test process, started if none runs; `None` (the
    /// test is skipped) when there is no binary outside CI.
    pub async fn shared() -> Option<Arc<Self>> {
        static SERVER: tokio::sync::Mutex<Weak<MeiliServer>> =
            tokio::sync::Mutex::const_new(Weak::new());
        let Some(bin) = meili_bin() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "no meilisearch binary (MEILI_BIN, PATH, ../shared/bin/meilisearch): \
                 CI runs the Meilisearch tests"
            );
            eprintln!("skipped: no meilisearch binary (set MEILI_BIN)");
            return None;
        };
        let mut shared = SERVER.lock().await;
        if let Some(server) = shared.upgrade() {
            return Some(server);
        }
        let server = Arc::new(Self::start(&bin).await.expect("starting meilisearch"));
        *shared = Arc::downgrade(&server);
        Some(server)
    }

    /// Starts a server of `bin` and waits until it is healthy.
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("souk-meili-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).context("creating the Meilisearch directory")?;
        let log = std::fs::File::create(dir.join("meilisearch.log"))?;
        let port = free_port()?;
        let key = format!("souk-test-{}", Uuid::new_v4().simple());
        let child = Command::new(bin)
            .arg("--db-path")
            .arg(dir.join("db"))
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--master-key", &key])
            .arg("--no-analytics")
            // Meilisearch 1.50 spends CPU in proportion to this on every
            // indexing batch, whatever its size; its default (two thirds of
            // the RAM) made each small batch cost about 400 ms (README,
            // "Search on Meilisearch").
            .args(["--max-indexing-memory", MAX_INDEXING_MEMORY])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .current_dir(&dir)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = Self {
            child: Mutex::new(child),
            dir,
            url: format!("http://127.0.0.1:{port}"),
            key,
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.lock().expect("the child").try_wait()? {
                let log =
                    std::fs::read_to_string(self.dir.join("meilisearch.log")).unwrap_or_default();
                bail!("meilisearch exited with {status}: {log}");
            }
            let health = client
                .get(format!("{}/health", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if health.is_ok_and(|answer| answer.status().is_success()) {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("meilisearch not healthy after {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The master key (every test uses it as its API key).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A new index name of the calling test's own.
    pub fn index_name() -> String {
        format!("souk_test_{}", Uuid::new_v4().simple())
    }

    /// Sends `request` with the master key; its JSON answer.
    async fn ask(&self, request: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
        Ok(request
            .bearer_auth(&self.key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Deletes the index `uid` (as an operator or a lost volume would) and
    /// waits until it is gone.
    pub async fn delete_index(&self, uid: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let task = self
            .ask(client.delete(format!("{}/indexes/{uid}", self.url)))
            .await?;
        let task_uid = task["taskUid"].as_u64().context("no taskUid")?;
        let started = Instant::now();
        loop {
            let task = self
                .ask(client.get(format!("{}/tasks/{task_uid}", self.url)))
                .await?;
            match task["status"].as_str() {
                Some("succeeded") => return Ok(()),
                Some("failed" | "canceled") => bail!("deleting {uid}: {task}"),
                _ if started.elapsed() > TASK_TIMEOUT => bail!("deleting {uid} never ended"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for MeiliServer {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
