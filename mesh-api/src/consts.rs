//! Names and numbers that more than one process must agree on. Every default port here is listed
//! in `docs/architecture.md`; change both together.

/// Default ports (see the ports table in `docs/architecture.md`).
pub mod ports {
    /// Proxy admin (`/config_dump`, `/logging`, `/shutdown`), localhost only.
    pub const PROXY_ADMIN: u16 = 15000;
    /// Proxy outbound, transparent (iptables REDIRECT).
    pub const PROXY_OUTBOUND: u16 = 15001;
    /// Proxy inbound, transparent.
    pub const PROXY_INBOUND: u16 = 15006;
    /// Proxy `/metrics`, `/ready`, `/live` on the pod address.
    pub const PROXY_METRICS: u16 = 15020;
    /// Proxy outbound explicit HTTP proxy that routes by Host (local mesh).
    pub const PROXY_OUTBOUND_HTTP: u16 = 15080;
    /// Controller xDS (gRPC).
    pub const CONTROLLER_XDS: u16 = 15010;
    /// Controller metrics and debug API.
    pub const CONTROLLER_ADMIN: u16 = 15014;
    /// Controller admission webhook.
    pub const CONTROLLER_WEBHOOK: u16 = 15017;
    /// mesh-ca certificate service (gRPC over TLS).
    pub const CA: u16 = 15012;
    /// mesh-ca metrics and readiness.
    pub const CA_ADMIN: u16 = 15013;

    /// A sidecar's own ports in its pod. Inbound traffic is never handed to one of them on
    /// localhost, whatever a Service's `targetPort` says: it would reach the proxy itself (its
    /// admin's `/shutdown` and `/logging`) rather than the app.
    pub const SIDECAR: [u16; 5] = [
        PROXY_ADMIN,
        PROXY_OUTBOUND,
        PROXY_INBOUND,
        PROXY_METRICS,
        PROXY_OUTBOUND_HTTP,
    ];
}

/// Identities of the mesh's own components.
pub mod identity {
    /// Namespace the control plane runs in.
    pub const SYSTEM_NAMESPACE: &str = "mesh-system";
    /// Service account (and so SPIFFE ID `.../ns/mesh-system/sa/mesh-ca`) of the CA.
    pub const CA_SERVICE_ACCOUNT: &str = "mesh-ca";
    /// Service account of the controller.
    pub const CONTROLLER_SERVICE_ACCOUNT: &str = "mesh-controller";
    /// The headless Service that lists every ready controller replica's xDS address: sidecars
    /// resolve it and fail over between the replicas.
    pub const CONTROLLER_XDS_SERVICE: &str = "mesh-controller-xds";
    /// Who may read the controller's debug API: a user RBAC allows verb [`DEBUG_VERB`] on
    /// resource [`DEBUG_RESOURCE`] of API group [`DEBUG_GROUP`] in the control plane's
    /// namespace, as the chart's ClusterRole [`READER_ROLE`] does where it is bound.
    pub const DEBUG_VERB: &str = "get";
    pub const DEBUG_GROUP: &str = "mesh.dev";
    pub const DEBUG_RESOURCE: &str = "debug";
    pub const READER_ROLE: &str = "mesh-reader";
    /// The audience a token for the controller's debug API is bound to (`kubectl create token
    /// SA --audience mesh-controller`), so that it is no key to the API server.
    pub const CONTROLLER_AUDIENCE: &str = "mesh-controller";

    /// The service account a Gateway's proxies run as (in the Gateway's namespace): only a
    /// proxy with its certificate is served the Gateway's listeners and certificates.
    pub fn gateway_service_account(gateway: &str) -> String {
        format!("{gateway}-gateway")
    }

    /// Where sidecars reach the controllers' xDS in a control plane in namespace `ns`.
    pub fn xds_addr(ns: &str) -> String {
        format!(
            "{CONTROLLER_XDS_SERVICE}.{ns}.svc:{}",
            super::ports::CONTROLLER_XDS
        )
    }

    /// Where sidecars reach mesh-ca in a control plane in namespace `ns`.
    pub fn ca_addr(ns: &str) -> String {
        format!("{CA_SERVICE_ACCOUNT}.{ns}.svc:{}", super::ports::CA)
    }
}

