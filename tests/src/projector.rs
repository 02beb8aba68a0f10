//! A real `projector` process for tests: started with the environment a
//! deployment gives it, its `/health` served on a free port, its log in a
//! file of its own, killed (SIGKILL, as a crash) on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde_json::Value;

#[derive(Debug)]
pub struct ProjectorProcess {
    child: Option<Child>,
    health_port: u16,
    log: PathBuf,
}

impl ProjectorProcess {
    /// Starts `projector` on `database_url`, `nats_url` and `stream`, with
    /// search off and `env` on top.
    pub fn start(
        database_url: &str,
        nats_url: &str,
        stream: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let health_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("finding a free port")?
            .port();
        let log = std::env::temp_dir().join(format!(
            "souk-projector-{}.log",
            uuid::Uuid::now_v7().simple()
        ));
        let file = std::fs::File::create(&log).context("creating the projector's log")?;
        let mut command = Command::new(crate::projector_binary());
        command
            .env("DATABASE_URL", database_url)
            .env("NATS_URL", nats_url)
            .env("SOUK_STREAM", stream)
            .env(
                "SOUK_PROJECTOR_METRICS_ADDR",
                format!("127.0.0.1:{health_port}"),
            )
            .env("SEARCH_BACKEND", "off")
            .env("SOUK_PROJECTOR_STANDBY_RETRY_MS", "200")
            .env("SOUK_PROJECTOR_BACKOFF_MAX_MS", "1000")
            .env("RUST_LOG", "info");
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("sharing the projector's log")?)
            .stderr(file)
            .spawn()
            .context("starting the projector binary")?;
        Ok(Self {
            child: Some(child),
            health_port,
            log,
        })
    }

    /// `/health`'s status and body, `None` while nothing answers.
    pub async fn health(&self) -> Option<(u16, Value)> {
        let response = reqwest::get(format!("http://127.0.0.1:{}/health", self.health_port))
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no rollback.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ProjectorProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
