//! Access logs: one JSON line per request, with the fields of Envoy's default format (named
//! as Istio's JSON encoding names them) and the mesh's own (direction, workloads, trace).
//! Off unless `--access-log` is set; lines go to their own target (stdout or a file), never
//! mixed with the proxy's log. The reference is `docs/reference/proxy.md#access-logs`.

use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::mpsc;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
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

/// How many lines may wait for the writer; past that, lines are dropped and counted. An
/// entry is well under 1 KiB, so the queue holds a few MiB at most.
pub const QUEUE: usize = 4096;

/// Where lines go: a thread of its own writes them, so a slow disk never holds up a request
/// nor the runtime, and a disk slower than the requests costs lines, not memory.
#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::SyncSender<Entry>,
    dropped: Counter,
}

#[derive(Debug, thiserror::Error)]
#[error("--access-log {path:?}: {source}")]
pub struct AccessLogError {
    path: PathBuf,
    source: std::io::Error,
}

impl AccessLog {
    /// Opens `path` (`-`: stdout) and starts the writer; lines that find the queue full count
    /// in `dropped`.
    pub fn open(path: &Path, dropped: Counter) -> Result<Self, AccessLogError> {
        let err = |source| AccessLogError {
            path: path.to_path_buf(),
            source,
        };
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(err)?;
            Box::new(f)
        };
        let (log, _) = Self::start(out, path.to_path_buf(), QUEUE, dropped).map_err(err)?;
        Ok(log)
    }

    /// The writer's thread ends when the log is dropped, after the lines still queued.
    fn start(
        out: Box<dyn Write + Send>,
        path: PathBuf,
        queue: usize,
        dropped: Counter,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx, out, &path))?;
        Ok((AccessLog { tx, dropped }, writer))
    }

    pub fn log(&self, e: Entry) {
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send(e) {
            self.dropped.inc();
        }
    }
}

fn write_lines(rx: &mpsc::Receiver<Entry>, out: Box<dyn Write + Send>, path: &Path) {
    let mut out = std::io::BufWriter::new(out);
    let mut failed = false;
    let mut report = |err: &dyn std::fmt::Display| {
        if !failed {
            warn!(path = %path.display(), error = %err, "writing the access log");
            failed = true;
        }
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Everything waiting goes out in one write.
        while let Some(e) = next {
            if let Err(err) = serde_json::to_writer(&mut out, &e)
                .and_then(|()| out.write_all(b"\n").map_err(serde_json::Error::io))
            {
                report(&err);
            }
            next = rx.try_recv().ok();
        }
        if let Err(err) = out.flush() {
            report(&err);
        }
    }
}

/// `start_time`'s format: RFC 3339 in UTC with milliseconds, as Envoy writes it.
const START_TIME: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
);

/// RFC 3339 UTC with milliseconds, for `start_time`.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(START_TIME)
        // Formatting into a String fails only for a value the description cannot show (a year
        // past 9999, which `OffsetDateTime` does not hold without `large-dates`).
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
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
        let log = AccessLog::open(&path, Counter::default()).expect("opens");
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
        let bad = AccessLog::open(Path::new("/nonexistent/dir/log"), Counter::default())
            .expect_err("no dir");
        assert!(bad.to_string().contains("/nonexistent/dir/log"), "{bad}");
    }

    /// An output that holds its first write until let go, saying when it got there.
    struct Held {
        reached: Option<mpsc::Sender<()>>,
        go: mpsc::Receiver<()>,
        bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Held {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(reached) = self.reached.take() {
                let _ = reached.send(());
                let _ = self.go.recv();
            }
            self.bytes
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_writer_costs_counted_lines_not_memory() {
        let (reached, at_write) = mpsc::channel();
        let (go, wait) = mpsc::channel();
        let bytes = std::sync::Arc::default();
        let out = Held {
            reached: Some(reached),
            go: wait,
            bytes: std::sync::Arc::clone(&bytes),
        };
        let dropped = Counter::default();
        let (log, writer) =
            AccessLog::start(Box::new(out), "held".into(), 8, dropped.clone()).expect("starts");
        let entry = |code| Entry {
            response_code: code,
            ..Default::default()
        };
        // The first line is taken, and held in its write: the queue is empty again.
        log.log(entry(1));
        at_write.recv().expect("the writer writes");
        for code in 2..=14 {
            log.log(entry(code));
        }
        assert_eq!(dropped.get(), 5, "8 of 13 queued");
        go.send(()).expect("the writer waits");
        drop(log);
        writer.join().expect("the writer ends");
        let text = String::from_utf8(bytes.lock().expect("bytes").clone()).expect("utf-8");
        let codes: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("JSON")["response_code"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .collect();
        assert_eq!(codes, (1..=9).collect::<Vec<_>>(), "{text}");
    }
}
