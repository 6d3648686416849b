//! The mesh's sidecar data plane. It builds on `mesh-api` without its `k8s` feature, so the
//! proxy never compiles kube; the proxy itself is built under the data-plane issue.
