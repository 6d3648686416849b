//! Application probes the proxy answers for the kubelet. Under STRICT mTLS the kubelet's
//! plaintext probes cannot reach an app through its inbound port, so injection points each
//! `httpGet`, `tcpSocket` and `grpc` probe of an app container at the proxy's plaintext health
//! port (`/app-health/<container>/<livez|readyz|startupz>` on 15020), and gives the proxy what the
//! original probe checked (`MESH_APP_PROBES`, this module's JSON). The proxy runs that check
//! against the app and answers with its result. The original probes are kept in the pod's
//! `mesh.dev/app-probes` annotation, from which uninjection restores them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The three probes of a container: the pod spec's field and the health path's last segment.
pub const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// The prefix of the health paths the proxy serves.
pub const PATH_PREFIX: &str = "/app-health/";

/// The kubelet's default `timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 1;

/// The health path of `container`'s probe of kind `segment` (`livez`, `readyz`, `startupz`).
pub fn path(container: &str, segment: &str) -> String {
    format!("{PATH_PREFIX}{container}/{segment}")
}

/// What the proxy checks for one health path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    #[serde(flatten)]
    pub check: Check,
    /// How long the check may take, as the original probe's `timeoutSeconds`.
    pub timeout_seconds: u32,
}

/// A probe's handler, with a named port already resolved to the container's port number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Check {
    /// A GET the app must answer with a status from 200 to 399.
    HttpGet {
        path: String,
        port: u16,
        /// `HTTP` or `HTTPS` (certificate not verified, as the kubelet does).
        scheme: Scheme,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        http_headers: Vec<Header>,
    },
    /// A TCP connection the app must accept.
    TcpSocket { port: u16 },
    /// A `grpc.health.v1.Health/Check` the app must answer with `SERVING`.
    Grpc {
        port: u16,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        service: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// Every health path of a pod and its check.
pub type AppProbes = BTreeMap<String, AppProbe>;

/// Reads `MESH_APP_PROBES`; an error names what is wrong and where.
pub fn parse(json: &str) -> Result<AppProbes, String> {
    let probes: AppProbes = serde_json::from_str(json).map_err(|e| e.to_string())?;
    for p in probes.keys() {
        let rest = p.strip_prefix(PATH_PREFIX).unwrap_or_default();
        let ok = rest.split_once('/').is_some_and(|(c, k)| {
            !c.is_empty() && !c.contains('/') && KINDS.iter().any(|(_, s)| *s == k)
        });
        if !ok {
            return Err(format!(
                "{p:?} is not a health path ({PATH_PREFIX}<container>/<livez|readyz|startupz>)"
            ));
        }
    }
    Ok(probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_round_trips_and_bad_paths_are_named() {
        let mut probes = AppProbes::new();
        probes.insert(
            path("app", "readyz"),
            AppProbe {
                check: Check::HttpGet {
                    path: "/healthz".into(),
                    port: 8080,
                    scheme: Scheme::Http,
                    http_headers: vec![Header {
                        name: "X-Probe".into(),
                        value: "1".into(),
                    }],
                },
                timeout_seconds: 3,
            },
        );
        probes.insert(
            path("app", "livez"),
            AppProbe {
                check: Check::Grpc {
                    port: 9090,
                    service: String::new(),
                },
                timeout_seconds: 1,
            },
        );
        let json = serde_json::to_string(&probes).expect("json");
        assert!(
            json.contains(r#""/app-health/app/readyz":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP""#),
            "{json}"
        );
        assert_eq!(parse(&json), Ok(probes));
        let err = parse(r#"{"/ready":{"tcpSocket":{"port":1},"timeoutSeconds":1}}"#)
            .expect_err("not a health path");
        assert!(err.contains("\"/ready\" is not a health path"), "{err}");
        let err =
            parse(r#"{"/app-health/a/readyz":{"tcpSocket":{"port":"http"},"timeoutSeconds":1}}"#)
                .expect_err("a port name");
        assert!(err.contains("invalid type"), "{err}");
    }
}