/// Labels and annotations, all under the `mesh.dev/` prefix.
pub mod labels {
    /// On a namespace or pod: `enabled` adds the sidecar.
    pub const INJECT: &str = "mesh.dev/inject";
    /// On a pod: `"true"` when it runs mesh-proxy (set by injection, or by hand in the local
    /// mesh). Proxies then talk HTTP/2 to it for its declared HTTP/1 ports, multiplexing requests.
    pub const PROXY: &str = "mesh.dev/proxy";
    /// On a namespace: `STRICT` (mesh TLS only) or `PERMISSIVE` (mesh TLS and plaintext) for
    /// the proxies in it; the controller's `--mtls-mode` otherwise.
    pub const MTLS_MODE: &str = "mesh.dev/mtls-mode";
    /// On a namespace: `allow`, `deny` or `authenticated`, what its workloads do with a request
    /// no ALLOW policy decides; the controller's `--authz-default` otherwise.
    pub const AUTHZ_DEFAULT: &str = "mesh.dev/authz-default";
    /// Annotation on a pod: `"false"` lets the app's containers start as soon as the proxy has
    /// started instead of once it is ready (its config and identity in hand). Default `"true"`.
    pub const HOLD_APP: &str = "mesh.dev/hold-app-until-proxy-ready";
    /// Annotation on a pod: `"false"` leaves its containers' probes as written instead of
    /// pointing them at the proxy's health port. Default `"true"`.
    pub const REWRITE_APP_PROBES: &str = "mesh.dev/rewrite-app-probes";
    /// Annotation injection sets on a pod: the probes it rewrote, as written, by container
    /// (`{"app": {"readinessProbe": {...}}}`); uninjection puts them back.
    pub const APP_PROBES: &str = "mesh.dev/app-probes";
    /// Annotation on a pod: `"false"` gives its sidecar every Service instead of the ones its
    /// workload uses (mesh-proxy `--scoped false`). Default `"true"`.
    pub const SCOPED: &str = "mesh.dev/scoped";
    /// Annotation on a pod or a namespace: the Services its workloads call (`name`,
    /// `namespace/name`, `namespace/*`, separated by commas or spaces), which scoped proxies
    /// are given up front instead of looking each one up on its first connection.
    pub const DEPENDENCIES: &str = "mesh.dev/dependencies";
    /// Annotation on a Rollout: `meshctl route resume` sets a new value (a timestamp) to
    /// resume a rollout that a change of the route's weights paused.
    pub const RESUME: &str = "mesh.dev/resume";
    /// Annotation on a Rollout: which release it is (`meshctl route rollout` sets a timestamp),
    /// so a rollout written again for the same backends starts over.
    pub const RELEASE: &str = "mesh.dev/release";
    /// The standard label an EndpointSlice carries to name its Service.
    pub const ENDPOINTSLICE_SERVICE_NAME: &str = "kubernetes.io/service-name";
}

