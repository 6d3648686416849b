//! The admin server (default `127.0.0.1:15000`) and the metrics server (default `:15020`).
//!
//! | path | server | what |
//! |---|---|---|
//! | `/ready` | both | 200 once the first complete config is applied, else 503 |
//! | `/live` | both | 200 while the process runs |
//! | `/metrics` | both | Prometheus text |
//! | `/config_dump` | admin | settings, xDS state and the running config as JSON |
//! | `/logging` | admin | `GET`: the log filter; `POST ?level=<filter>`: change it live |
//! | `/shutdown` | admin | `POST`: drain and exit (for Jobs) |

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::{Snapshot, Store};
use crate::xds::XdsStatus;

type SetFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Changes the log filter of the running process.
pub struct LogControl {
    set: Box<SetFilter>,
    current: Mutex<String>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current)
            .finish()
    }
}

impl LogControl {
    pub fn new(
        current: &str,
        set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            set: Box::new(set),
            current: Mutex::new(current.to_string()),
        }
    }

    pub fn set(&self, filter: &str) -> Result<(), String> {
        (self.set)(filter)?;
        if let Ok(mut c) = self.current.lock() {
            *c = filter.to_string();
        }
        Ok(())
    }

    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

#[derive(Clone, Debug)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub xds: Arc<Mutex<XdsStatus>>,
    pub log: Option<Arc<LogControl>>,
    pub shutdown: Arc<Notify>,
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if s.store.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first complete config\n",
        )
    }
}

async fn live() -> &'static str {
    "live\n"
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

#[derive(Serialize)]
struct ConfigDump {
    config: Arc<Config>,
    xds: XdsStatus,
    snapshot: Option<Arc<Snapshot>>,
}

async fn config_dump(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let dump = ConfigDump {
        config: s.config.clone(),
        xds: s.xds.lock().map(|x| x.clone()).unwrap_or_default(),
        snapshot: s.store.load(),
    };
    Json(serde_json::to_value(&dump).unwrap_or_default())
}

#[derive(Deserialize)]
struct LevelQuery {
    level: Option<String>,
}

async fn logging_get(State(s): State<AdminState>) -> Response {
    match &s.log {
        Some(l) => format!("{}\n", l.current()).into_response(),
        None => (
            StatusCode::NOT_IMPLEMENTED,
            "log level control is not set up\n",
        )
            .into_response(),
    }
}

async fn logging_set(State(s): State<AdminState>, Query(q): Query<LevelQuery>) -> Response {
    let Some(log) = &s.log else {
        return (
            StatusCode::NOT_IMPLEMENTED,
            "log level control is not set up\n",
        )
            .into_response();
    };
    let Some(level) = q.level else {
        return (
            StatusCode::BAD_REQUEST,
            "missing ?level=<filter>, e.g. ?level=debug\n",
        )
            .into_response();
    };
    match log.set(&level) {
        Ok(()) => format!("log filter is now {level}\n").into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("level {level:?}: {e}\n")).into_response(),
    }
}

async fn shutdown(State(s): State<AdminState>) -> &'static str {
    s.shutdown.notify_one();
    "draining\n"
}

pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .route("/stats/prometheus", get(metrics))
        .route("/config_dump", get(config_dump))
        .route(
            "/logging",
            get(logging_get).post(logging_set).put(logging_set),
        )
        .route("/shutdown", post(shutdown))
        .with_state(state)
}

pub fn metrics_router(state: AdminState) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .with_state(state)
}
