//! Who is connected and how far each proxy is in sync, per resource type; shown at the admin
//! endpoint and by `meshctl proxy-status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::resources::ResourceType;
use crate::metrics::{Metrics, TypeLabels};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncState {
    /// The last response was acknowledged.
    Synced,
    /// A response is on its way and not yet acknowledged.
    #[default]
    Stale,
    /// The proxy rejected the last response.
    Nacked,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    pub state: SyncState,
    pub sent_version: String,
    pub sent_nonce: String,
    pub acked_version: String,
    pub resources: usize,
    /// The NACK's `error_detail` message, while the state is NACKED.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    pub node: String,
    pub namespace: String,
    pub name: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    pub user_agent: String,
    /// The proxy's admin address, when its node metadata says (`mesh.dev/admin-addr`).
    pub admin: Option<String>,
    /// Where its metrics are scraped (`mesh.dev/metrics-addr`, an unspecified host replaced by
    /// the address the proxy connects from).
    pub metrics: Option<std::net::SocketAddr>,
    pub connected_at_unix: u64,
    /// The Gateway (`namespace/name`) the proxy serves, for a gateway proxy.
    pub gateway: Option<String>,
    /// The model revision of the config the stream serves: from the stream's start, or from
    /// the last publish once everything of it that concerns the proxy was sent (its types'
    /// states say whether it was acknowledged).
    pub revision: u64,
    pub types: BTreeMap<ResourceType, TypeStatus>,
}

/// The status of every open stream, by stream id.
#[derive(Debug, Default)]
pub struct StatusTable {
    streams: Mutex<BTreeMap<u64, ProxyStatus>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl StatusTable {
    pub fn snapshot(&self) -> Vec<ProxyStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        // A panic while holding this lock cannot leave the map half-updated in a way that
        // matters; keep serving.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One stream's entry in the table; removed when dropped.
#[derive(Debug)]
pub struct StreamStatus {
    id: u64,
    table: Arc<StatusTable>,
    metrics: Arc<Metrics>,
}

impl StreamStatus {
    pub fn register(table: Arc<StatusTable>, metrics: Arc<Metrics>, status: ProxyStatus) -> Self {
        let id = table
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        table.lock().insert(id, status);
        metrics.connected_proxies.inc();
        Self { id, table, metrics }
    }

    pub fn now_unix() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    }

    fn with(&self, ty: ResourceType, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(s) = self.table.lock().get_mut(&self.id) {
            f(s.types.entry(ty).or_default());
        }
    }

    /// The stream has pushed everything of model revision `revision`.
    pub fn serving(&self, revision: u64) {
        if let Some(s) = self.table.lock().get_mut(&self.id) {
            s.revision = revision;
        }
    }

    pub fn sent(&self, ty: ResourceType, version: &str, nonce: &str, resources: usize) {
        self.metrics
            .pushes
            .get_or_create(&TypeLabels::new(ty))
            .inc();
        self.with(ty, |t| {
            t.state = SyncState::Stale;
            t.sent_version = version.to_string();
            t.sent_nonce = nonce.to_string();
            t.resources = resources;
        });
    }

    /// Records the proxy's answer to the response with `nonce`: an ACK, or with `error` a NACK.
    pub fn answered(&self, ty: ResourceType, nonce: &str, version: &str, error: Option<String>) {
        if error.is_some() {
            self.metrics.nacks.get_or_create(&TypeLabels::new(ty)).inc();
        }
        self.with(ty, |t| {
            if t.sent_nonce != nonce {
                return;
            }
            match error {
                Some(e) => {
                    t.state = SyncState::Nacked;
                    t.error = Some(e);
                }
                None => {
                    t.state = SyncState::Synced;
                    t.acked_version = version.to_string();
                    t.error = None;
                }
            }
        });
    }
}

impl Drop for StreamStatus {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
        self.metrics.connected_proxies.dec();
    }
}
