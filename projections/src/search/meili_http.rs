//! The HTTP client Souk gives meilisearch-sdk.
//!
//! The SDK's own reqwest client (0.33) sends every request body as a stream
//! read through a freshly zeroed 8 MiB buffer, whatever the body's size: a
//! `/search` of a few hundred bytes cost `query-api` an 8 MiB `memset`, 37%
//! of its CPU under a search load (`perf`, `read-bench --phases search`,
//! 2026-12-07). This one sends the serialized body as it is, with its
//! length, and is otherwise the SDK's: the same query strings, the same
//! bearer key on every request, the same parsing of answers and errors.

use async_trait::async_trait;
use futures::io::AsyncReadExt as _;
use meilisearch_sdk::errors::Error;
use meilisearch_sdk::request::{HttpClient, Method, parse_response};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A reqwest client (one connection pool per process) sending whole bodies.
#[derive(Clone, Debug)]
pub(super) struct Http {
    client: reqwest::Client,
}

impl Http {
    /// A client sending `api_key` as the bearer token of every request.
    pub(super) fn new(api_key: Option<&str>) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        if let Some(key) = api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "MEILI_API_KEY must be printable ASCII".to_owned())?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .map_err(|error| format!("building the HTTP client: {error}"))?;
        Ok(Self { client })
    }

    async fn send<Query, Output>(
        &self,
        url: &str,
        (verb, query, body): (reqwest::Method, Query, Option<Vec<u8>>),
        content_type: &str,
        expected_status_code: u16,
    ) -> Result<Output, Error>
    where
        Query: Serialize + Send + Sync,
        Output: DeserializeOwned + 'static,
    {
        let url = format!("{url}{}", yaup::to_string(&query)?);
        let mut request = self.client.request(verb, &url);
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, content_type).body(body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body = response.text().await?;
        let body = if body.is_empty() { "null" } else { &body };
        parse_response(status, expected_status_code, body, url)
    }
}

/// The verb, the query and the body (a GET or DELETE has none) of `method`.
fn split<Query, Body>(method: Method<Query, Body>) -> (reqwest::Method, Query, Option<Body>) {
    match method {
        Method::Get { query } => (reqwest::Method::GET, query, None),
        Method::Delete { query } => (reqwest::Method::DELETE, query, None),
        Method::Post { query, body } => (reqwest::Method::POST, query, Some(body)),
        Method::Put { query, body } => (reqwest::Method::PUT, query, Some(body)),
        Method::Patch { query, body } => (reqwest::Method::PATCH, query, Some(body)),
    }
}

#[async_trait]
impl HttpClient for Http {
    async fn request<Query, Body, Output>(
        &self,
        url: &str,
        method: Method<Query, Body>,
        expected_status_code: u16,
    ) -> Result<Output, Error>
    where
        Query: Serialize + Send + Sync,
        Body: Serialize + Send + Sync,
        Output: DeserializeOwned + 'static + Send,
    {
        let (verb, query, body) = split(method);
        let body = body.map(|body| serde_json::to_vec(&body)).transpose()?;
        self.send(
            url,
            (verb, query, body),
            "application/json",
            expected_status_code,
        )
        .await
    }

    async fn stream_request<
        Query: Serialize + Send + Sync,
        Body: futures::io::AsyncRead + Send + Sync + 'static,
        Output: DeserializeOwned + 'static,
    >(
        &self,
        url: &str,
        method: Method<Query, Body>,
        content_type: &str,
        expected_status_code: u16,
    ) -> Result<Output, Error> {
        let (verb, query, body) = split(method);
        let body = match body {
            Some(body) => {
                let mut bytes = Vec::new();
                Box::pin(body)
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|error| Error::Other(Box::new(error)))?;
                Some(bytes)
            }
            None => None,
        };
        self.send(url, (verb, query, body), content_type, expected_status_code)
            .await
    }

    fn is_tokio(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_is_no_header_value_is_refused_without_echoing_it() {
        let error = Http::new(Some("bad\nkey")).unwrap_err();
        assert!(!error.contains("bad"), "{error}");
        assert!(Http::new(Some("a-key")).is_ok());
        assert!(Http::new(None).is_ok());
    }
}
