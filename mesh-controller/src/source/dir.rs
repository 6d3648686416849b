//! The directory source: every `*.yaml` / `*.yml` file below a directory, each holding one or
//! more documents (`---`), or a `kind: List`. Adding, changing or deleting a file updates the
//! index live. A document that does not parse or validate is reported (file, document number,
//! field, reason) and the last good version of that object stays in force; the rest still applies.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{ConfigErrors, ManifestError};
use crate::index::Index;
use crate::objects::{ObjKey, Object, doc_identity, parse_doc};

/// Namespace given to namespaced objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("config directory {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("watching config directory {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// The directory's files and the objects each one holds.
#[derive(Debug)]
pub struct DirSource {
    root: PathBuf,
    index: Arc<Mutex<Index>>,
    errors: ConfigErrors,
    /// Objects each file provides (including refused ones whose last good version is kept).
    files: HashMap<PathBuf, Vec<ObjKey>>,
    /// Which file provides each object.
    owners: HashMap<ObjKey, PathBuf>,
    /// Files that define an object another file already provides: read again when it goes.
    contested: HashMap<ObjKey, BTreeSet<PathBuf>>,
    /// Changes gathered from the files read for one event, applied to the index together so
    /// that an object moving between files (or a renamed directory) never disappears.
    batch: Option<Batch>,
}

/// Index changes and refusals gathered from several files, applied in one step.
#[derive(Debug, Default)]
struct Batch {
    apply: Vec<Object>,
    delete: Vec<ObjKey>,
    /// Where each applied object comes from: file, document number, and whether that file
    /// already provided it (then a refusal keeps its last good version).
    origin: HashMap<ObjKey, (PathBuf, usize, bool)>,
    /// Each file's refusals (an empty list clears the file's earlier ones).
    errors: BTreeMap<PathBuf, Vec<ManifestError>>,
}

