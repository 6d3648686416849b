//! Where objects come from: a directory of manifests ([`dir`]) or the Kubernetes API
//! ([`kube`]). Both feed the same [`crate::index::Index`]; nothing downstream knows which runs.

pub mod dir;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// A document that was refused, with where it is and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ManifestError {
    /// File path (directory source) or `Kind/namespace/name` (Kubernetes source).
    pub source: String,
    /// 1-based position of the document in its file; 0 for the Kubernetes source.
    pub document: usize,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source)?;
        if self.document > 0 {
            write!(f, " document {}", self.document)?;
        }
        if let (Some(k), Some(n)) = (&self.kind, &self.name) {
            write!(f, " ({k} {n})")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Refused documents, grouped by where they came from; shared with the admin endpoint.
#[derive(Clone, Debug, Default)]
pub struct ConfigErrors {
    inner: Arc<Mutex<BTreeMap<String, Vec<ManifestError>>>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl ConfigErrors {
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            inner: Arc::default(),
            metrics: Some(metrics),
        }
    }

    /// Replaces the errors of one source (a file, or a Kubernetes object).
    pub fn set(&self, source: &str, errors: Vec<ManifestError>) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if errors.is_empty() {
            map.remove(source);
        } else {
            map.insert(source.to_string(), errors);
        }
        if let Some(m) = &self.metrics {
            m.rejected_manifests
                .set(map.values().map(Vec::len).sum::<usize>() as i64);
        }
    }

    pub fn all(&self) -> Vec<ManifestError> {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.values().flatten().cloned().collect()
    }
}