/// Keys of the Envoy `Node.metadata` struct that a proxy (ours or a stock Envoy) sends to the
/// controller. They tell the controller which listeners to give that proxy and where to bind them,
/// so several proxies can share one host in the local mesh.
pub mod node_metadata {
    /// `"true"` when iptables sends traffic to the proxy: it then gets the transparent outbound
    /// (15001) and inbound (15006) listeners. Absent or `"false"`: it gets only the explicit
    /// outbound HTTP listener.
    pub const TRANSPARENT: &str = "mesh.dev/transparent";
    /// Address (`host:port`) for the explicit outbound HTTP listener; default `127.0.0.1:15080`.
    pub const OUTBOUND_HTTP_ADDR: &str = "mesh.dev/outbound-http-addr";
    /// Port of the transparent outbound listener; default 15001.
    pub const OUTBOUND_PORT: &str = "mesh.dev/outbound-port";
    /// Port of the transparent inbound listener; default 15006.
    pub const INBOUND_PORT: &str = "mesh.dev/inbound-port";
    /// `"true"` when the proxy holds a mesh identity: it then gets mutual-TLS inbound chains
    /// and originates mesh TLS to endpoints that carry an identity. Absent: plaintext only.
    pub const MTLS: &str = "mesh.dev/mtls";
    /// IP address the transparent inbound listener binds; default `0.0.0.0`. Lets proxies of
    /// several pods share one host (the local mesh, tests).
    pub const INBOUND_ADDR: &str = "mesh.dev/inbound-addr";
    /// A directory the proxy's mesh TLS secrets (`default.yaml`, `ROOTCA.yaml`: SDS
    /// DiscoveryResponses) are read and watched from, for Envoy given its SVID by files (an
    /// agent that writes them). Absent: the secrets come over ADS (mesh-proxy gets its own).
    pub const SDS_DIR: &str = "mesh.dev/sds-dir";
    /// `"true"` when the proxy's mesh TLS secrets come over gRPC from `mesh-proxy agent
    /// --sds-socket`, through the static cluster [`super::xds::SDS_CLUSTER`] its bootstrap
    /// declares (as Istio's agent serves them).
    pub const SDS_AGENT: &str = "mesh.dev/sds-agent";
    /// Where the proxy's admin server listens (`host:port`), for `meshctl proxy-config`.
    /// Informational: it changes nothing the proxy is served.
    pub const ADMIN_ADDR: &str = "mesh.dev/admin-addr";
    /// Where the proxy's metrics server listens (`host:port`); an unspecified host means the
    /// address the proxy connects from. The controller scrapes it for edges and stats.
    pub const METRICS_ADDR: &str = "mesh.dev/metrics-addr";
    /// `"true"` when a transparent proxy looks its destinations up on demand: its outbound
    /// listener then carries no per-Service filter chains and its wildcard clusters only the
    /// fixed ones; it subscribes by name to the listener of each destination address it meets
    /// ([`super::xds::address_listener`]) and to the routes, clusters and endpoints those name.
    pub const SCOPED: &str = "mesh.dev/scoped";
    /// The name of the Gateway (in the node's namespace) the proxy serves: it then gets that
    /// Gateway's listeners, routes and certificates instead of a sidecar's listeners. Over TLS
    /// the proxy's certificate must be of the Gateway's service account
    /// ([`super::identity::gateway_service_account`]).
    pub const GATEWAY: &str = "mesh.dev/gateway";
    /// IP address a gateway proxy's listeners bind; default `0.0.0.0`.
    pub const GATEWAY_ADDR: &str = "mesh.dev/gateway-addr";
    /// The workload the proxy serves (its `--workload`). The controller keys what a scoped
    /// proxy's workload learned by the pod's workload, and by this while it does not know the
    /// pod.
    pub const WORKLOAD: &str = "mesh.dev/workload";
}

/// Names used in xDS resources that several components must agree on.
pub mod xds {
    /// Listener name of the explicit outbound HTTP proxy.
    pub const OUTBOUND_HTTP_LISTENER: &str = "outbound_http";
    /// RouteConfiguration served to the explicit outbound HTTP listener.
    pub const OUTBOUND_HTTP_ROUTE: &str = "outbound_http";
    /// Listener name of the transparent outbound listener.
    pub const OUTBOUND_LISTENER: &str = "virtualOutbound";
    /// Listener name of the transparent inbound listener.
    pub const INBOUND_LISTENER: &str = "virtualInbound";
    /// Cluster that forwards to the original destination (unknown outbound traffic).
    pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
    /// Cluster with no endpoints: where an invalid backend's share of traffic goes.
    pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
    /// Default DNS suffix of the cluster.
    pub const CLUSTER_DOMAIN: &str = "cluster.local";
    /// Transport socket name of TLS (downstream and upstream).
    pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
    /// SDS secret name of the proxy's own SVID (as Istio names it).
    pub const SDS_SVID: &str = "default";
    /// SDS secret name of the trust bundle.
    pub const SDS_ROOTS: &str = "ROOTCA";
    /// The static cluster of an Envoy bootstrap that reaches the agent's SDS socket.
    pub const SDS_CLUSTER: &str = "sds-grpc";
    /// `filter_metadata` key of mesh endpoint metadata (`proxy`, `identity`).
    pub const ENDPOINT_METADATA: &str = "mesh.dev";
    /// Descriptor key of a local rate limit's per-identity bucket (its value is the caller's
    /// SPIFFE ID, the peer certificate's URI SAN).
    pub const RATE_LIMIT_IDENTITY_KEY: &str = "mesh-client-identity";
    /// Most caller identities a local rate limit keeps a bucket for, in Envoy
    /// (`max_dynamic_descriptors`) and in mesh-proxy alike.
    pub const RATE_LIMIT_MAX_IDENTITIES: u32 = 10_000;

