//! What Souk's benchmarks (`src/bin/bench.rs`, `src/bin/read_bench.rs`)
//! share: databases and child processes that are cleaned up whatever
//! happens, the service binaries built with the benchmark's own profile,
//! waiting for a service's health check, percentiles and bounded
//! parallelism.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

/// Longest build of the service binaries.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);
/// Longest wait for a service to answer its health check.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// The databases created by a run; every one is dropped by
/// [`Databases::drop_all`], or by `Drop` if the run panicked.
#[derive(Debug)]
pub struct Databases {
    pub admin: PgPool,
    admin_url: String,
    created: std::sync::Mutex<Vec<String>>,
}

impl Databases {
    pub async fn connect(admin_url: &str) -> anyhow::Result<Self> {
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(admin_url)
            .await
            .context(
                "connecting to the admin database (set --admin-url or SOUK_BENCH_ADMIN_URL)",
            )?;
        Ok(Self {
            admin,
            admin_url: admin_url.to_owned(),
            created: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Creates an empty database and returns its URL and name.
    pub async fn create(&self) -> anyhow::Result<(String, String)> {
        let name = format!("souk_bench_{}", Uuid::new_v4().simple());
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&self.admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok((crate::with_database(&self.admin_url, &name), name))
    }

    pub async fn drop_one(&self, name: &str) -> anyhow::Result<()> {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&self.admin)
            .await
            .with_context(|| format!("dropping database {name}"))?;
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|created| created != name);
        Ok(())
    }

    pub async fn drop_all(&self) -> anyhow::Result<()> {
        let names = self
            .created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut failed = None;
        for name in names {
            if let Err(error) = self.drop_one(&name).await {
                eprintln!("{error:#}");
                failed = Some(error);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

impl Drop for Databases {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        if !names.is_empty() && crate::drop_databases_blocking(&self.admin_url, &names).is_err() {
            eprintln!("could not drop every benchmark database (souk_bench_*)");
        }
    }
}

/// A child process, killed when dropped, with the JetStream stream (on
/// `NATS_URL`) it published to, deleted then: it belongs to the run.
#[derive(Debug)]
pub struct ChildGuard(pub Child, pub Option<String>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let Some(stream) = self.1.clone() else {
            return;
        };
        let stream_name = stream.clone();
        let nats_url = crate::nats::nats_url();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let client = tokio::time::timeout(
                    Duration::from_secs(5),
                    async_nats::connect(nats_url.as_str()),
                )
                .await??;
                let jetstream = async_nats::jetstream::new(client);
                jetstream.delete_stream(stream.as_str()).await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!("could not delete the benchmark's JetStream stream {stream_name}");
        }
    }
}

/// A directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("souk-bench-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A value from `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`).
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let file = std::fs::File::open(format!("/proc/{pid}/status")).ok()?;
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
}

/// Builds the workspace's `binaries` with the profile of the running
/// benchmark and returns the directory that holds them (next to this
/// executable), unless `prebuilt` names a directory that already does.
/// Built by [`crate::cargo_build_bins`], so the dependencies `cargo run -p
/// tests` compiled are reused, not compiled again with other features.
pub async fn service_binaries(
    binaries: &[&str],
    prebuilt: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    if let Some(dir) = prebuilt {
        for binary in binaries {
            ensure!(
                dir.join(binary).is_file(),
                "{} holds no {binary}",
                dir.display()
            );
        }
        return Ok(dir.to_path_buf());
    }
    let mut build = crate::cargo_build_bins(binaries);
    eprintln!("building the services ({build:?})");
    // Waited for without blocking the runtime, so that Ctrl-C still cleans
    // up; the guard stops the build if the run is abandoned.
    let mut cargo = ChildGuard(
        build
            .spawn()
            .context("running cargo build (or pass the binaries' directory)")?,
        None,
    );
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let status = loop {
        if let Some(status) = cargo.0.try_wait().context("waiting for cargo build")? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "cargo build took longer than {BUILD_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(status.success(), "cargo build failed: {status}");
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let dir = exe
        .parent()
        .context("the bench executable has no directory")?
        .to_path_buf();
    for binary in binaries {
        ensure!(
            dir.join(binary).is_file(),
            "{binary} is missing in {} after the build",
            dir.display()
        );
    }
    Ok(dir)
}

pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the free port")?
        .port())
}