/// A document read from a file: its number and either an object or why not.
struct Doc {
    number: usize,
    result: Result<Object, (Option<ObjKey>, ManifestError)>,
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>, index: Arc<Mutex<Index>>, errors: ConfigErrors) -> Self {
        let root: PathBuf = root.into();
        // Events name absolute paths; so must the files read at start.
        let root = std::fs::canonicalize(&root).unwrap_or(root);
        Self {
            root,
            index,
            errors,
            files: HashMap::new(),
            owners: HashMap::new(),
            contested: HashMap::new(),
            batch: None,
        }
    }

    /// Opens a batch unless one is open; true when the caller must commit it.
    fn begin(&mut self) -> bool {
        let opened = self.batch.is_none();
        if opened {
            self.batch = Some(Batch::default());
        }
        opened
    }

    fn batch(&mut self) -> &mut Batch {
        self.batch.get_or_insert_with(Batch::default)
    }

    /// Applies the open batch to the index in one step and reports each file's refusals. An
    /// object the index refuses keeps its last good version if its file provided one before.
    fn commit(&mut self) {
        let Some(batch) = self.batch.take() else {
            return;
        };
        let refused = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply_batch(batch.apply, &batch.delete);
        let mut errors = batch.errors;
        for (key, e) in refused {
            let Some((path, document, owned_before)) = batch.origin.get(&key) else {
                continue;
            };
            if !owned_before {
                if let Some(keys) = self.files.get_mut(path) {
                    keys.retain(|k| k != &key);
                }
                if self.owners.get(&key) == Some(path) {
                    self.owners.remove(&key);
                }
            }
            errors.entry(path.clone()).or_default().push(ManifestError {
                source: path.display().to_string(),
                document: *document,
                kind: Some(key.kind.to_string()),
                name: Some(key.name.clone()),
                field: e.field,
                reason: e.reason,
            });
        }
        for (path, mut errs) in errors {
            errs.sort_by_key(|e| e.document);
            for err in &errs {
                warn!(%err, "manifest refused");
            }
            self.errors.set(&path.display().to_string(), errs);
        }
    }

    /// Reads every manifest below the root.
    pub fn load_all(&mut self) -> Result<(), DirError> {
        let found = list_manifests(&self.root)?;
        let own = self.begin();
        let known: Vec<PathBuf> = self.files.keys().cloned().collect();
        for gone in known.iter().filter(|p| !found.contains(*p)) {
            self.reload(gone);
        }
        for path in &found {
            self.reload(path);
        }
        if own {
            self.commit();
        }
        Ok(())
    }

    /// Re-reads one file (or forgets it, if it is gone) and applies the difference.
    pub fn reload(&mut self, path: &Path) {
        let own = self.begin();
        self.plan(path);
        if own {
            self.commit();
        }
    }

    /// Reads one file and adds its difference to the open batch.
    fn plan(&mut self, path: &Path) {
        let source = path.display().to_string();
        let docs = match std::fs::read_to_string(path) {
            Ok(text) => parse_file(&text, &source),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(path);
                return;
            }
            Err(e) => {
                // Unreadable right now: keep what the file gave before.
                let err = ManifestError {
                    source: source.clone(),
                    document: 0,
                    kind: None,
                    name: None,
                    field: String::new(),
                    reason: format!("cannot read file: {e}"),
                };
                self.batch().errors.insert(path.to_path_buf(), vec![err]);
                return;
            }
        };
        let docs = match docs {
            Ok(docs) => docs,
            Err(err) => {
                // The YAML itself is broken, so no document can be told apart: keep them all.
                self.batch().errors.insert(path.to_path_buf(), vec![*err]);
                return;
            }
        };
        let old: HashSet<ObjKey> = self
            .files
            .get(path)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let mut keep = Vec::new();
        let mut apply = Vec::new();
        let mut errors = Vec::new();
        let mut doc_of: HashMap<ObjKey, usize> = HashMap::new();
        for doc in docs {
            match doc.result {
                Ok(obj) => {
                    let key = obj.key();
                    let duplicate = |reason: String| ManifestError {
                        source: source.clone(),
                        document: doc.number,
                        kind: Some(key.kind.to_string()),
                        name: Some(key.name.clone()),
                        field: "metadata.name".into(),
                        reason,
                    };
                    if let Some(owner) = self.owners.get(&key).filter(|o| o.as_path() != path) {
                        errors.push(duplicate(format!(
                            "{key} is already defined in {}",
                            owner.display()
                        )));
                        self.contested
                            .entry(key.clone())
                            .or_default()
                            .insert(path.to_path_buf());
                        continue;
                    }
                    if doc_of.insert(key.clone(), doc.number).is_some() {
                        errors.push(duplicate(format!("{key} is defined twice in this file")));
                        continue;
                    }
                    keep.push(key);
                    apply.push(obj);
                }
                Err((key, err)) => {
                    // Keep the last good version of a refused object this file provided.
                    if let Some(key) = key.filter(|k| old.contains(k)) {
                        keep.push(key);
                    }
                    errors.push(err);
                }
            }
        }
        let keep_set: HashSet<&ObjKey> = keep.iter().collect();
        let delete: Vec<ObjKey> = old
            .iter()
            .filter(|k| !keep_set.contains(k))
            .cloned()
            .collect();
        let batch = self.batch();
        for obj in apply {
            let key = obj.key();
            let document = doc_of.get(&key).copied().unwrap_or_default();
            batch.origin.insert(
                key.clone(),
                (path.to_path_buf(), document, old.contains(&key)),
            );
            batch.apply.push(obj);
        }
        batch.delete.extend(delete.iter().cloned());
        for key in &delete {
            self.owners.remove(key);
        }
        let retry = self.released(&delete);
        for key in &keep {
            self.owners.insert(key.clone(), path.to_path_buf());
        }
        self.batch().errors.insert(path.to_path_buf(), errors);
        info!(file = %source, objects = keep.len(), deleted = delete.len(), "manifest loaded");
        self.files.insert(path.to_path_buf(), keep);
        for p in retry.into_iter().filter(|p| p.as_path() != path) {
            self.reload(&p);
        }
    }

    /// Files that lost a race for one of `keys`, now free.
    fn released(&mut self, keys: &[ObjKey]) -> BTreeSet<PathBuf> {
        keys.iter()
            .filter_map(|k| self.contested.remove(k))
            .flatten()
            .collect()
    }

    fn forget(&mut self, path: &Path) {
        let Some(keys) = self.files.remove(path) else {
            return;
        };
        for key in &keys {
            self.owners.remove(key);
        }
        let batch = self.batch();
        batch.delete.extend(keys.iter().cloned());
        batch.errors.insert(path.to_path_buf(), vec![]);
        info!(file = %path.display(), deleted = keys.len(), "manifest removed");
        for p in self.released(&keys) {
            self.reload(&p);
        }
    }

    /// Loads everything, then follows changes until the returned handle is dropped.
    pub fn watch(mut self) -> Result<WatchHandle, DirError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
        let mut watcher = notify::recommended_watcher(move |ev| {
            let _ = tx.send(ev);
        })
        .map_err(|source| DirError::Watch {
            path: self.root.clone(),
            source,
        })?;
        watcher
            .watch(&self.root, RecursiveMode::Recursive)
            .map_err(|source| DirError::Watch {
                path: self.root.clone(),
                source,
            })?;
        self.load_all()?;
        let follows_writes = notify::RecommendedWatcher::kind() == notify::WatcherKind::Inotify;
        let task = tokio::spawn(async move {
            let root = self.root.clone();
            let read = move |p: &Path| is_manifest(p) && !below_hidden(&root, p);
            while let Some(first) = rx.recv().await {
                // Editors write a file in several steps; take them as one change.
                let mut group = Settle::new(tokio::time::Instant::now(), follows_writes);
                group.saw(&first, tokio::time::Instant::now(), &read);
                let mut events = vec![first];
                while let Ok(Some(ev)) = tokio::time::timeout_at(group.deadline(), rx.recv()).await
                {
                    group.saw(&ev, tokio::time::Instant::now(), &read);
                    events.push(ev);
                }
                self.on_events(events);
            }
        });
        Ok(WatchHandle {
            _watcher: watcher,
            task,
        })
    }

    fn on_events(&mut self, events: Vec<notify::Result<notify::Event>>) {
        let mut paths = BTreeSet::new();
        let mut rescan = false;
        for ev in events {
            match ev {
                Ok(ev) => {
                    // Reading a file makes access events too: only writes are news.
                    if let notify::EventKind::Access(a) = ev.kind
                        && a != notify::event::AccessKind::Close(notify::event::AccessMode::Write)
                    {
                        continue;
                    }
                    rescan |= ev.need_rescan();
                    for p in ev.paths {
                        if below_hidden(&self.root, &p) {
                            // A ConfigMap volume swaps its `..data` link to publish an update.
                            rescan |= relative(&self.root, &p).any(|c| c.starts_with(".."));
                        } else if is_manifest(&p) {
                            paths.insert(p);
                        } else {
                            // A directory came or went, or was renamed: look at everything.
                            rescan |= p.is_dir()
                                || (!p.exists() && self.files.keys().any(|f| f.starts_with(&p)));
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "file watch error; rescanning");
                    rescan = true;
                }
            }
        }
        // One index update for everything this group of events changed.
        let own = self.begin();
        for p in &paths {
            self.reload(p);
        }
        if rescan && let Err(e) = self.load_all() {
            warn!(error = %e, "rescan failed");
        }
        if own {
            self.commit();
        }
    }
}

