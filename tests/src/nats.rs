//! NATS for tests: a private `nats-server` that a test may stop and start
//! again ([`NatsServer`]; the shared server on 4222 must keep serving every
//! other test), and helpers to read and delete a JetStream stream.
//!
//! Every wait here is bounded: a server that does not come up, a stream that
//! cannot be read, fail the test instead of hanging it.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer};
use event_store::global::RecordedEvent;
use futures::StreamExt;

/// How long connecting to or asking NATS may take.
const NATS_TIMEOUT: Duration = Duration::from_secs(5);

/// The shared NATS server: `NATS_URL`, or the local one.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A private `nats-server` with JetStream, on a free loopback port, with a
/// store directory of its own. Killed and removed on drop.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Arguments after the common ones (a cluster node's name and routes).
    extra_args: Vec<String>,
    child: Option<Child>,
}

fn nats_server_bin() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/nats-server");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("nats-server")
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl NatsServer {
    /// Starts a new server and waits until it accepts clients.
    pub fn start() -> anyhow::Result<Self> {
        let mut server = Self::reserve()?;
        server.start_again()?;
        Ok(server)
    }

    /// A server on a free port that is not started: clients pointed at
    /// [`Self::url`] find nothing listening until [`Self::start_again`].
    pub fn reserve() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("souk-nats-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).context("creating the NATS store directory")?;
        Ok(Self {
            bin: nats_server_bin(),
            dir,
            port: free_port()?,
            extra_args: Vec::new(),
            child: None,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing nats-server")?;
            child.wait().context("waiting for nats-server to exit")?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and store directory (its
    /// streams survive), and waits until it accepts clients.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("nats-server is already running");
        }
        let log = std::fs::File::create(self.dir.join("nats-server.log"))
            .context("creating the NATS log")?;
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("sharing the NATS log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the server greets a client with its `INFO` line.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        use std::io::Read;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("watching nats-server")?
            {
                self.child = None;
                bail!(
                    "nats-server exited at start ({status}); see {}",
                    self.dir.join("nats-server.log").display()
                );
            }
            let greeted = TcpStream::connect(("127.0.0.1", self.port)).and_then(|mut socket| {
                socket.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut greeting = [0_u8; 4];
                socket.read_exact(&mut greeting)?;
                Ok(&greeting == b"INFO")
            });
            if matches!(greeted, Ok(true)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nats-server on port {} did not come up", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three (or more) private `nats-server`s with JetStream, routed to each
/// other as one cluster on loopback ports, each with its own store
/// directory. A node may be killed and started again; all go on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until each accepts clients (JetStream
    /// elects its meta leader shortly after: clients retry until then).
    pub fn start(size: usize) -> anyhow::Result<Self> {
        let name = format!("souk_test_{}", uuid::Uuid::now_v7().simple());
        let mut nodes = Vec::with_capacity(size);
        let mut route_ports = Vec::with_capacity(size);
        for _ in 0..size {
            nodes.push(NatsServer::reserve()?);
            route_ports.push(free_port()?);
        }
        let routes = route_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        for (index, node) in nodes.iter_mut().enumerate() {
            node.extra_args = vec![
                "--server_name".to_owned(),
                format!("{name}_n{index}"),
                "--cluster_name".to_owned(),
                name.clone(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{}", route_ports[index]),
                "--routes".to_owned(),
                routes.clone(),
            ];
        }
        // Every node must be spawned before any is waited for: a node
        // reaches its routes while they come up.
        for node in &mut nodes {
            node.spawn()?;
        }
        for node in &mut nodes {
            node.wait_ready()?;
        }
        Ok(Self { nodes })
    }

    /// Every node's client URL, comma separated (what `NATS_URL` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `index` (as a crash would).
    pub fn stop(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index].stop()
    }

    /// Starts node `index` again with its store (it rejoins the cluster).
    pub fn start_again(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index].start_again()
    }

    /// How many nodes the cluster has.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Kills every node (the whole cluster is down).
    pub fn stop_all(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.stop()?;
        }
        Ok(())
    }

    /// Starts every node again with its store, all spawned before any is
    /// waited for (as at [`Self::start`]).
    pub fn start_all_again(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.spawn()?;
        }
        for node in &mut self.nodes {
            node.wait_ready()?;
        }
        Ok(())
    }
}

/// Connects to the NATS server at `url` (or one of a comma-separated list),
/// within a bounded time.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let servers = event_store::nats::server_addrs(url)?;
    tokio::time::timeout(
        NATS_TIMEOUT,
        async_nats::ConnectOptions::new()
            .connection_timeout(NATS_TIMEOUT)
            .connect(servers),
    )
    .await
    .with_context(|| format!("connecting to {url} timed out"))?
    .with_context(|| format!("connecting to {url}"))
}

/// One message of a stream, as stored.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The stream sequence (1, 2, ...).
    pub sequence: u64,
    pub subject: String,
    /// The `Nats-Msg-Id` header.
    pub message_id: Option<String>,
    pub payload: Vec<u8>,
}

