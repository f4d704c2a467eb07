//! The in-memory copy of the customer configuration (trunk groups and DIDs) that the SIP service
//! reads on every request, and the task that refreshes it when the store changes.
//!
//! DESIGN.md, "What lives where": each server routes from an in-memory copy; while the store is
//! unreachable it keeps the last good copy.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::delivery_rule::FailoverPbx;
use super::delivery_rule::FailoverPlan;
use super::registrar::unix_ms;
use super::store::{Did, Store, StoreError, StoreLocation, TrunkGroup, TrunkGroupId};

/// One consistent view of the customer configuration.
#[derive(Debug, Default)]
pub struct Customers {
    /// The store's change counter this copy was read at.
    pub version: i64,
    trunk_groups: HashMap<TrunkGroupId, TrunkGroup>,
    by_username: HashMap<String, TrunkGroupId>,
    dids: HashMap<String, Did>,
}

impl Customers {
    /// Reads the whole configuration.
    pub async fn load(store: &Store) -> Result<Customers, StoreError> {
        // Read the counter first: a change during the load is seen by the next poll.
        let version = store.config_version().await?;
        let groups = store.list_trunk_groups(None).await?;
        let dids = store.list_dids(None).await?;
        Ok(Customers::from_parts(version, groups, dids))
    }

    /// Builds a view from rows (tests, and `load`).
    pub fn from_parts(version: i64, groups: Vec<TrunkGroup>, dids: Vec<Did>) -> Customers {
        let by_username = groups.iter().map(|g| (g.username.clone(), g.id)).collect();
        Customers {
            version,
            trunk_groups: groups.into_iter().map(|g| (g.id, g)).collect(),
            by_username,
            dids: dids.into_iter().map(|d| (d.number.clone(), d)).collect(),
        }
    }

    /// The trunk group a SIP username belongs to.
    pub fn trunk_group_by_username(&self, username: &str) -> Option<&TrunkGroup> {
        self.by_username
            .get(username)
            .and_then(|id| self.trunk_groups.get(id))
    }

    pub fn trunk_group(&self, id: TrunkGroupId) -> Option<&TrunkGroup> {
        self.trunk_groups.get(&id)
    }

    /// A DID, written with or without the leading `+`.
    pub fn did(&self, number: &str) -> Option<&Did> {
        match number.strip_prefix('+') {
            Some(_) => self.dids.get(number),
            None => self.dids.get(&format!("+{number}")),
        }
    }

    /// The failover settings that apply to a call for `did` (DESIGN.md, "Words"): the DID's
    /// own failover number, and its trunk group's global number and failover PBX. A DID whose
    /// trunk group is not in this copy gets only its own number.
    pub fn failover(&self, did: &Did) -> FailoverPlan {
        let group = self.trunk_groups.get(&did.trunk_group_id);
        FailoverPlan {
            did_number: did.failover_number.clone(),
            global_number: group.and_then(|g| g.failover_number.clone()),
            pbx: group.and_then(|g| g.failover_pbx.clone()),
        }
    }

    /// The trunk group whose bindings are `did`'s failover PBX, if its failover PBX is a trunk
    /// group of the same account (the store checks this when it is set; a group moved to
    /// another account since is not delivered to).
    pub fn failover_trunk_group(&self, did: &Did) -> Option<TrunkGroupId> {
        let group = self.trunk_groups.get(&did.trunk_group_id)?;
        match &group.failover_pbx {
            Some(FailoverPbx::TrunkGroup(other)) => self
                .trunk_groups
                .get(other)
                .filter(|o| o.account_id == group.account_id)
                .map(|o| o.id),
            _ => None,
        }
    }

    /// How many trunk groups and DIDs this copy holds.
    pub fn counts(&self) -> (usize, usize) {
        (self.trunk_groups.len(), self.dids.len())
    }
}

/// Whether the configuration store answered the last time it was asked, for the logs, the API
/// and metrics. Shared between the task that refreshes the copy and its readers.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// 0: reachable; otherwise when it first failed, Unix milliseconds.
    unreachable_since_ms: AtomicI64,
}

impl StoreHealth {
    /// `None` while the store answers; when it stopped answering, Unix milliseconds.
    pub fn unreachable_since_ms(&self) -> Option<i64> {
        match self.unreachable_since_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    /// Records a failure; true if it is the first since the store last answered.
    fn failed(&self) -> bool {
        let now = unix_ms(SystemTime::now()).max(1);
        self.unreachable_since_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Records an answer; true if the store had been unreachable.
    fn answered(&self) -> bool {
        self.unreachable_since_ms.swap(0, Ordering::Relaxed) != 0
    }
}

/// Loads the configuration, then keeps a copy current: the store's change counter is read
/// every `interval`, and at once when PostgreSQL notifies a change; the copy is reloaded when
/// the counter moved. Errors keep the last good copy, are logged once until the store answers
/// again, and show in the returned [`StoreHealth`].
pub async fn watch_customers(
    store: Store,
    interval: Duration,
) -> Result<(watch::Receiver<Arc<Customers>>, Arc<StoreHealth>), StoreError> {
    let first = Customers::load(&store).await?;
    let (tgs, dids) = first.counts();
    info!(
        version = first.version,
        trunk_groups = tgs,
        dids,
        "customer configuration loaded"
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    let health = Arc::new(StoreHealth::default());
    let changed = Arc::new(Notify::new());
    let listener = match store.location() {
        StoreLocation::Postgres(url) => Some(tokio::spawn(listen_for_changes(
            url.clone(),
            changed.clone(),
        ))),
        StoreLocation::Embedded(_) => None,
    };
    let health_out = health.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = changed.notified() => {}
            }
            if tx.is_closed() {
                break;
            }
            let current = tx.borrow().version;
            let result = match store.config_version().await {
                Ok(v) if v == current => Ok(None),
                Ok(_) => Customers::load(&store).await.map(Some),
                Err(e) => Err(e),
            };
            match result {
                Ok(fresh) => {
                    if health.answered() {
                        info!("store reachable again");
                    }
                    if let Some(fresh) = fresh {
                        let (tgs, dids) = fresh.counts();
                        info!(
                            version = fresh.version,
                            trunk_groups = tgs,
                            dids,
                            "customer configuration reloaded"
                        );
                        let _ = tx.send(Arc::new(fresh));
                    }
                }
                Err(e) => {
                    if health.failed() {
                        warn!(error = %e, "store unreachable: routing from the last good configuration");
                    }
                }
            }
        }
        if let Some(listener) = listener {
            listener.abort();
        }
    });
    Ok((rx, health_out))
}

