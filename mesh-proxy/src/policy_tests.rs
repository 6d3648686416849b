use super::*;
use crate::state::route::StrKind;

fn exact(s: &str) -> StrMatch {
    StrMatch {
        kind: StrKind::Exact(s.into()),
        ignore_case: false,
    }
}

fn prefix(s: &str) -> StrMatch {
    StrMatch {
        kind: StrKind::Prefix(s.into()),
        ignore_case: false,
    }
}

fn policy(
    name: &str,
    permissions: Vec<Permission>,
    principals: Vec<Principal>,
) -> (String, Policy) {
    (
        name.into(),
        Policy {
            permissions,
            principals,
            ..Default::default()
        },
    )
}

/// The decision, as a result that names the deciding policy.
fn decide<'p>(filters: &'p [Rbac], f: &Facts<'_>) -> Result<Option<&'p str>, Denied<'p>> {
    super::decide(filters, f).result()
}

const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B: &str = "spiffe://cluster.local/ns/bank/sa/b";

fn facts<'a>(id: Option<&'a str>, path: &'a str, h: &'a HeaderMap) -> Facts<'a> {
    static GET: Method = Method::GET;
    Facts {
        identity: id,
        port: 8080,
        http: Some(HttpFacts {
            path,
            method: &GET,
            headers: h,
        }),
    }
}

#[test]
fn deny_filters_run_first_and_an_allow_filter_refuses_what_it_does_not_match() {
    let h = HeaderMap::new();
    let filters = vec![
        Rbac {
            action: RbacAction::Deny,
            policies: vec![policy(
                "shop/no-admin",
                vec![Permission::Path(prefix("/admin"))],
                vec![Principal::Any],
            )],
        },
        Rbac {
            action: RbacAction::Allow,
            policies: vec![policy(
                "shop/from-shop",
                vec![Permission::Any],
                vec![Principal::Authenticated(Some(prefix(
                    "spiffe://cluster.local/ns/shop/",
                )))],
            )],
        },
    ];
    assert_eq!(
        decide(&filters, &facts(Some(A), "/ok", &h)),
        Ok(Some("shop/from-shop"))
    );
    assert_eq!(
        decide(&filters, &facts(Some(A), "/admin/x", &h)),
        Err(Denied {
            policy: Some("shop/no-admin")
        })
    );
    assert_eq!(
        decide(&filters, &facts(Some(B), "/ok", &h)),
        Err(Denied { policy: None })
    );
    assert_eq!(
        decide(&filters, &facts(None, "/ok", &h)),
        Err(Denied { policy: None })
    );
    // No filters: everything passes, with no policy named.
    assert_eq!(decide(&[], &facts(None, "/ok", &h)), Ok(None));
    // An ALLOW filter with no policies refuses everything (a default deny).
    let deny_all = [Rbac {
        action: RbacAction::Allow,
        policies: vec![],
    }];
    assert!(decide(&deny_all, &facts(Some(A), "/", &h)).is_err());
}

#[test]
fn http_conditions_never_match_a_tcp_connection() {
    let allow_path = [Rbac {
        action: RbacAction::Allow,
        policies: vec![policy(
            "p",
            vec![Permission::Path(exact("/"))],
            vec![Principal::Any],
        )],
    }];
    let tcp = Facts {
        identity: Some(A),
        port: 5432,
        http: None,
    };
    assert!(decide(&allow_path, &tcp).is_err());
    let by_port = [Rbac {
        action: RbacAction::Allow,
        policies: vec![policy(
            "p",
            vec![Permission::And(vec![
                Permission::DestinationPort(5432),
                Permission::Not(Box::new(Permission::DestinationPort(1))),
            ])],
            vec![Principal::Or(vec![Principal::Authenticated(Some(exact(
                A,
            )))])],
        )],
    }];
    assert_eq!(decide(&by_port, &tcp), Ok(Some("p")));
}

#[test]
fn gcra_allows_the_burst_then_one_per_interval_and_says_when_to_come_back() {
    let g = Gcra::new();
    let rate = Rate {
        per_second: 10.0,
        burst: 3,
    };
    let ms = 1_000_000;
    let t0 = 1_000 * ms;
    for _ in 0..3 {
        assert_eq!(g.take(rate, t0), Ok(()));
    }
    assert_eq!(g.take(rate, t0), Err(Duration::from_millis(100)));
    assert_eq!(g.take(rate, t0 + 40 * ms), Err(Duration::from_millis(60)));
    assert_eq!(g.take(rate, t0 + 100 * ms), Ok(()));
    assert!(g.take(rate, t0 + 100 * ms).is_err());
    // Over 10 s at 10/s with a burst of 3, offered far more: 3 + 100 allowed.
    let g = Gcra::new();
    let allowed = (0..10_000u64)
        .filter(|i| g.take(rate, t0 + i * ms).is_ok())
        .count();
    assert_eq!(allowed, 3 + 99);
}

#[test]
fn each_identity_has_its_own_bucket_and_callers_without_one_count_only_in_total() {
    let l = Limiter::new(RateLimit {
        name: "shop/limit".into(),
        total: Some(Rate {
            per_second: 0.001,
            burst: 5,
        }),
        per_identity: Some(Rate {
            per_second: 0.001,
            burst: 2,
        }),
    });
    assert!(l.take(Some(A)).is_ok());
    assert!(l.take(Some(A)).is_ok());
    let refused = l.take(Some(A)).expect_err("A's bucket is empty");
    assert_eq!(refused.scope, "identity");
    assert!(l.take(Some(B)).is_ok());
    assert!(l.take(None).is_ok());
    assert!(l.take(None).is_ok());
    let refused = l.take(Some(B)).expect_err("the total is spent");
    assert_eq!(refused.scope, "total");
    assert_eq!(retry_after_secs(refused.retry_after), 1_000);
}

#[test]
fn retry_after_rounds_up_to_whole_seconds() {
    assert_eq!(retry_after_secs(Duration::ZERO), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
    assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
    assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
}