    /// The listener that holds the outbound filter chains of one destination address, for
    /// proxies that look destinations up on demand: `<ip>_<port>` (`[<ipv6>]_<port>`), an
    /// address that binds nothing (`bind_to_port: false`, as Istio's per-Service listeners).
    pub fn address_listener(addr: std::net::SocketAddr) -> String {
        match addr {
            std::net::SocketAddr::V4(a) => format!("{}_{}", a.ip(), a.port()),
            std::net::SocketAddr::V6(a) => format!("[{}]_{}", a.ip(), a.port()),
        }
    }

    /// The Listener of a Gateway's port, on the proxies that serve the Gateway.
    pub fn gateway_listener(port: u16) -> String {
        format!("gateway_{port}")
    }

    /// The port a [`gateway_listener`] name stands for.
    pub fn parse_gateway_listener(name: &str) -> Option<u16> {
        let port: u16 = name.strip_prefix("gateway_")?.parse().ok()?;
        (gateway_listener(port) == name).then_some(port)
    }

    /// The address an [`address_listener`] name stands for.
    pub fn parse_address_listener(name: &str) -> Option<std::net::SocketAddr> {
        let (ip, port) = name.rsplit_once('_')?;
        let ip = ip
            .strip_prefix('[')
            .and_then(|i| i.strip_suffix(']'))
            .unwrap_or(ip);
        let addr = std::net::SocketAddr::new(ip.parse().ok()?, port.parse().ok()?);
        (address_listener(addr) == name).then_some(addr)
    }
}

/// Environment variable names, one constant each.
pub mod env {
    /// Controller: directory of manifests to watch (local mode).
    pub const CONTROLLER_CONFIG_DIR: &str = "MESH_CONFIG_DIR";
    /// Controller: xDS listen address.
    pub const CONTROLLER_XDS_ADDR: &str = "MESH_XDS_ADDR";
    /// Controller: plaintext xDS listen address (loopback only), beside the TLS one.
    pub const CONTROLLER_XDS_PLAINTEXT_ADDR: &str = "MESH_XDS_PLAINTEXT_ADDR";
    /// Controller: address of mesh-ca (`host:port`).
    pub const CONTROLLER_CA_ADDR: &str = "MESH_CONTROLLER_CA_ADDR";
    /// Controller: PEM root(s) mesh-ca's certificate chains to.
    pub const CONTROLLER_CA_ROOT: &str = "MESH_CONTROLLER_CA_ROOT";
    /// Controller: file with the token proving the controller's identity to mesh-ca.
    pub const CONTROLLER_CA_TOKEN_FILE: &str = "MESH_CONTROLLER_CA_TOKEN_FILE";
    /// Controller: admin (metrics and debug) listen address.
    pub const CONTROLLER_ADMIN_ADDR: &str = "MESH_ADMIN_ADDR";
    /// Controller: how often proxies' metrics are scraped.
    pub const CONTROLLER_STATS_INTERVAL: &str = "MESH_STATS_INTERVAL";
    /// Controller: the window stats are measured over.
    pub const CONTROLLER_STATS_WINDOW: &str = "MESH_STATS_WINDOW";
    /// Controller: debounce window for bursts of changes, in milliseconds.
    pub const CONTROLLER_DEBOUNCE_MS: &str = "MESH_DEBOUNCE_MS";
    /// Controller: the mesh-wide mTLS mode, `STRICT` or `PERMISSIVE`.
    pub const CONTROLLER_MTLS_MODE: &str = "MESH_MTLS_MODE";
    /// Controller: what workloads do with requests no ALLOW policy decides.
    pub const CONTROLLER_AUTHZ_DEFAULT: &str = "MESH_AUTHZ_DEFAULT";
    /// Controller: cluster DNS suffix.
    pub const CONTROLLER_CLUSTER_DOMAIN: &str = "MESH_CLUSTER_DOMAIN";
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    pub const LOG: &str = "MESH_LOG";
    /// Log format: `text` or `json`.
    pub const LOG_FORMAT: &str = "MESH_LOG_FORMAT";
    /// meshctl: xDS address of the controller.
    pub const MESHCTL_XDS: &str = "MESH_XDS";
    /// meshctl: the controller's admin address (`--controller`).
    pub const MESHCTL_CONTROLLER_ADMIN: &str = "MESH_CONTROLLER_ADMIN";
    /// meshctl: mesh-ca's admin address (`--ca-admin`).
    pub const MESHCTL_CA_ADMIN: &str = "MESH_CA_ADMIN";
    /// meshctl: the manifest directory of a local mesh (`--local`).
    pub const MESHCTL_LOCAL: &str = "MESH_LOCAL_DIR";
    /// meshctl: the control plane's namespace (`--mesh-namespace`).
    pub const MESHCTL_MESH_NAMESPACE: &str = "MESH_NAMESPACE";