impl StoredMessage {
    /// The body as the relay wrote it.
    pub fn event(&self) -> RecordedEvent {
        serde_json::from_slice(&self.payload).unwrap_or_else(|error| {
            panic!(
                "message {} is not a RecordedEvent ({error}): {}",
                self.sequence,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// Every message of `stream`, in stream order (empty when the stream does
/// not exist), read with an ephemeral pull consumer.
pub async fn stream_messages(url: &str, stream: &str) -> anyhow::Result<Vec<StoredMessage>> {
    let client = connect(url).await?;
    let mut js = jetstream::new(client);
    js.set_timeout(NATS_TIMEOUT);
    let mut handle = match js.get_stream(stream).await {
        Ok(handle) => handle,
        Err(error) if stream_not_found(&error.kind()) => return Ok(Vec::new()),
        Err(error) => return Err(error).context("looking up the stream"),
    };
    let last = handle
        .info()
        .await
        .context("reading the stream's state")?
        .state
        .last_sequence;
    let mut messages = Vec::new();
    if last == 0 {
        return Ok(messages);
    }
    let reader = handle
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .context("creating a reader")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while messages
        .last()
        .is_none_or(|message: &StoredMessage| message.sequence < last)
    {
        if Instant::now() > deadline {
            bail!(
                "read {} messages of {stream}, not up to {last}",
                messages.len()
            );
        }
        let mut batch = reader
            .fetch()
            .max_messages(1_000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .context("fetching messages")?;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|error| anyhow::anyhow!("{error}"))?;
            let sequence = message
                .info()
                .map_err(|error| anyhow::anyhow!("{error}"))?
                .stream_sequence;
            messages.push(StoredMessage {
                sequence,
                subject: message.subject.to_string(),
                message_id: message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get("Nats-Msg-Id"))
                    .map(|id| id.as_str().to_owned()),
                payload: message.payload.to_vec(),
            });
        }
    }
    let _ = handle
        .delete_consumer(reader.cached_info().name.as_str())
        .await;
    Ok(messages)
}

/// Waits until `stream` holds at least `count` messages, then returns them
/// all; fails after `within`.
pub async fn wait_for_messages(
    url: &str,
    stream: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<Vec<StoredMessage>> {
    let deadline = Instant::now() + within;
    loop {
        let stored = stored_count(url, stream).await.unwrap_or(0);
        if stored >= count as u64 {
            return stream_messages(url, stream).await;
        }
        if Instant::now() > deadline {
            bail!("{stream} holds {stored} messages, not {count}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many messages `stream` holds (0 when it does not exist).
pub async fn stored_count(url: &str, stream: &str) -> anyhow::Result<u64> {
    let client = connect(url).await?;
    let mut js = jetstream::new(client);
    js.set_timeout(NATS_TIMEOUT);
    match js.get_stream(stream).await {
        Ok(mut handle) => Ok(handle
            .info()
            .await
            .context("reading the stream")?
            .state
            .messages),
        Err(_) => Ok(0),
    }
}

fn stream_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(error)
        if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Deletes `stream`; `Ok(false)` when there was none.
pub async fn delete_stream(url: &str, stream: &str) -> anyhow::Result<bool> {
    let client = connect(url).await?;
    let mut js = jetstream::new(client);
    js.set_timeout(NATS_TIMEOUT);
    match js.delete_stream(stream).await {
        Ok(_) => Ok(true),
        Err(error) if stream_not_found(&error.kind()) => Ok(false),
        Err(error) => Err(error).context("deleting the stream"),
    }
}

/// Deletes `stream` from a `Drop`: on a thread and runtime of its own (drop
/// runs inside the test's runtime), within a bounded time, best effort.
pub fn delete_stream_blocking(url: &str, stream: &str) {
    let (url, stream) = (url.to_owned(), stream.to_owned());
    let deleted = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), delete_stream(&url, &stream))
                .await
                .context("deleting the stream timed out")?
        })
    })
    .join();
    if let Ok(Err(error)) = deleted {
        eprintln!("could not delete a test stream: {error:#}");
    }
}

/// A stream name for one test, deleted (with its messages) on drop.
#[derive(Debug)]
pub struct TestStream {
    pub name: String,
    pub url: String,
}

impl TestStream {
    /// A fresh name on the NATS server at `url`; the relay creates the stream.
    pub fn new(url: &str) -> Self {
        Self {
            name: format!("souk_test_{}", uuid::Uuid::now_v7().simple()),
            url: url.to_owned(),
        }
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        delete_stream_blocking(&self.url, &self.name);
    }
}
