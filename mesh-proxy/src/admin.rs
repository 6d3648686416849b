//! The admin server (default `127.0.0.1:15000`) and the metrics server (default `:15020`).
//!
//! | path | server | what |
//! |---|---|---|
//! | `/ready` | both | 200 once the first complete config is applied, every gateway listener it names is bound, and (with identity on) a valid SVID is held, else 503 |
//! | `/live` | both | 200 while the process runs |
//! | `/app-health/<container>/<livez\|readyz\|startupz>` | metrics | the app's probe, run by the proxy (`app_probe`): 200 when it passes |
//! | `/metrics` | both | Prometheus text, or OpenMetrics when the `Accept` header asks |
//! | `/config_dump` | admin | settings, xDS state and the running config as JSON |
//! | `/logging` | admin | `GET`: the log filter; `POST ?level=<filter>`: change it live |
//! | `/shutdown` | admin | `POST`: drain and exit (for Jobs) |

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::Config;
use crate::identity::{MeshTls, RenewalStatus};
use crate::metrics::Metrics;
use crate::state::{Snapshot, Store};
use crate::xds::XdsStatus;

/// What a proxy without identity says, in its log and at `/config_dump`.
pub const IDENTITY_OFF_WARNING: &str =
    "identity is off: no mesh TLS, plaintext to and from every peer, no peer identities";

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
    pub tls: Option<Arc<MeshTls>>,
    /// A gateway proxy (`--gateway`): set once it has bound a config's listeners.
    pub gateway_bound: Option<Arc<std::sync::atomic::AtomicBool>>,
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if !s.store.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first complete config\n",
        );
    }
    if s.gateway_bound
        .as_ref()
        .is_some_and(|b| !b.load(std::sync::atomic::Ordering::Acquire))
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "binding the gateway's listeners\n",
        );
    }
    if s.metrics.gateway_listeners_unbound.get() > 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "a gateway listener could not be bound (see the log)\n",
        );
    }
    if let Some(tls) = &s.tls
        && !tls.identity.has_valid_svid()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for a valid certificate from mesh-ca\n",
        );
    }
    (StatusCode::OK, "ready\n")
}

/// An app probe the kubelet sends here instead of to the app (see `app_probe`).
async fn app_health(
    State(s): State<AdminState>,
    Path((container, kind)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    let path = mesh_api::probes::path(&container, &kind);
    let Some(probe) = s.config.app_probes.get(&path) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no app probe at {path}: injection did not rewrite one\n"),
        )
            .into_response();
    };
    let host = s
        .config
        .pod_ip
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let outcome = crate::app_probe::run(probe, host, headers.get(header::USER_AGENT)).await;
    if !outcome.status.is_success() {
        tracing::debug!(%path, detail = %outcome.detail, "app probe failed");
    }
    (outcome.status, format!("{}\n", outcome.detail)).into_response()
}

async fn live() -> &'static str {
    "live\n"
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else Prometheus text 0.0.4.
async fn metrics(State(s): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    let om = s.metrics.encode();
    let wants_om = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if wants_om {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            om,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            mesh_api::prom::openmetrics_to_text(&om),
        )
            .into_response()
    }
}

#[derive(Serialize)]
struct ConfigDump {
    config: Arc<Config>,
    identity: IdentityDump,
    xds: XdsStatus,
    snapshot: Option<Arc<Snapshot>>,
}

#[derive(Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
enum IdentityDump {
    /// `--identity-off`: plaintext only.
    Off { warning: &'static str },
    On {
        spiffe_id: String,
        valid: bool,
        #[serde(flatten)]
        renewal: RenewalStatus,
    },
}

async fn config_dump(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let identity = match &s.tls {
        None => IdentityDump::Off {
            warning: IDENTITY_OFF_WARNING,
        },
        Some(t) => IdentityDump::On {
            spiffe_id: t.id.to_string(),
            valid: t.identity.has_valid_svid(),
            renewal: t.status(),
        },
    };
    let dump = ConfigDump {
        config: s.config.clone(),
        identity,
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
        .route("/app-health/{container}/{kind}", get(app_health))
        .with_state(state)
}
