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
    dids: DidTable,
}

impl Customers {
    /// Reads the whole configuration.
    pub async fn load(store: &Store) -> Result<Customers, StoreError> {
        // Read the counter first: a change during the load is seen by the next poll.
        let version = store.config_version().await?;
        let mut dids = DidTable::default();
        // On two connections at once.
        let (groups, ()) = tokio::try_join!(
            store.scan_trunk_groups(),
            store.scan_dids(|number, group, failover| dids.insert(number, group, failover)),
        )?;
        Ok(Customers::build(version, groups, dids))
    }

    /// Builds a view from rows (tests).
    pub fn from_parts(version: i64, groups: Vec<TrunkGroup>, dids: Vec<Did>) -> Customers {
        let mut table = DidTable::default();
        for d in &dids {
            table.insert(&d.number, d.trunk_group_id, d.failover_number.as_deref());
        }
        Customers::build(version, groups, table)
    }

    /// A later row of the same trunk group, username or DID wins (the store has none).
    fn build(version: i64, groups: Vec<TrunkGroup>, mut dids: DidTable) -> Customers {
        let mut trunk_groups = HashMap::with_capacity(groups.len());
        let mut by_username = HashMap::with_capacity(groups.len());
        for g in groups {
            by_username.insert(g.username.clone(), g.id);
            trunk_groups.insert(g.id, g);
        }
        dids.finish();
        Customers {
            version,
            trunk_groups,
            by_username,
            dids,
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
    pub fn did(&self, number: &str) -> Option<DidRef<'_>> {
        // A number with a key is only among the compact ones, any other only among the others.
        let digits = number.strip_prefix('+').unwrap_or(number);
        if let Some(key) = digits_key(digits) {
            return self.dids.compact(key);
        }
        if self.dids.other.is_empty() {
            return None;
        }
        let found = if number.starts_with('+') {
            self.dids.other.get_key_value(number)
        } else {
            self.dids.other.get_key_value(format!("+{number}").as_str())
        };
        found.map(|(number, (group, failover))| DidRef {
            number: DidNumber(Text::Other(number)),
            trunk_group_id: *group,
            failover_number: failover.as_deref().map(|f| DidNumber(Text::Other(f))),
        })
    }

    /// The failover settings that apply to a call for `did` (DESIGN.md, "Words"): the DID's
    /// own failover number, and its trunk group's global number and failover PBX. A DID whose
    /// trunk group is not in this copy gets only its own number.
    pub fn failover(&self, did: DidRef<'_>) -> FailoverPlan {
        let group = self.trunk_groups.get(&did.trunk_group_id);
        FailoverPlan {
            did_number: did.failover_number.map(|n| n.to_string()),
            global_number: group.and_then(|g| g.failover_number.clone()),
            pbx: group.and_then(|g| g.failover_pbx.clone()),
        }
    }

    /// The trunk group whose bindings are `did`'s failover PBX, if its failover PBX is a trunk
    /// group of the same account (the store checks this when it is set; a group moved to
    /// another account since is not delivered to).
    pub fn failover_trunk_group(&self, did: DidRef<'_>) -> Option<TrunkGroupId> {
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

/// A DID of the copy, as the routing needs it.
#[derive(Debug, Clone, Copy)]
pub struct DidRef<'a> {
    /// E.164 with the leading `+`.
    pub number: DidNumber<'a>,
    pub trunk_group_id: TrunkGroupId,
    /// The DID's own failover number; when unset, its trunk group's global one applies.
    pub failover_number: Option<DidNumber<'a>>,
}

/// A number of the copy, as text.
#[derive(Clone, Copy)]
pub struct DidNumber<'a>(Text<'a>);

#[derive(Clone, Copy)]
enum Text<'a> {
    /// `+` and up to 19 digits.
    Digits {
        len: u8,
        bytes: [u8; 20],
    },
    Other(&'a str),
}

impl DidNumber<'_> {
    fn from_key(key: u64) -> DidNumber<'static> {
        use std::io::Write;
        let mut bytes = [b'+'; 20];
        let mut rest = &mut bytes[1..];
        write!(rest, "{key}").expect("a key has at most 19 digits");
        let len = (20 - rest.len()) as u8;
        DidNumber(Text::Digits { len, bytes })
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Text::Digits { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).expect("ASCII digits")
            }
            Text::Other(s) => s,
        }
    }
}

impl std::ops::Deref for DidNumber<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for DidNumber<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for DidNumber<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The digits of a number the store writes (after the `+`: 1 to 19 digits, the first not 0)
/// as an integer, which stands for the text one to one.
fn digits_key(digits: &str) -> Option<u64> {
    let ok = (1..=19).contains(&digits.len())
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit());
    if !ok {
        return None;
    }
    digits.parse().ok()
}

/// A number's key if it is `+` and such digits.
fn number_key(number: &str) -> Option<u64> {
    digits_key(number.strip_prefix('+')?)
}

