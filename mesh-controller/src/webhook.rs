//! The sidecar injection webhook's core: an `admission.k8s.io/v1` AdmissionReview in, the
//! review's response out, with a JSON patch that injects the sidecar (`mesh_api::inject`).
//! Which namespaces and pods reach the webhook is the MutatingWebhookConfiguration's selectors'
//! business; a pod labelled `mesh.dev/inject: disabled` is still left alone. A review that
//! cannot be read is answered with an error, never with a crash, and never blocks the pod:
//! injection failures allow the object unchanged, with a warning.

use base64::Engine;
use mesh_api::inject::{InjectSettings, Outcome, inject};
use serde_json::{Value, json};

/// The response to one AdmissionReview (as JSON), or an error naming what is wrong with it.
pub fn review(body: &[u8], settings: &InjectSettings) -> Result<Value, String> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the AdmissionReview is not JSON: {e}"))?;
    if review.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return Err("the body is not an AdmissionReview".into());
    }
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("admission.k8s.io/v1")
        .to_string();
    let request = review
        .get("request")
        .ok_or("the AdmissionReview has no request")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("request.uid is missing")?;
    let mut object = request
        .get("object")
        .cloned()
        .ok_or("request.object is missing")?;
    let is_pod = object.get("kind").and_then(Value::as_str) == Some("Pod");
    let mut response = json!({"uid": uid, "allowed": true});
    match inject(&mut object, true, settings) {
        Ok(Outcome::Injected) => {
            let mut patch =
                vec![json!({"op": "replace", "path": "/spec", "value": object["spec"]})];
            if is_pod {
                // A Deployment's labels and annotations went with /spec/template; a Pod's are
                // in its metadata (the annotations keep its probes as written).
                for key in ["labels", "annotations"] {
                    if let Some(value) = object["metadata"].get(key) {
                        patch.push(json!({"op": "add", "path": format!("/metadata/{key}"), "value": value}));
                    }
                }
            }
            let bytes = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        Ok(Outcome::AlreadyInjected | Outcome::Skipped(_)) => {}
        Err(why) => {
            // Never block a workload over the mesh: let it through, and say why.
            response["warnings"] = json!([format!("mesh sidecar not injected: {why}")]);
        }
    }
    Ok(json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": response}))
}

/// Serves `POST /inject` (and `/ready`) over TLS on `listener` with `tls`, until dropped.
pub fn serve(
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<rustls::ServerConfig>,
    settings: InjectSettings,
) -> tokio::task::JoinHandle<()> {
    use axum::routing::{get, post};
    use futures::StreamExt;
    let settings = std::sync::Arc::new(settings);
    let app = axum::Router::new()
        .route(
            "/inject",
            post(move |body: axum::body::Bytes| {
                let settings = settings.clone();
                async move { answer(&body, &settings) }
            }),
        )
        .route("/ready", get(|| async { "ready\n" }));
    tokio::spawn(async move {
        let mut incoming = mesh_api::tls::grpc::incoming(listener, tls);
        while let Some(conn) = incoming.next().await {
            let Ok(conn) = conn else { continue };
            let svc = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(conn);
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if let Err(e) = builder.serve_connection(io, svc).await {
                    tracing::debug!(error = %e, "webhook connection ended");
                }
            });
        }
    })
}

