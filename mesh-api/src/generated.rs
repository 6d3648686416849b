//! Checked-in generated files (the chart's CRDs and values schema, the controller's wire
//! schema): each has a test that renders what the file should hold and calls [`check`].

use std::path::Path;

/// For tests: with `MESH_UPDATE_GENERATED` set (as `scripts/generate` runs them), writes `want`
/// to `path`; then panics unless `path` holds exactly `want`, naming the file and the script
/// that regenerates it.
pub fn check(path: &Path, want: &str) {
    if std::env::var_os("MESH_UPDATE_GENERATED").is_some() {
        std::fs::write(path, want).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "{} is stale: run scripts/generate",
        path.display()
    );
}