    /// Proxy: xDS address of the controller (`host:port`).
    pub const PROXY_XDS: &str = "MESH_PROXY_XDS";
    /// Proxy: who it is, `<namespace>/<name>`.
    pub const PROXY_NODE: &str = "MESH_PROXY_NODE";
    /// Proxy: `delta` (default) or `sotw`.
    pub const PROXY_XDS_API: &str = "MESH_PROXY_XDS_API";
    /// Proxy: `true` when iptables redirects the pod's traffic to it.
    pub const PROXY_TRANSPARENT: &str = "MESH_PROXY_TRANSPARENT";
    /// Proxy: `true` to look destinations up on demand instead of holding every Service.
    pub const PROXY_SCOPED: &str = "MESH_PROXY_SCOPED";
    /// Proxy: how long a destination looked up stays held with no connection to it.
    pub const PROXY_SCOPED_IDLE_TIMEOUT: &str = "MESH_PROXY_SCOPED_IDLE_TIMEOUT";
    /// Proxy: the Gateway (in the node's namespace) it serves as that Gateway's proxy.
    pub const PROXY_GATEWAY: &str = "MESH_PROXY_GATEWAY";
    /// Proxy: the IP address a gateway proxy's listeners bind.
    pub const PROXY_GATEWAY_ADDR: &str = "MESH_PROXY_GATEWAY_ADDR";
    /// Proxy: admin listen address.
    pub const PROXY_ADMIN_ADDR: &str = "MESH_PROXY_ADMIN_ADDR";
    /// Proxy: metrics and readiness listen address.
    pub const PROXY_METRICS_ADDR: &str = "MESH_PROXY_METRICS_ADDR";
    /// Proxy: transparent outbound listen address.
    pub const PROXY_OUTBOUND_ADDR: &str = "MESH_PROXY_OUTBOUND_ADDR";
    /// Proxy: transparent inbound listen address.
    pub const PROXY_INBOUND_ADDR: &str = "MESH_PROXY_INBOUND_ADDR";
    /// Proxy: explicit outbound HTTP proxy listen address.
    pub const PROXY_OUTBOUND_HTTP_ADDR: &str = "MESH_PROXY_OUTBOUND_HTTP_ADDR";
    /// Proxy: original destination to assume on the outbound listener (no iptables).
    pub const PROXY_OUTBOUND_ORIG_DST: &str = "MESH_PROXY_OUTBOUND_ORIG_DST";
    /// Proxy: original destination to assume on the inbound listener (no iptables).
    pub const PROXY_INBOUND_ORIG_DST: &str = "MESH_PROXY_INBOUND_ORIG_DST";
    /// Proxy: worker threads.
    pub const PROXY_WORKERS: &str = "MESH_PROXY_WORKERS";
    /// Proxy: how long in-flight requests may finish after SIGTERM.
    pub const PROXY_DRAIN_DEADLINE: &str = "MESH_PROXY_DRAIN_DEADLINE";
    /// Proxy: how long protocol detection waits for the first bytes.
    pub const PROXY_DETECT_TIMEOUT: &str = "MESH_PROXY_DETECT_TIMEOUT";
    /// Proxy: largest request header block accepted, in bytes.
    pub const PROXY_MAX_HEADER_BYTES: &str = "MESH_PROXY_MAX_HEADER_BYTES";
    /// Proxy: concurrent HTTP/2 streams per connection.
    pub const PROXY_H2_MAX_STREAMS: &str = "MESH_PROXY_H2_MAX_STREAMS";
    /// Proxy: connections each listener holds open at once.
    pub const PROXY_MAX_CONNECTIONS: &str = "MESH_PROXY_MAX_CONNECTIONS";
    /// Proxy: the container's memory limit in bytes, for load shedding.
    pub const PROXY_MEMORY_LIMIT: &str = "MESH_PROXY_MEMORY_LIMIT";
    /// Proxy: time allowed to read a request's headers.
    pub const PROXY_HEADER_READ_TIMEOUT: &str = "MESH_PROXY_HEADER_READ_TIMEOUT";
    /// Proxy: idle time after which a connection is closed.
    pub const PROXY_IDLE_TIMEOUT: &str = "MESH_PROXY_IDLE_TIMEOUT";

