//! FaultInjection objects, read: a delay and an abort, each with its share of requests, as the
//! routes that name them in an `ExtensionRef` filter get them.

use std::time::Duration;

use mesh_api::crds::FaultInjection;
use serde::Serialize;

use super::routes::duration;
use crate::objects::DocError;

/// A FaultInjection, read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Delay {
    pub fixed: Duration,
    pub per_million: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Abort {
    pub code: AbortCode,
    pub per_million: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AbortCode {
    HttpStatus(u16),
    GrpcStatus(u32),
}

/// Reads a FaultInjection; an error names the field (its previous version, if any, stays).
pub fn compile(f: &FaultInjection) -> Result<Fault, DocError> {
    let delay = f
        .spec
        .delay
        .as_ref()
        .map(|d| {
            let fixed = duration(&d.fixed_delay, "spec.delay.fixedDelay")?;
            if fixed.is_zero() {
                return Err(DocError::new("spec.delay.fixedDelay", "must be over 0"));
            }
            Ok(Delay {
                fixed,
                per_million: per_million(d.percent, "spec.delay.percent")?,
            })
        })
        .transpose()?;
    let abort = f
        .spec
        .abort
        .as_ref()
        .map(|a| {
            let code = match (a.http_status, a.grpc_status) {
                (Some(s), None) if (200..600).contains(&s) => AbortCode::HttpStatus(s),
                (Some(s), None) => {
                    return Err(DocError::new(
                        "spec.abort.httpStatus",
                        format!("{s} is not an HTTP status from 200 to 599"),
                    ));
                }
                (None, Some(s)) if s <= 16 => AbortCode::GrpcStatus(s),
                (None, Some(s)) => {
                    return Err(DocError::new(
                        "spec.abort.grpcStatus",
                        format!("{s} is not a gRPC status code (0 to 16)"),
                    ));
                }
                _ => {
                    return Err(DocError::new(
                        "spec.abort",
                        "set exactly one of httpStatus and grpcStatus",
                    ));
                }
            };
            Ok(Abort {
                code,
                per_million: per_million(a.percent, "spec.abort.percent")?,
            })
        })
        .transpose()?;
    if delay.is_none() && abort.is_none() {
        return Err(DocError::new("spec", "set delay, abort or both"));
    }
    Ok(Fault { delay, abort })
}

/// A percentage (0 to 100, to a ten-thousandth) in parts per million.
fn per_million(percent: f64, field: &str) -> Result<u32, DocError> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(DocError::new(
            field,
            format!("{percent} is not a percentage from 0 to 100"),
        ));
    }
    Ok((percent * 10_000.0).round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(spec: &str) -> Result<Fault, DocError> {
        let doc = format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: FaultInjection\nmetadata: {{name: f, namespace: shop}}\nspec: {spec}\n"
        );
        let f: FaultInjection =
            serde_norway::from_str(&doc).map_err(|e| DocError::new("", e.to_string()))?;
        compile(&f)
    }

    #[test]
    fn faults_are_read_and_their_mistakes_named() {
        let f = read(
            "{delay: {fixedDelay: 250ms, percent: 12.5}, abort: {grpcStatus: 14, percent: 0.0001}}",
        )
        .expect("read");
        assert_eq!(
            f,
            Fault {
                delay: Some(Delay {
                    fixed: Duration::from_millis(250),
                    per_million: 125_000
                }),
                abort: Some(Abort {
                    code: AbortCode::GrpcStatus(14),
                    per_million: 1
                }),
            }
        );
        let cases = [
            ("{}", "spec"),
            (
                "{delay: {fixedDelay: 0s, percent: 10}}",
                "spec.delay.fixedDelay",
            ),
            (
                "{delay: {fixedDelay: soon, percent: 10}}",
                "spec.delay.fixedDelay",
            ),
            (
                "{delay: {fixedDelay: 1s, percent: 101}}",
                "spec.delay.percent",
            ),
            ("{abort: {percent: 10}}", "spec.abort"),
            (
                "{abort: {httpStatus: 503, grpcStatus: 14, percent: 10}}",
                "spec.abort",
            ),
            (
                "{abort: {httpStatus: 99, percent: 10}}",
                "spec.abort.httpStatus",
            ),
            (
                "{abort: {grpcStatus: 17, percent: 10}}",
                "spec.abort.grpcStatus",
            ),
        ];
        for (spec, field) in cases {
            let err = read(spec).expect_err(spec);
            assert_eq!(err.field, field, "{spec}: {err}");
        }
    }
}
