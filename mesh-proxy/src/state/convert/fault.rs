//! Envoy's fault injection filter (`envoy.filters.http.fault`): its place in an HTTP filter
//! chain, and its per-route config into a route's [`Fault`].

use std::collections::HashMap;

use envoy_types::pb::envoy::config::route::v3::FilterConfig;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use super::{Ctx, Result, decode, dur, fraction};
use crate::state::route::{AbortCode, Fault, FaultAbort, FaultDelay, Share};

/// The fault filter in an HTTP filter chain: only as a placeholder whose faults come from the
/// routes (as Istio and the controller send it). Faults set here for every route are refused
/// rather than dropped.
pub(super) fn chain_filter(cx: &Ctx<'_>, at: &str, any: &Any) -> Result<()> {
    let f: HttpFault = decode(cx, at, any)?;
    if fault(cx, at, &f)?.is_some() {
        return Err(cx.err(
            at,
            "faults for every route are not supported: set them per route (typed_per_filter_config)",
        ));
    }
    Ok(())
}

/// A per-filter config wrapped in a `FilterConfig` marked optional: one a proxy that lacks the
/// filter may skip.
pub(super) fn is_optional(any: &Any) -> bool {
    any.type_url == FilterConfig::type_url()
        && FilterConfig::decode(any.value.as_slice()).is_ok_and(|f| f.is_optional)
}

/// A route's `typed_per_filter_config`: the fault filter's, if any. Config for any other
/// filter is refused unless marked optional.
pub(super) fn per_route(
    cx: &Ctx<'_>,
    at: &str,
    configs: &HashMap<String, Any>,
) -> Result<Option<Fault>> {
    let mut out = None;
    for (name, any) in configs {
        let field = format!("{at}.typed_per_filter_config[{name:?}]");
        let (any, optional) = if any.type_url == FilterConfig::type_url() {
            let wrapper: FilterConfig = decode(cx, &field, any)?;
            match wrapper.config {
                Some(c) => (c, wrapper.is_optional),
                None => continue,
            }
        } else {
            (any.clone(), false)
        };
        if any.type_url == HttpFault::type_url() {
            out = fault(cx, &field, &decode(cx, &field, &any)?)?;
        } else if !optional {
            return Err(cx.err(
                field,
                format!("per-route config of type {} is not supported", any.type_url),
            ));
        }
    }
    Ok(out)
}

/// The faults an HTTPFault injects; `None` when it injects none.
fn fault(cx: &Ctx<'_>, at: &str, f: &HttpFault) -> Result<Option<Fault>> {
    let unsupported = [
        (!f.upstream_cluster.is_empty(), "upstream_cluster"),
        (!f.headers.is_empty(), "headers"),
        (!f.downstream_nodes.is_empty(), "downstream_nodes"),
        (f.max_active_faults.is_some(), "max_active_faults"),
        (f.response_rate_limit.is_some(), "response_rate_limit"),
        (f.filter_metadata.is_some(), "filter_metadata"),
        (!f.delay_percent_runtime.is_empty(), "delay_percent_runtime"),
        (!f.abort_percent_runtime.is_empty(), "abort_percent_runtime"),
        (
            !f.delay_duration_runtime.is_empty(),
            "delay_duration_runtime",
        ),
        (
            !f.abort_http_status_runtime.is_empty(),
            "abort_http_status_runtime",
        ),
        (
            !f.abort_grpc_status_runtime.is_empty(),
            "abort_grpc_status_runtime",
        ),
        (
            !f.max_active_faults_runtime.is_empty(),
            "max_active_faults_runtime",
        ),
        (
            !f.response_rate_limit_percent_runtime.is_empty(),
            "response_rate_limit_percent_runtime",
        ),
    ];
    if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(cx.err(format!("{at}.{field}"), "not supported"));
    }
    let delay = f
        .delay
        .as_ref()
        .map(|d| {
            let field = format!("{at}.delay");
            let fixed = match &d.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(t)) => {
                    let at = format!("{field}.fixed_delay");
                    dur(cx, &at, Some(t))?
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| cx.err(&at, "must be over 0, as in Envoy"))?
                }
                _ => return Err(cx.err(&field, "only fixed_delay is supported")),
            };
            let share = share(cx, &field, d.percentage.as_ref())?;
            Ok(FaultDelay { fixed, share })
        })
        .transpose()?;
    let abort = f
        .abort
        .as_ref()
        .map(|a| {
            let field = format!("{at}.abort");
            if !a.response_body.is_empty() {
                return Err(cx.err(format!("{field}.response_body"), "not supported"));
            }
            let code = match a.error_type {
                Some(fault_abort::ErrorType::HttpStatus(s)) => u16::try_from(s)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .map(AbortCode::Http)
                    .ok_or_else(|| {
                        cx.err(
                            format!("{field}.http_status"),
                            format!("{s} is not an HTTP status from 200 to 599"),
                        )
                    })?,
                Some(fault_abort::ErrorType::GrpcStatus(s)) if s <= 16 => AbortCode::Grpc(s),
                Some(fault_abort::ErrorType::GrpcStatus(s)) => {
                    return Err(cx.err(
                        format!("{field}.grpc_status"),
                        format!("{s} is not a gRPC status (0 to 16)"),
                    ));
                }
                _ => return Err(cx.err(&field, "supported: http_status, grpc_status")),
            };
            // Drawn apart from the delay's, so a request is aborted whether or not delayed.
            let share = Share::independent(share(cx, &field, a.percentage.as_ref())?.per_million);
            Ok(FaultAbort { code, share })
        })
        .transpose()?;
    Ok((delay.is_some() || abort.is_some()).then_some(Fault { delay, abort }))
}

/// A fault's `percentage`; Envoy reads one left out as 0.
fn share(cx: &Ctx<'_>, at: &str, p: Option<&FractionalPercent>) -> Result<Share> {
    let per_million = match p {
        None => 0,
        Some(p) => {
            let (numerator, whole) = fraction(cx, format!("{at}.percentage"), p)?;
            numerator.saturating_mul(1_000_000 / whole)
        }
    };
    Ok(Share::new(per_million))
}
