//! The OpenAPI document of the command API.

/// The OpenAPI 3.0 document served at `/openapi.json`.
pub fn document() -> serde_json::Value {
    serde_json::json!({"openapi": "3.0.3", "info": {"title": "Souk command API", "version": "0.1.0"}, "paths": {}})
}
