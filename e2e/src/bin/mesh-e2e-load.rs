//! The e2e scenarios' load generator, run inside a client pod: HTTP/1.1 GETs to one URL at a
//! fixed rate (open loop: a slow answer does not delay the next request) or as fast as
//! `--concurrency` connections allow, until `--requests` were sent or `--duration` passed,
//! or until SIGTERM (the requests in flight then finish, and the report is printed).
//! Prints one JSON object: counts by answer body (its first line) and by failure, and for
//! each second how many answers each body got.
//!
//! mesh-e2e-load --url http://10.96.0.10:9080/ --requests 2000 [--rate 200] [--concurrency 8]
//!               [--method POST] [--header 'name: value']...
//! mesh-e2e-load sleep-forever   # a container that waits for `kubectl exec`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Debug, Default, serde::Serialize)]
struct Report {
    sent: u64,
    ok: u64,
    failed: u64,
    /// Answers by the first line of their body (`reviews v1`), 2xx only.
    by_body: BTreeMap<String, u64>,
    /// Failures by kind (`status 503`, `connect: ...`).
    errors: BTreeMap<String, u64>,
    /// Per second since the start, by when requests were sent: answers by body, failures as
    /// `!`.
    seconds: Vec<BTreeMap<String, u64>>,
    /// When the last request that got each answer (body, or `!` for failures) was sent, in
    /// Unix milliseconds.
    last_sent_unix_ms: BTreeMap<String, u64>,
    /// When the first request was sent, in Unix milliseconds.
    start_unix_ms: u64,
    elapsed_ms: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Args {
    url: hyper::Uri,
    requests: u64,
    rate: Option<f64>,
    duration: Option<Duration>,
    concurrency: usize,
    method: hyper::Method,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
}

fn parse() -> anyhow::Result<Args> {
    let mut url = None;
    let mut requests = u64::MAX;
    let mut rate = None;
    let mut duration = None;
    let mut concurrency = 8;
    let mut method = hyper::Method::GET;
    let mut headers = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = Some(value()?.parse().context("--url")?),
            "--requests" => requests = value()?.parse().context("--requests")?,
            "--rate" => rate = Some(value()?.parse().context("--rate")?),
            "--duration" => {
                duration = Some(
                    mesh_api::duration::parse(&value()?)
                        .map_err(|e| anyhow::anyhow!("--duration: {e}"))?,
                )
            }
            "--concurrency" => concurrency = value()?.parse().context("--concurrency")?,
            "--method" => method = value()?.parse().context("--method")?,
            "--header" => {
                let h = value()?;
                let (name, v) = h
                    .split_once(':')
                    .with_context(|| format!("--header {h:?}: expected 'name: value'"))?;
                headers.push((
                    name.trim().parse().context("--header name")?,
                    v.trim().parse().context("--header value")?,
                ));
            }
            other => bail!("unknown flag {other:?}"),
        }
    }
    let Some(url) = url else {
        bail!("--url is required");
    };
    if requests == u64::MAX && duration.is_none() {
        bail!("give --requests or --duration");
    }
    Ok(Args {
        url,
        requests,
        rate,
        duration,
        concurrency,
        method,
        headers,
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(url: &hyper::Uri) -> anyhow::Result<Sender> {
    let host = url.host().context("--url has no host")?;
    let port = url.port_u16().unwrap_or(80);
    let tcp = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .context("connect: timed out")?
    .context("connect")?;
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

/// One request on a pooled connection (opened again when it broke): the answer's key.
async fn one(args: &Args, conn: &mut Option<Sender>) -> Result<String, String> {
    let url = &args.url;
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = Some(connect(url).await.map_err(|e| format!("{e:#}"))?);
    }
    let Some(tx) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let mut req = hyper::Request::builder()
        .method(args.method.clone())
        .uri(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            hyper::header::HOST,
            url.authority().map_or("", |a| a.as_str()),
        );
    for (name, value) in &args.headers {
        req = req.header(name, value);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok::<_, String>((status, body.to_bytes()))
    })
    .await;
    match answer {
        Ok(Ok((s, body))) if s.is_success() => Ok(String::from_utf8_lossy(&body)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()),
        Ok(Ok((s, _))) => {
            *conn = None;
            Err(format!("status {}", s.as_u16()))
        }
        Ok(Err(e)) => {
            *conn = None;
            Err(e)
        }
        Err(_) => {
            *conn = None;
            Err("timeout 5s".into())
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // In a pod of the kind suite, the container idles until the scenario execs a load into it.
    if std::env::args().nth(1).as_deref() == Some("sleep-forever") {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
    let args = Arc::new(parse()?);
    let report = Arc::new(Mutex::new(Report {
        start_unix_ms: unix_ms(),
        ..Report::default()
    }));
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + d);
    let next = Arc::new(Mutex::new(0u64));
    // SIGTERM ends the load early: no request starts after it.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if term.recv().await.is_some() {
            let _ = stop.send(true);
        }
    });
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (args, report, next) = (args.clone(), report.clone(), next.clone());
        let mut stopped = stopped.clone();
        workers.push(tokio::spawn(async move {
            let mut conn = None;
            loop {
                // Take the next request's number; with a rate, wait for its slot.
                let n = {
                    let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                    if *n >= args.requests {
                        return;
                    }
                    *n += 1;
                    *n - 1
                };
                if let Some(rate) = args.rate {
                    let at = start + Duration::from_secs_f64(n as f64 / rate);
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        _ = stopped.wait_for(|s| *s) => return,
                    }
                }
                if deadline.is_some_and(|d| Instant::now() >= d) || *stopped.borrow() {
                    return;
                }
                let sent_at = unix_ms();
                // Requests count in the second they were sent in.
                let second = start.elapsed().as_secs() as usize;
                let result = one(&args, &mut conn).await;
                let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                r.sent += 1;
                while r.seconds.len() <= second {
                    r.seconds.push(BTreeMap::new());
                }
                let key = result.as_ref().map_or("!".to_owned(), Clone::clone);
                let last = r.last_sent_unix_ms.entry(key).or_default();
                *last = (*last).max(sent_at);
                match result {
                    Ok(body) => {
                        r.ok += 1;
                        *r.seconds[second].entry(body.clone()).or_default() += 1;
                        *r.by_body.entry(body).or_default() += 1;
                    }
                    Err(e) => {
                        r.failed += 1;
                        *r.seconds[second].entry("!".into()).or_default() += 1;
                        *r.errors.entry(e).or_default() += 1;
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    println!("{}", serde_json::to_string(&*r)?);
    Ok(())
}