/// A group of file events that makes one change: it ends once files have been quiet for
/// [`Settle::QUIET`] after its last event with no manifest left open for writing (an editor's
/// save of several writes, or an atomic rename, comes within microseconds; a writer that stalls
/// between truncating a manifest and writing it keeps the group open, up to the cap), or
/// [`Settle::MAX`] after its first (a directory written to without pause still applies).
/// Writes are followed only where the watch reports files closed (inotify, on Linux); other
/// backends (FSEvents, kqueue, polling) report none, and there the 2 ms of quiet alone ends it.
#[derive(Debug)]
struct Settle {
    first: tokio::time::Instant,
    last: tokio::time::Instant,
    /// Manifests written to and not closed yet.
    writing: HashSet<PathBuf>,
    follows_writes: bool,
}

impl Settle {
    const QUIET: Duration = Duration::from_millis(2);
    const MAX: Duration = Duration::from_millis(100);

    /// `follows_writes`: the watch reports files closed after writing.
    fn new(at: tokio::time::Instant, follows_writes: bool) -> Self {
        Settle {
            first: at,
            last: at,
            writing: HashSet::new(),
            follows_writes,
        }
    }

    /// Takes event `ev`, seen at `at`; `read` says which paths the source reads (a write to
    /// another file, a swap file or a log, never holds a change back).
    fn saw(
        &mut self,
        ev: &notify::Result<notify::Event>,
        at: tokio::time::Instant,
        read: &dyn Fn(&Path) -> bool,
    ) {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, ModifyKind};
        self.last = self.last.max(at);
        let Ok(ev) = ev else { return };
        match ev.kind {
            // Written to (truncated, or data): open until closed. A file created and not
            // written to (a link, `touch`) is not.
            EventKind::Modify(ModifyKind::Data(_)) if self.follows_writes => {
                self.writing
                    .extend(ev.paths.iter().filter(|p| read(p)).cloned());
            }
            // Closed, removed, or renamed (whatever it was, it is not written under this name
            // any more).
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_)) => {
                for p in &ev.paths {
                    self.writing.remove(p);
                }
            }
            _ => {}
        }
    }

    /// When the group ends unless another event comes first.
    fn deadline(&self) -> tokio::time::Instant {
        let max = self.first + Self::MAX;
        if self.writing.is_empty() {
            (self.last + Self::QUIET).min(max)
        } else {
            max
        }
    }
}

