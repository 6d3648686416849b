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
//! | `/debug/service?service=<ns>/<name>` | one Service of the model, with the model's revision |
//! | `/debug/config` | the controller's own settings |
//! | `/debug/version` | the controller's version |
//! | `/debug/edges` | who talks to whom, with rps, success rate and latency |
//! | `/debug/top` | workloads by the traffic they serve |
//! | `/debug/stat?service=<ns>/<name>` | a Service's traffic per route and backend |
//! | `/debug/authz?service=<ns>/<name>` | the policies in force on each port of a Service |
//! | `/debug/explain?from=<ns>/<workload>&method=M&url=U&header=name:value...` | what the mesh does with one request |
//! | `/graph` | the service graph, a live web page |
//!
//! `/metrics`, `/ready` and `/live` answer everyone who reaches the port; the rest answer only
//! whom [`crate::access`] lets in.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Serialize;

use crate::config::Config;
use crate::index::ResolveError;
use crate::index::SvcKey;
use crate::source::{ConfigErrors, ManifestError};
use crate::stats::Stats;
use crate::xds::server::Hub;

#[derive(Clone, Debug)]
pub struct AdminState {
    pub hub: Arc<Hub>,
    pub errors: ConfigErrors,
    pub config: Arc<Config>,
    pub stats: Arc<Stats>,
    pub access: crate::access::Access,
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
        .route("/debug/service", get(service))
        .route("/debug/gateways", get(gateways))
        .route("/debug/config", get(config))
        .route("/debug/version", get(version))
        .route("/debug/edges", get(edges))
        .route("/debug/top", get(top))
        .route("/debug/stat", get(stat))
        .route("/debug/authz", get(authz))
        .route("/debug/explain", get(explain))
        .route("/graph", get(graph))
        .layer(axum::middleware::from_fn_with_state(
            state.access.clone(),
            crate::access::guard,
        ))
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

/// Our GatewayClasses, and each Gateway of them as resolved, with the gateway proxies
/// connected for it and whether one serves the current configuration.
async fn gateways(State(s): State<AdminState>) -> impl IntoResponse {
    let model = s.hub.model();
    let proxies = s.hub.status.snapshot();
    let served = crate::status::served_gateways(&proxies);
    let gateways: std::collections::BTreeMap<&String, serde_json::Value> = model
        .gateways
        .gateways
        .iter()
        .map(|(name, g)| {
            let nodes: Vec<&str> = proxies
                .iter()
                .filter(|p| p.gateway.as_ref() == Some(name))
                .map(|p| p.node.as_str())
                .collect();
            (
                name,
                serde_json::json!({"gateway": g, "proxies": nodes, "served": served.contains(name)}),
            )
        })
        .collect();
    Json(serde_json::json!({"classes": model.gateways.classes, "gateways": gateways}))
}

async fn config(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.config.as_ref().clone())
}

async fn version() -> impl IntoResponse {
    Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// What the stats answers say about themselves.
#[derive(Serialize)]
struct Window<T> {
    window_seconds: f64,
    interval_seconds: f64,
    /// Proxies whose metrics the controller holds.
    proxies_scraped: usize,
    #[serde(flatten)]
    body: T,
}

fn windowed<T: Serialize>(stats: &Stats, body: T) -> Json<Window<T>> {
    Json(Window {
        window_seconds: stats.window.as_secs_f64(),
        interval_seconds: stats.interval.as_secs_f64(),
        proxies_scraped: stats.scraped(),
        body,
    })
}

#[derive(Serialize)]
struct Edges {
    edges: Vec<crate::stats::Edge>,
}

#[derive(Serialize)]
struct Top {
    workloads: Vec<crate::stats::WorkloadStat>,
}

async fn edges(State(s): State<AdminState>) -> impl IntoResponse {
    windowed(
        &s.stats,
        Edges {
            edges: s.stats.edges(),
        },
    )
}

async fn top(State(s): State<AdminState>) -> impl IntoResponse {
    windowed(
        &s.stats,
        Top {
            workloads: s.stats.top(),
        },
    )
}

#[derive(serde::Deserialize)]
struct StatQuery {
    service: Option<String>,
}

/// The Service a `?service=<namespace>/<name>` query names, or the answer saying what is wrong.
fn service_query(q: StatQuery) -> Result<SvcKey, (StatusCode, String)> {
    let Some(service) = q.service else {
        return Err((
            StatusCode::BAD_REQUEST,
            "query parameter service=<namespace>/<name> is required\n".into(),
        ));
    };
    match service
        .split_once('/')
        .filter(|(n, s)| !n.is_empty() && !s.is_empty())
    {
        Some((ns, name)) => Ok(SvcKey::new(ns, name)),
        None => Err((
            StatusCode::BAD_REQUEST,
            format!("service={service:?}: expected <namespace>/<name>\n"),
        )),
    }
}

/// What a per-Service endpoint answers: `view` of the model for the Service the query names,
/// 400 for a malformed query, 404 for a Service not in the configuration.
fn per_service(
    s: &AdminState,
    q: StatQuery,
    view: impl FnOnce(&crate::index::Model, &SvcKey) -> Option<axum::response::Response>,
) -> axum::response::Response {
    let key = match service_query(q) {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    match view(&s.hub.model(), &key) {
        Some(r) => r,
        None => (
            StatusCode::NOT_FOUND,
            format!("service \"{key}\" is not in the mesh's configuration\n"),
        )
            .into_response(),
    }
}

async fn stat(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<StatQuery>,
) -> axum::response::Response {
    per_service(&s, q, |model, key| {
        s.stats.service(model, key).map(|v| Json(v).into_response())
    })
}

/// One Service of the model and the revision it is from: what `meshctl route split --wait`
/// compares with the route it wrote, before it waits for the proxies to acknowledge that
/// revision.
async fn service(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<StatQuery>,
) -> axum::response::Response {
    per_service(&s, q, |model, key| {
        model.services.get(key).map(|svc| {
            Json(serde_json::json!({"revision": model.revision, "service": svc})).into_response()
        })
    })
}

async fn authz(
    State(s): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<StatQuery>,
) -> axum::response::Response {
    // The view borrows the model: it is answered as JSON before the model goes.
    per_service(&s, q, |model, key| {
        crate::index::policy::service_authz(model, key).map(|a| Json(a).into_response())
    })
}

/// `meshctl explain`: the request from the query (`header` may repeat, `name:value`).
async fn explain(
    State(s): State<AdminState>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> axum::response::Response {
    let mut req = crate::explain::Request::default();
    for (k, v) in form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
        match &*k {
            "from" => req.from = v.into_owned(),
            "method" => req.method = v.into_owned(),
            "url" => req.url = v.into_owned(),
            "header" => match v.split_once(':') {
                Some((name, value)) => req
                    .headers
                    .push((name.trim().to_string(), value.trim().to_string())),
                None => {
                    return (
                        StatusCode::BAD_REQUEST,
                        format!("header={v:?}: expected <name>:<value>\n"),
                    )
                        .into_response();
                }
            },
            other => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {other:?}: from, method, url, header\n"),
                )
                    .into_response();
            }
        }
    }
    if req.method.is_empty() {
        req.method = "GET".into();
    }
    match crate::explain::explain(&s.hub.model(), &req) {
        Ok(e) => Json(e).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn graph() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("graph.html"),
    )
}
