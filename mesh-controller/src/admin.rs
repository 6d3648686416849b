//! The admin server (default port 15014): Prometheus metrics, readiness, and the debug API that
//! `meshctl proxy-status` and operators read.
//!
//! | path | what |
//! |---|---|
//! | `/metrics` | Prometheus text |
//! | `/ready`, `/live` | 200 once the first configuration is loaded / while running |
//! | `/debug/proxies` | connected proxies with per-type state SYNCED / STALE / NACKED |
//! | `/debug/config-errors` | refused manifests and unresolved references |
//! | `/debug/model` | the resolved model (Services, ports, endpoints, routes) |
//! | `/debug/config` | the controller's own settings |

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Serialize;

use crate::config::Config;
use crate::index::ResolveError;
use crate::source::{ConfigErrors, ManifestError};
use crate::xds::server::Hub;

#[derive(Clone, Debug)]
pub struct AdminState {
    pub hub: Arc<Hub>,
    pub errors: ConfigErrors,
    pub config: Arc<Config>,
}

#[derive(Serialize)]
struct ConfigErrorsBody {
    manifests: Vec<ManifestError>,
    references: Vec<ResolveError>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(|| async { "ready\n" }))
        .route("/live", get(|| async { "live\n" }))
        .route("/debug/proxies", get(proxies))
        .route("/debug/config-errors", get(config_errors))
        .route("/debug/model", get(model))
        .route("/debug/config", get(config))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.hub.metrics.encode(),
    )
}

async fn proxies(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.hub.status.snapshot())
}

async fn config_errors(State(s): State<AdminState>) -> impl IntoResponse {
    Json(ConfigErrorsBody {
        manifests: s.errors.all(),
        references: s.hub.model().errors.clone(),
    })
}

async fn model(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.hub.model())
}

async fn config(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.config.as_ref().clone())
}