/// Keeps the watch alive.
#[derive(Debug)]
pub struct WatchHandle {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The components of `p` below `root`, as strings.
fn relative<'a>(root: &Path, p: &'a Path) -> impl Iterator<Item = &'a str> {
    p.strip_prefix(root)
        .unwrap_or(p)
        .components()
        .filter_map(|c| c.as_os_str().to_str())
}

/// Whether `p` is, or is inside, a hidden file or directory below `root`.
fn below_hidden(root: &Path, p: &Path) -> bool {
    relative(root, p).any(|c| c.starts_with('.'))
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn is_manifest(p: &Path) -> bool {
    !is_hidden(p) && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn list_manifests(root: &Path) -> Result<BTreeSet<PathBuf>, DirError> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A subdirectory removed while we look: its files are gone, nothing to read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
            Err(source) => {
                return Err(DirError::Read {
                    path: dir.clone(),
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if is_hidden(&p) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if is_manifest(&p) {
                out.insert(p);
            }
        }
    }
    Ok(out)
}

/// Splits a file into documents and parses each. `Err` when the YAML stream itself is broken.
fn parse_file(text: &str, source: &str) -> Result<Vec<Doc>, Box<ManifestError>> {
    let mut out = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        let value = match serde_json::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                return Err(Box::new(ManifestError {
                    source: source.to_string(),
                    document: number,
                    kind: None,
                    name: None,
                    field: String::new(),
                    reason: format!("invalid YAML: {e}"),
                }));
            }
        };
        if value.is_null() {
            continue;
        }
        let items = if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
            value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default()
        } else {
            vec![value]
        };
        for item in items {
            let identity = doc_identity(&item, DEFAULT_NAMESPACE);
            let result = parse_doc(item, DEFAULT_NAMESPACE).map_err(|e| {
                (
                    identity.clone(),
                    ManifestError {
                        source: source.to_string(),
                        document: number,
                        kind: identity.as_ref().map(|k| k.kind.to_string()),
                        name: identity.as_ref().map(|k| k.name.clone()),
                        field: e.field,
                        reason: e.reason,
                    },
                )
            });
            out.push(Doc { number, result });
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "dir_tests.rs"]
mod tests;
