//! What every NATS client of Souk shares: the server list of `NATS_URL`
//! (one URL, or a comma-separated list of the servers of a cluster; the
//! client connects to one and fails over to the others), its redaction for
//! logs, and the replica count of the stream (`SOUK_STREAM_REPLICAS`).

use std::time::Duration;

use async_nats::ServerAddr;

/// How long a JetStream API request (stream and consumer info, creating a
/// consumer, reading a message) waits for its answer, against async-nats'
/// default of 5 s. While a restarted cluster elects its leaders the
/// requests go unanswered, and each waited out its 5 s: the relay published
/// its first event 10.7 s after the nodes were back, and the projector's
/// partitions resumed after 9.3 s (read-bench's cluster catch-up,
/// 2026-12-07). Answered requests take milliseconds. Publish acks keep
/// their own, longer bound (the relay's `ack_timeout`).
pub const API_TIMEOUT: Duration = Duration::from_secs(1);

/// The most replicas JetStream keeps of a stream.
pub const MAX_REPLICAS: usize = 5;

/// Why `NATS_URL` or `SOUK_STREAM_REPLICAS` was refused.
#[derive(Debug, thiserror::Error)]
pub enum NatsConfigError {
    #[error("NATS_URL names no server")]
    NoServer,
    #[error("NATS_URL's server number {index} (`{url}`) is not a NATS URL: {reason}")]
    BadServer {
        index: usize,
        url: String,
        reason: String,
    },
    #[error("SOUK_STREAM_REPLICAS must be between 1 and {MAX_REPLICAS}, not {0}")]
    BadReplicas(usize),
}

/// The servers of `urls`: one URL or a comma-separated list of them (spaces
/// around the commas are ignored). Each must parse as a NATS server address.
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, NatsConfigError> {
    let mut servers = Vec::new();
    for (index, url) in urls.split(',').map(str::trim).enumerate() {
        if url.is_empty() {
            continue;
        }
        let server = url
            .parse::<ServerAddr>()
            .map_err(|error| NatsConfigError::BadServer {
                index: index + 1,
                url: redacted(url),
                reason: error.to_string(),
            })?;
        servers.push(server);
    }
    if servers.is_empty() {
        return Err(NatsConfigError::NoServer);
    }
    Ok(servers)
}

/// Checks a replica count: 1 (one server) up to [`MAX_REPLICAS`].
pub fn validate_replicas(replicas: usize) -> Result<usize, NatsConfigError> {
    if (1..=MAX_REPLICAS).contains(&replicas) {
        Ok(replicas)
    } else {
        Err(NatsConfigError::BadReplicas(replicas))
    }
}

/// `urls` without any user, password or token, for logs.
pub fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let authority = url.find("://").map_or(0, |at| at + 3);
            match url[authority..].rfind('@') {
                Some(at) => format!("{}***@{}", &url[..authority], &url[authority + at + 1..]),
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The stream sequence of the last message on `subject` (a filter: it may
/// hold wildcards), or 0 when the stream holds none, as the stream's
/// *leader* knows it.
///
/// A consumer of a replicated stream delivers from its own node's replica,
/// which may not yet hold a message the leader has already acknowledged to
/// its publisher: its "nothing pending" then means nothing pending *there*.
/// The leader holds every acknowledged message, so a reader that has been
/// delivered everything up to this sequence has been delivered every
/// message on `subject` that was acknowledged before the call.
pub async fn last_sequence_on(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
) -> Result<u64, async_nats::jetstream::stream::LastRawMessageError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(message.sequence),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_list_names_every_server_of_a_cluster() {
        let servers =
            server_addrs("nats://127.0.0.1:4222, nats://10.0.0.2:4223,tls://nats-3:4224").unwrap();
        let hosts: Vec<(String, u16)> = servers
            .iter()
            .map(|server| (server.host().to_owned(), server.port()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("127.0.0.1".to_owned(), 4222),
                ("10.0.0.2".to_owned(), 4223),
                ("nats-3".to_owned(), 4224)
            ]
        );
        assert_eq!(server_addrs("nats://one:4222").unwrap().len(), 1);
        // A trailing comma is not a server.
        assert_eq!(server_addrs("nats://a:1,").unwrap().len(), 1);
    }

    #[test]
    fn a_bad_server_list_is_refused_with_the_culprit_named_and_no_secret() {
        assert!(matches!(server_addrs(""), Err(NatsConfigError::NoServer)));
        assert!(matches!(
            server_addrs(" , "),
            Err(NatsConfigError::NoServer)
        ));
        let error = server_addrs("nats://a:4222,nats://user:secret@b:notaport")
            .unwrap_err()
            .to_string();
        assert!(error.contains("number 2"), "{error}");
        assert!(!error.contains("secret"), "{error}");
        assert!(server_addrs("http://a:4222").is_err());
    }

    #[test]
    fn replica_counts_are_bounded() {
        assert_eq!(validate_replicas(1).unwrap(), 1);
        assert_eq!(validate_replicas(3).unwrap(), 3);
        assert!(validate_replicas(0).is_err());
        assert!(validate_replicas(6).is_err());
    }

    #[test]
    fn credentials_stay_out_of_logged_urls() {
        assert_eq!(redacted("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redacted("nats://user:secret@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(redacted("token@nats:4222"), "***@nats:4222");
        assert_eq!(
            redacted("nats://u:p@a:1, nats://u:p@b:2"),
            "nats://***@a:1,nats://***@b:2"
        );
    }
}