/// The PostgreSQL channel the schema's triggers notify on every configuration change.
const CHANGES_CHANNEL: &str = "lifeline_config";

/// Wakes the refresh loop on every notification from PostgreSQL, when the connection drops,
/// and after every reconnection (notifications sent while disconnected are lost; the loop's
/// own poll covers that too).
async fn listen_for_changes(url: String, changed: Arc<Notify>) {
    let mut failing = false;
    // A pool of its own that gives up quickly: while the database is down, a connection
    // attempt must fail within a moment (the default waits 30 s), so the loop can say so.
    let pool = match PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(LISTEN_RETRY * 2)
        .connect_lazy(&url)
    {
        Ok(pool) => pool,
        Err(e) => {
            warn!(error = %e, "store change notifications unavailable; polling");
            return;
        }
    };
    loop {
        let mut listener = match listen(&pool).await {
            Ok(l) => l,
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    warn!(error = %e, "store change notifications unavailable; polling");
                }
                tokio::time::sleep(LISTEN_RETRY).await;
                continue;
            }
        };
        failing = false;
        changed.notify_one();
        // `try_recv` gives None when the connection drops: connect again from the top. The
        // refresh loop looks at once, so a lost database shows without waiting for its poll.
        while let Ok(Some(_)) = listener.try_recv().await {
            changed.notify_one();
        }
        changed.notify_one();
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

/// A listener on [`CHANGES_CHANNEL`] whose lost connection ends `try_recv` at once
/// (reconnecting is the caller's).
async fn listen(pool: &sqlx::PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(CHANGES_CHANNEL).await?;
    Ok(listener)
}

/// How long to wait before listening again after PostgreSQL went away.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carrier::delivery_rule::FailoverPbx;

    fn group(id: TrunkGroupId, number: Option<&str>, pbx: Option<FailoverPbx>) -> TrunkGroup {
        TrunkGroup {
            id,
            account_id: 1,
            name: format!("group-{id}"),
            username: format!("user-{id}"),
            realm: "lifeline.test".into(),
            ha1_md5: "0".repeat(32),
            ha1_sha256: "0".repeat(64),
            created_at: 0,
            failover_number: number.map(str::to_owned),
            failover_pbx: pbx,
        }
    }

    fn did(number: &str, trunk_group_id: TrunkGroupId, failover: Option<&str>) -> Did {
        Did {
            number: number.into(),
            trunk_group_id,
            created_at: 0,
            failover_number: failover.map(str::to_owned),
        }
    }

    #[test]
    fn failover_combines_the_did_and_its_trunk_group() {
        let customers = Customers::from_parts(
            3,
            vec![
                group(
                    1,
                    Some("+15550002222"),
                    Some(FailoverPbx::Uri("sip:backup.example.com".into())),
                ),
                group(2, None, Some(FailoverPbx::TrunkGroup(1))),
                group(3, None, None),
            ],
            vec![
                did("+15550000001", 1, Some("+15550001111")),
                did("+15550000002", 1, None),
                did("+15550000003", 2, None),
                did("+15550000004", 3, None),
                did("+15550000005", 3, Some("+15550005555")),
                did("+15550000009", 9, Some("+15550009999")),
            ],
        );
        let plan = |n: &str| customers.failover(customers.did(n).unwrap());

        // Its own number, and the group's global number and PBX.
        let p = plan("+15550000001");
        assert_eq!(
            p,
            FailoverPlan {
                did_number: Some("+15550001111".into()),
                global_number: Some("+15550002222".into()),
                pbx: Some(FailoverPbx::Uri("sip:backup.example.com".into())),
            }
        );
        assert_eq!(p.number(), Some("+15550001111"), "the DID's own wins");

        // No number of its own: the global one applies.
        let p = plan("15550000002");
        assert_eq!(p.did_number, None);
        assert_eq!(p.number(), Some("+15550002222"));
        assert!(p.is_configured());

        // A failover trunk group only.
        let p = plan("+15550000003");
        assert_eq!(
            p,
            FailoverPlan {
                did_number: None,
                global_number: None,
                pbx: Some(FailoverPbx::TrunkGroup(1)),
            }
        );
        assert!(p.is_configured());

        // Nothing anywhere: no failover (the call goes to the next trunk server).
        let p = plan("+15550000004");
        assert_eq!(p, FailoverPlan::default());
        assert!(!p.is_configured());

        // Only the DID's own.
        let p = plan("+15550000005");
        assert_eq!(p.number(), Some("+15550005555"));
        assert_eq!((p.global_number, p.pbx), (None, None));

        // A trunk group missing from the copy: the DID's own number still counts.
        let p = plan("+15550000009");
        assert_eq!(
            p,
            FailoverPlan {
                did_number: Some("+15550009999".into()),
                ..FailoverPlan::default()
            }
        );
    }
}
