//! Leader election through a `coordination.k8s.io/v1` Lease, for work only one controller
//! replica may do (writing route status). A replica leads while it holds the Lease and renews
//! it in time; when the holder stops renewing for the lease duration, another replica takes it.
//! Every write carries the resourceVersion it read, so two replicas never both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tracing::info;

#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    holder: String,
    duration: Duration,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

fn secs(t: &Option<MicroTime>) -> i64 {
    t.as_ref().map_or(0, |t| t.0.as_second())
}

impl LeaseLock {
    pub fn new(
        client: kube::Client,
        ns: &str,
        name: &str,
        holder: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, ns),
            name: name.into(),
            holder: holder.into(),
            duration,
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes the Lease if it is free or expired, renews it if held; returns whether this
    /// replica holds it now. A conflict (another replica wrote first) is `false`.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let stamp = Some(MicroTime(now));
        let duration = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let conflict = |r: Result<Lease, kube::Error>| match r {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: stamp.clone(),
                    renew_time: stamp,
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            let won = conflict(self.api.create(&PostParams::default(), &lease).await)?;
            if won {
                info!(lease = %self.name, holder = %self.holder, "became the leader");
            }
            return Ok(won);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let held_by_me = spec.holder_identity.as_deref() == Some(self.holder.as_str());
        if !held_by_me {
            let lasts = i64::from(spec.lease_duration_seconds.unwrap_or(duration));
            let expired =
                spec.holder_identity.is_none() || secs(&spec.renew_time) + lasts < now.as_second();
            if !expired {
                return Ok(false);
            }
            spec.holder_identity = Some(self.holder.clone());
            spec.acquire_time = stamp.clone();
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = stamp;
        spec.lease_duration_seconds = Some(duration);
        let won = conflict(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )?;
        if won && !held_by_me {
            info!(lease = %self.name, holder = %self.holder, "took over as the leader");
        }
        Ok(won)
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::fake_api::FakeApi;

    use super::*;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/mesh-system/leases/mesh-controller";

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("time")
    }

    #[tokio::test]
    async fn one_replica_leads_until_it_stops_renewing() {
        let (client, fake) = FakeApi::start();
        let d = Duration::from_secs(15);
        let a = LeaseLock::new(client.clone(), "mesh-system", "mesh-controller", "pod-a", d);
        let b = LeaseLock::new(client, "mesh-system", "mesh-controller", "pod-b", d);
        assert!(a.try_acquire_or_renew(at(0)).await.expect("a"));
        assert!(!b.try_acquire_or_renew(at(1)).await.expect("b"));
        assert!(a.try_acquire_or_renew(at(5)).await.expect("a renews"));
        // Within the duration of a's last renewal, b still waits.
        assert!(!b.try_acquire_or_renew(at(19)).await.expect("b"));
        // a stopped renewing at 5: at 21 the lease has expired and b takes it.
        assert!(b.try_acquire_or_renew(at(21)).await.expect("b takes over"));
        assert!(!a.try_acquire_or_renew(at(22)).await.expect("a lost it"));
        let lease = fake.state().objects[PATH].clone();
        assert_eq!(lease["spec"]["holderIdentity"], "pod-b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    }

    #[tokio::test]
    async fn a_lease_another_replica_renewed_is_left_to_it() {
        let (client, fake) = FakeApi::start();
        let d = Duration::from_secs(15);
        let a = LeaseLock::new(client.clone(), "mesh-system", "mesh-controller", "pod-a", d);
        assert!(a.try_acquire_or_renew(at(0)).await.expect("a"));
        // pod-c took the lease meanwhile and renews it: a waits its turn.
        let mut stored = fake.state().objects[PATH].clone();
        stored["spec"]["holderIdentity"] = "pod-c".into();
        stored["spec"]["renewTime"] = "2027-01-15T08:00:30.000000Z".into();
        fake.insert(stored);
        assert!(!a.try_acquire_or_renew(at(1)).await.expect("a sees pod-c"));
        assert_eq!(
            fake.state().objects[PATH]["spec"]["holderIdentity"],
            "pod-c"
        );
    }
}
