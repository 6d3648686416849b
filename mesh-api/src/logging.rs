//! One logging setup for every binary: the filter from `MESH_LOG` (`tracing`'s `EnvFilter`
//! syntax, `info` when unset), `text` or `json` lines, and a handle that changes the filter
//! while the process runs (mesh-proxy's `/logging`). A filter or a format that does not parse
//! is refused at start, with the value named, instead of logging at another level than asked.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::consts::env;

/// How log lines are written (`--log-format`, `MESH_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where log lines go: mesh-ca's `token` prints its token on stdout, so its logs go to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {value:?}: not a log filter: {reason}")]
    Filter {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("a logger is already installed in this process")]
    Installed,
}

/// Changes the running process's filter.
#[derive(Debug, Clone)]
pub struct Reload {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl Reload {
    /// Replaces the filter with `filter` (`EnvFilter` syntax); a filter that does not parse is
    /// refused and the current one stays.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let f = parse("filter", filter).map_err(|e| e.to_string())?;
        self.handle.reload(f).map_err(|e| e.to_string())
    }
}

fn parse(what: &'static str, filter: &str) -> Result<EnvFilter, Error> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| Error::Filter {
            what,
            value: filter.to_owned(),
            reason: e.to_string(),
        })
}

/// A command-line value that is a log filter (clap's `value_parser`), checked as a process
/// given it in `MESH_LOG` would check it: the injector's filter for sidecars, say, which would
/// otherwise stop every injected proxy at start.
pub fn filter_arg(value: &str) -> Result<String, String> {
    EnvFilter::builder()
        .parse(value)
        .map(|_| value.to_owned())
        .map_err(|e| format!("not a log filter: {e}"))
}

/// The filter `MESH_LOG` asks for (`info` when unset or empty).
pub fn filter_from_env() -> String {
    std::env::var(env::LOG)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "info".into())
}

/// Installs the process's logger with the filter `MESH_LOG` asks for. Returns that filter and
/// the handle that changes it.
pub fn init(format: LogFormat, output: Output) -> Result<(String, Reload), Error> {
    let initial = filter_from_env();
    let (filter, handle) = reload::Layer::new(parse(env::LOG, &initial)?);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match (format, output) {
        (LogFormat::Text, Output::Stdout) => {
            registry.with(tracing_subscriber::fmt::layer()).try_init()
        }
        (LogFormat::Text, Output::Stderr) => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        (LogFormat::Json, Output::Stdout) => registry
            .with(tracing_subscriber::fmt::layer().json())
            .try_init(),
        (LogFormat::Json, Output::Stderr) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    installed.map_err(|_| Error::Installed)?;
    Ok((initial, Reload { handle }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum as _;

    #[test]
    fn formats_are_text_and_json_only() {
        assert_eq!(LogFormat::from_str("json", false), Ok(LogFormat::Json));
        assert_eq!(LogFormat::from_str("text", false), Ok(LogFormat::Text));
        assert!(LogFormat::from_str("yaml", false).is_err());
        assert!(LogFormat::from_str("JSON", false).is_err());
    }

    #[test]
    fn a_filter_that_does_not_parse_is_named() {
        assert!(parse(env::LOG, "mesh_proxy=debug,info").is_ok());
        assert!(filter_arg("warn").is_ok() && filter_arg("mesh=loud").is_err());
        let err = parse(env::LOG, "mesh_proxy=loud")
            .expect_err("not a level")
            .to_string();
        assert!(
            err.starts_with("MESH_LOG \"mesh_proxy=loud\": not a log filter"),
            "{err}"
        );
    }
}