/// One review over HTTP: 200 with the response, or 400 naming what is wrong with the request.
fn answer(body: &[u8], settings: &InjectSettings) -> axum::response::Response {
    use axum::response::IntoResponse;
    match review(body, settings) {
        Ok(v) => {
            if let Some(w) = v.pointer("/response/warnings") {
                tracing::warn!(warnings = %w, "injection skipped");
            } else if v.pointer("/response/patch").is_some() {
                tracing::info!(uid = %v["response"]["uid"], "sidecar injected");
            }
            axum::Json(v).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "malformed admission review");
            (axum::http::StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> InjectSettings {
        InjectSettings {
            proxy_image: "mesh-proxy:test".into(),
            init_image: "mesh-proxy-init:test".into(),
            prometheus_annotations: true,
            xds_addr: "x:15010".into(),
            ca_addr: "c:15012".into(),
            trust_domain: "cluster.local".into(),
            proxy_uid: mesh_api::inject::PROXY_UID,
            log_level: "info".into(),
            resources: serde_json::Value::Null,
            tracing_endpoint: String::new(),
            tracing_sampling: 1.0,
            access_log: false,
        }
    }

    fn admission(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "operation": "CREATE", "object": object}
        }))
        .expect("json")
    }

    /// Applies the response's patch ops (replace and add of whole members) to `object`.
    fn patched(mut object: Value, resp: &Value) -> Value {
        let Some(p) = resp["response"]["patch"].as_str() else {
            return object;
        };
        let ops: Vec<Value> = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(p)
                .expect("base64"),
        )
        .expect("patch json");
        for op in ops {
            let ptr = op["path"].as_str().expect("path");
            let (parent, key) = ptr.rsplit_once('/').expect("pointer");
            let parent = if parent.is_empty() {
                &mut object
            } else {
                object.pointer_mut(parent).expect("parent")
            };
            parent[key] = op["value"].clone();
        }
        object
    }

    fn pod(labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": labels},
               "spec": {"containers": [{"name": "app", "image": "web:1"}]}})
    }

    #[test]
    fn a_pod_is_patched_with_the_sidecar_and_a_second_review_changes_nothing() {
        let resp = review(&admission(pod(json!({"app": "web"}))), &settings()).expect("review");
        assert_eq!(
            resp["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(resp["response"]["allowed"], true);
        assert_eq!(resp["response"]["patchType"], "JSONPatch");
        let out = patched(pod(json!({"app": "web"})), &resp);
        assert_eq!(out["spec"]["initContainers"][1]["name"], "mesh-proxy");
        assert_eq!(out["metadata"]["labels"]["mesh.dev/proxy"], "true");
        // A probed pod gets its probe rewritten and the original kept in an annotation.
        let mut probed = pod(json!({"app": "web"}));
        probed["spec"]["containers"][0]["readinessProbe"] = json!({"tcpSocket": {"port": 80}});
        let resp = review(&admission(probed.clone()), &settings()).expect("review");
        let probed = patched(probed, &resp);
        assert_eq!(
            probed["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
            "/app-health/app/readyz"
        );
        assert_eq!(
            probed["metadata"]["annotations"]["mesh.dev/app-probes"],
            r#"{"app":{"readinessProbe":{"tcpSocket":{"port":80}}}}"#
        );
        // The injected pod, reviewed again: allowed, no patch.
        let again = review(&admission(out), &settings()).expect("review");
        assert!(again["response"].get("patch").is_none(), "{again}");
    }

    #[test]
    fn a_deployment_template_is_patched_and_an_opted_out_pod_is_not() {
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app"}]}}}});
        let resp = review(&admission(deployment.clone()), &settings()).expect("review");
        let out = patched(deployment, &resp);
        assert_eq!(
            out["spec"]["template"]["spec"]["initContainers"][0]["name"],
            "mesh-init"
        );
        assert_eq!(
            out["spec"]["template"]["metadata"]["labels"]["mesh.dev/proxy"],
            "true"
        );
        let resp = review(
            &admission(pod(json!({"mesh.dev/inject": "disabled"}))),
            &settings(),
        )
        .expect("review");
        assert_eq!(resp["response"]["allowed"], true);
        assert!(resp["response"].get("patch").is_none(), "{resp}");
    }

    #[test]
    fn malformed_reviews_get_clear_errors_and_broken_objects_pass_with_a_warning() {
        for (body, want) in [
            (b"not json".to_vec(), "not JSON"),
            (br#"{"kind": "Pod"}"#.to_vec(), "not an AdmissionReview"),
            (br#"{"kind": "AdmissionReview"}"#.to_vec(), "no request"),
            (
                br#"{"kind": "AdmissionReview", "request": {"object": {}}}"#.to_vec(),
                "request.uid",
            ),
        ] {
            let err = review(&body, &settings()).expect_err("malformed");
            assert!(err.contains(want), "{err}");
        }
        let broken = json!({"kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [], "initContainers": 3}});
        let resp = review(&admission(broken), &settings()).expect("review");
        assert_eq!(resp["response"]["allowed"], true);
        assert!(
            resp["response"]["warnings"][0]
                .as_str()
                .unwrap_or("")
                .contains("not a list"),
            "{resp}"
        );
    }
}
