//! The in-memory copy of the customer configuration (trunk groups and DIDs) that the SIP service
//! reads on every request, and the task that refreshes it when the store changes.
//!
//! DESIGN.md, "What lives where": each server routes from an in-memory copy; while the store is
//! unreachable it keeps the last good copy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::store::{Did, Store, StoreError, TrunkGroup, TrunkGroupId};

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

    /// How many trunk groups and DIDs this copy holds.
    pub fn counts(&self) -> (usize, usize) {
        (self.trunk_groups.len(), self.dids.len())
    }
}

/// Loads the configuration, then keeps a copy current: the store's change counter is polled
/// every `interval` and the copy reloaded when it moved. Errors keep the last good copy and are
/// logged once until the store answers again.
pub async fn watch_customers(
    store: Store,
    interval: Duration,
) -> Result<watch::Receiver<Arc<Customers>>, StoreError> {
    let first = Customers::load(&store).await?;
    let (tgs, dids) = first.counts();
    info!(
        version = first.version,
        trunk_groups = tgs,
        dids,
        "customer configuration loaded"
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut failing = false;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if tx.is_closed() {
                return;
            }
            let current = tx.borrow().version;
            let result = match store.config_version().await {
                Ok(v) if v == current => Ok(None),
                Ok(_) => Customers::load(&store).await.map(Some),
                Err(e) => Err(e),
            };
            match result {
                Ok(None) => failing = false,
                Ok(Some(fresh)) => {
                    failing = false;
                    let (tgs, dids) = fresh.counts();
                    info!(
                        version = fresh.version,
                        trunk_groups = tgs,
                        dids,
                        "customer configuration reloaded"
                    );
                    let _ = tx.send(Arc::new(fresh));
                }
                Err(e) if !failing => {
                    failing = true;
                    warn!(error = %e, "store unreachable: routing from the last good configuration");
                }
                Err(_) => {}
            }
        }
    });
    Ok(rx)
}