/// The DIDs of a copy: a million of them as strings in a hash map took about 250 MB and a
/// second to build; as sorted integers, 24 MB.
#[derive(Debug, Default)]
struct DidTable {
    /// Every DID whose number has a key ([`number_key`]), as the store writes them all; sorted
    /// by number once [`DidTable::finish`]ed.
    compact: Vec<CompactDid>,
    /// The own failover numbers of compact DIDs that have no key, by the DID's.
    odd_failovers: HashMap<u64, Box<str>>,
    /// Any other DID (SQLite does not refuse all other text from other programs), by number.
    other: HashMap<Box<str>, (TrunkGroupId, Option<Box<str>>)>,
}

#[derive(Debug, Clone, Copy)]
struct CompactDid {
    number: u64,
    trunk_group_id: TrunkGroupId,
    /// The own failover number's key; [`NO_FAILOVER`] or [`ODD_FAILOVER`].
    failover: u64,
}

/// No own failover number (no key is 0).
const NO_FAILOVER: u64 = 0;
/// An own failover number without a key: in `odd_failovers` (keys have at most 19 digits).
const ODD_FAILOVER: u64 = u64::MAX;

impl DidTable {
    fn insert(&mut self, number: &str, trunk_group_id: TrunkGroupId, failover: Option<&str>) {
        let Some(number) = number_key(number) else {
            self.other
                .insert(number.into(), (trunk_group_id, failover.map(Into::into)));
            return;
        };
        let failover = match failover {
            None => NO_FAILOVER,
            Some(f) => number_key(f).unwrap_or_else(|| {
                self.odd_failovers.insert(number, f.into());
                ODD_FAILOVER
            }),
        };
        self.compact.push(CompactDid {
            number,
            trunk_group_id,
            failover,
        });
    }

    /// Sorts the compact DIDs; of two with the same number, the later inserted stays.
    fn finish(&mut self) {
        // Reversed, a stable sort puts the later of equal numbers first, and dedup keeps it.
        self.compact.reverse();
        self.compact.sort_by_key(|d| d.number);
        self.compact.dedup_by_key(|d| d.number);
        self.compact.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.compact.len() + self.other.len()
    }

    fn compact(&self, key: u64) -> Option<DidRef<'_>> {
        let i = self.compact.binary_search_by_key(&key, |d| d.number).ok()?;
        let d = self.compact[i];
        let failover_number = match d.failover {
            NO_FAILOVER => None,
            ODD_FAILOVER => self
                .odd_failovers
                .get(&d.number)
                .map(|f| DidNumber(Text::Other(f))),
            key => Some(DidNumber::from_key(key)),
        };
        Some(DidRef {
            number: DidNumber::from_key(d.number),
            trunk_group_id: d.trunk_group_id,
            failover_number,
        })
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
    fn dids_are_found_as_written_with_or_without_the_plus() {
        let long = "+1234567890123456789"; // 19 digits: the longest compact one
        let longer = "+12345678901234567890";
        let customers = Customers::from_parts(
            1,
            vec![group(1, None, None), group(2, None, None)],
            vec![
                did("+15550000001", 1, None),
                did(long, 2, Some(longer)),
                did(longer, 1, Some("+15550000001")),
                did("+0123", 1, None),
                did("+1,5", 2, Some("+9 9")),
                did("+15550000002", 1, Some("+1666")),
                // Of two rows for one number, the later counts.
                did("+15550000003", 1, None),
                did("+15550000003", 2, Some("+1777")),
                did("+15550000004", 1, Some("+1x")),
                did("+15550000004", 2, None),
            ],
        );
        assert_eq!(customers.counts(), (2, 8));
        let found = |n: &str| {
            customers.did(n).map(|d| {
                (
                    d.number.to_string(),
                    d.trunk_group_id,
                    d.failover_number.map(|f| f.to_string()),
                )
            })
        };
        let some = |n: &str, g, f: Option<&str>| Some((n.to_string(), g, f.map(str::to_owned)));
        assert_eq!(found("+15550000001"), some("+15550000001", 1, None));
        assert_eq!(found("15550000001"), some("+15550000001", 1, None));
        assert_eq!(found(long), some(long, 2, Some(longer)));
        assert_eq!(found(&long[1..]), some(long, 2, Some(longer)));
        assert_eq!(found(longer), some(longer, 1, Some("+15550000001")));
        assert_eq!(found(&longer[1..]), some(longer, 1, Some("+15550000001")));
        assert_eq!(found("+0123"), some("+0123", 1, None));
        assert_eq!(found("0123"), some("+0123", 1, None));
        assert_eq!(found("+123"), None);
        assert_eq!(found("1,5"), some("+1,5", 2, Some("+9 9")));
        assert_eq!(
            found("+15550000002"),
            some("+15550000002", 1, Some("+1666"))
        );
        assert_eq!(
            found("+15550000003"),
            some("+15550000003", 2, Some("+1777"))
        );
        assert_eq!(found("+15550000004"), some("+15550000004", 2, None));
        for absent in [
            "",
            "+",
            "++15550000001",
            "+15550000005",
            "1555000000x",
            "+ 15550000001",
        ] {
            assert_eq!(found(absent), None, "{absent:?}");
        }
        // The number reads as text everywhere a &str does.
        let d = customers.did("15550000001").unwrap();
        let text: &str = &d.number;
        assert_eq!(text, "+15550000001");
        assert_eq!(format!("{:?}", d.number), "\"+15550000001\"");
        assert_eq!(
            customers.failover(d).did_number,
            None,
            "no number of its own"
        );
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