    /// Proxy: address of mesh-ca (`host:port`).
    pub const PROXY_CA_ADDR: &str = "MESH_PROXY_CA_ADDR";
    /// Proxy: PEM file with the root(s) mesh-ca's own certificate chains to.
    pub const PROXY_CA_ROOT: &str = "MESH_PROXY_CA_ROOT";
    /// Proxy: file with the token that proves the workload's identity to mesh-ca.
    pub const PROXY_CA_TOKEN_FILE: &str = "MESH_PROXY_CA_TOKEN_FILE";
    /// Proxy: the workload's service account.
    pub const PROXY_SERVICE_ACCOUNT: &str = "MESH_PROXY_SERVICE_ACCOUNT";
    /// Proxy: the workload it serves, for metrics (default: the pod's name).
    pub const PROXY_WORKLOAD: &str = "MESH_PROXY_WORKLOAD";
    /// Proxy: per-request telemetry on or off.
    pub const PROXY_TELEMETRY: &str = "MESH_PROXY_TELEMETRY";
    /// Proxy: the OTLP/gRPC collector spans go to.
    pub const PROXY_TRACING_ENDPOINT: &str = "MESH_PROXY_TRACING_ENDPOINT";
    /// Proxy: percentage of new traces sampled.
    pub const PROXY_TRACING_SAMPLING: &str = "MESH_PROXY_TRACING_SAMPLING";
    /// Proxy: where access log lines go (`-`: stdout).
    pub const PROXY_ACCESS_LOG: &str = "MESH_PROXY_ACCESS_LOG";
    /// Proxy: the app probes it answers on its health port (`mesh_api::probes`, JSON).
    pub const PROXY_APP_PROBES: &str = "MESH_PROXY_APP_PROBES";
    /// Proxy: the pod's IP, where app probes are sent (as the kubelet sends them).
    pub const POD_IP: &str = "POD_IP";
    /// Proxy: certificate lifetime to ask mesh-ca for.
    pub const PROXY_CERT_LIFETIME: &str = "MESH_PROXY_CERT_LIFETIME";
    /// `mesh-proxy agent`: the directory it writes Envoy's SDS files to.
    pub const PROXY_SDS_DIR: &str = "MESH_PROXY_SDS_DIR";
    pub const PROXY_SDS_SOCKET: &str = "MESH_PROXY_SDS_SOCKET";
    /// Proxy: xDS over mesh TLS, `auto`, `on` or `off`.
    pub const PROXY_XDS_TLS: &str = "MESH_PROXY_XDS_TLS";
    /// Proxy: `true` runs without identity (plaintext only).
    pub const PROXY_IDENTITY_OFF: &str = "MESH_PROXY_IDENTITY_OFF";

    /// CA: directory holding `ca.crt`, `ca.key`, `trust-bundle.pem` and `token.key`.
    pub const CA_DIR: &str = "MESH_CA_DIR";
    /// CA: certificate service listen address.
    pub const CA_ADDR: &str = "MESH_CA_ADDR";
    /// CA: metrics and readiness listen address.
    pub const CA_ADMIN_ADDR: &str = "MESH_CA_ADMIN_ADDR";
    /// Trust domain (CA, controller and proxy).
    pub const TRUST_DOMAIN: &str = "MESH_TRUST_DOMAIN";
}

#[cfg(test)]
mod tests {
    use super::xds::{address_listener, parse_address_listener};

    #[test]
    fn address_listener_names_round_trip_and_nothing_else_parses() {
        for a in ["10.96.0.12:80", "[fd00::1]:8080"] {
            let addr = a.parse().expect("an address");
            let name = address_listener(addr);
            assert_eq!(parse_address_listener(&name), Some(addr), "{name}");
        }
        assert_eq!(
            address_listener("10.96.0.12:80".parse().expect("v4")),
            "10.96.0.12_80"
        );
        for bad in [
            "virtualOutbound",
            "10.96.0.12:80",
            "10.96.0.12_080",
            "fd00::1_80",
            "a_1",
        ] {
            assert_eq!(parse_address_listener(bad), None, "{bad}");
        }
    }
}
