//! Access logs: one JSON line per request, with the fields of Envoy's default format (named
//! as Istio's JSON encoding names them) and the mesh's own (direction, workloads, trace).
//! Off unless `--access-log` is set; lines go to their own target (stdout or a file), never
//! mixed with the proxy's log. The reference is `docs/reference/proxy.md#access-logs`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

/// One request, as logged.
#[derive(Debug, Default, Serialize)]
pub struct Entry {
    /// RFC 3339, when the request arrived.
    pub start_time: String,
    pub method: String,
    pub path: String,
    pub protocol: String,
    /// 0 when no response came back.
    pub response_code: u16,
    /// Envoy's response flags (`UF`, `UH`, `UT`, `NR`, `UO`, `NC`, `DC`), or `-`.
    pub response_flags: String,
    pub grpc_status: Option<u8>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Milliseconds from the request to the end of the response.
    pub duration: u64,
    /// Milliseconds from the request to the response headers.
    pub upstream_service_time: Option<u64>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: Option<String>,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<String>,
    pub route_name: Option<String>,
    pub downstream_local_address: String,
    pub direction: &'static str,
    pub source_workload: String,
    pub source_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_principal: String,
    pub trace_id: Option<String>,
}

/// Where lines go: a task writes them, so a slow disk never holds up a request.
#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::UnboundedSender<Entry>,
}

#[derive(Debug, thiserror::Error)]
#[error("--access-log {path:?}: {source}")]
pub struct AccessLogError {
    path: PathBuf,
    source: std::io::Error,
}

impl AccessLog {
    /// Opens `path` (`-`: stdout) and starts the writer task. Must run inside the runtime.
    pub fn open(path: &Path) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| AccessLogError {
                    path: path.to_path_buf(),
                    source,
                })?;
            Box::new(f)
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_lines(rx, out, path.to_path_buf()));
        Ok(AccessLog { tx })
    }

    pub fn log(&self, e: Entry) {
        let _ = self.tx.send(e);
    }
}

async fn write_lines(
    mut rx: mpsc::UnboundedReceiver<Entry>,
    out: Box<dyn Write + Send>,
    path: PathBuf,
) {
    let mut out = std::io::BufWriter::new(out);
    let mut failed = false;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Everything waiting goes out in one write.
        while let Some(e) = next {
            if let Err(err) = serde_json::to_writer(&mut out, &e)
                .and_then(|()| out.write_all(b"\n").map_err(serde_json::Error::io))
                && !failed
            {
                warn!(path = %path.display(), error = %err, "writing the access log");
                failed = true;
            }
            next = rx.try_recv().ok();
        }
        if let Err(err) = out.flush()
            && !failed
        {
            warn!(path = %path.display(), error = %err, "writing the access log");
            failed = true;
        }
    }
}

/// RFC 3339 UTC with milliseconds, for `start_time`.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_692_247_190);
        assert_eq!(rfc3339(t), "2026-11-26T11:24:07.190Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[tokio::test]
    async fn lines_reach_the_file_as_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&path).expect("opens");
        for code in [200, 503] {
            log.log(Entry {
                method: "GET".into(),
                response_code: code,
                ..Default::default()
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect();
            if lines.len() == 2 {
                assert_eq!(lines[1]["response_code"], 503);
                assert_eq!(lines[0]["method"], "GET");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let bad = AccessLog::open(Path::new("/nonexistent/dir/log")).expect_err("no dir");
        assert!(bad.to_string().contains("/nonexistent/dir/log"), "{bad}");
    }
}