/// The last 20 lines of a log file.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Waits until `child` answers 2xx on `health_url`, failing with the end of
/// its log if it exits or takes longer than [`STARTUP_TIMEOUT`].
pub async fn wait_healthy(
    child: &mut ChildGuard,
    client: &reqwest::Client,
    health_url: &str,
    log_path: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = child.0.try_wait().context("polling the service")? {
            bail!(
                "{health_url}: the service exited ({status}); its log ends with:\n{}",
                log_tail(log_path)
            );
        }
        if let Ok(answer) = client.get(health_url).send().await
            && answer.status().is_success()
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{health_url} did not answer within {STARTUP_TIMEOUT:?}; the log ends with:\n{}",
            log_tail(log_path)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `percent` percentile of sorted microsecond samples, in milliseconds
/// (NaN when there are none).
pub fn percentile_ms(sorted_us: &[u32], percent: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = (percent / 100.0 * (sorted_us.len() - 1) as f64).round() as usize;
    f64::from(sorted_us[rank.min(sorted_us.len() - 1)]) / 1000.0
}

/// One measured operation: when it was due (open loop) or sent (closed
/// loop), in microseconds since the Unix epoch, how long its answer took
/// from then, and whether it succeeded.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at_unix_us: u64,
    pub latency_us: u32,
    pub ok: bool,
}

/// Width of the windows that slow answers are grouped in.
pub const SLOW_WINDOW: Duration = Duration::from_millis(100);
/// Most slow windows listed.
const SLOW_WINDOWS_SHOWN: usize = 12;

/// Prints the windows of [`SLOW_WINDOW`] (by due time) whose slowest
/// operation took at least `slow_ms`, as `HH:MM:SS.mmm max ms (operations)`,
/// slowest first, with how many there were; prints nothing when there are
/// none. It says when a tail is a few stalls rather than a steady queue.
pub fn print_slow_windows(timeline: &[Sample], slow_ms: u32) {
    let window_us = SLOW_WINDOW.as_micros() as u64;
    let mut windows: std::collections::BTreeMap<u64, (u32, u32)> = Default::default();
    for sample in timeline {
        let entry = windows.entry(sample.at_unix_us / window_us).or_default();
        entry.0 = entry.0.max(sample.latency_us);
        entry.1 += 1;
    }
    let mut slow: Vec<(u64, u32, u32)> = windows
        .into_iter()
        .filter(|(_, (max, _))| *max >= slow_ms * 1000)
        .map(|(window, (max, count))| (window, max, count))
        .collect();
    if slow.is_empty() {
        return;
    }
    slow.sort_by_key(|(_, max, _)| std::cmp::Reverse(*max));
    let shown = slow
        .iter()
        .take(SLOW_WINDOWS_SHOWN)
        .map(|(window, max, count)| {
            let at = chrono::DateTime::from_timestamp_micros((window * window_us) as i64)
                .map_or_else(
                    || "?".to_owned(),
                    |at| at.format("%H:%M:%S%.3f").to_string(),
                );
            format!("{at} {} ms ({count})", max / 1000)
        })
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "  {} windows of {} ms with an answer >= {slow_ms} ms (UTC, by due time): {shown}",
        slow.len(),
        SLOW_WINDOW.as_millis()
    );
}

/// Runs `make(i)` for `0..count` with at most `in_flight` at once and
/// returns the results in order.
pub async fn in_parallel<T, F, Fut>(
    count: usize,
    in_flight: usize,
    make: F,
) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut results: Vec<(usize, T)> = futures::stream::iter(0..count)
        .map(|i| {
            let future = make(i);
            async move { future.await.map(|value| (i, value)) }
        })
        .buffer_unordered(in_flight.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, value)| value).collect())
}

/// Met or missed, as the benchmarks print their targets.
pub fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

/// A benchmark binary's `main` after parsing its flags: warns on a debug
/// build, connects to
/// `admin_url`, runs `run` with the run's databases until it ends or Ctrl-C,
/// then drops every database it created (its child processes went with its
/// future), and returns the run's outcome first, the clean-up's second.
pub async fn run_with_databases(
    admin_url: &str,
    run: impl AsyncFnOnce(&Databases) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run with --release for meaningful figures");
    }
    let databases = Databases::connect(admin_url).await?;
    let outcome = tokio::select! {
        outcome = run(&databases) => outcome,
        signal = tokio::signal::ctrl_c() => {
            signal.context("listening for Ctrl-C")?;
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    let dropped = databases.drop_all().await;
    outcome?;
    dropped
}

/// A background task that is aborted when this is dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
