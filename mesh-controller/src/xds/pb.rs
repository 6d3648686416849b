//! Small protobuf builders every part of the xDS translation uses: typed `Any`s (canonically
//! encoded), durations, wrapped integers, network filters.

use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::Name;

use super::canonical;

/// `m` as an `Any`, encoded canonically (so equal content is equal bytes).
pub fn any<M: prost::Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: canonical::encode(m),
    }
}

pub fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn u32v(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

/// A network filter `name` with typed config `config`.
pub fn network_filter<M: prost::Message + Name>(name: &str, config: &M) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(config))),
    }
}
