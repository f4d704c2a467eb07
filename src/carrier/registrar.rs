//! The registrar (RFC 3261 §10.3): REGISTER for trunk groups, challenged with digest, and this
//! server's bindings of contacts to trunk groups.
//!
//! The address-of-record's user part is the trunk group's SIP username. Bindings live in memory
//! (the source of truth while running) and are written behind to this server's own SQLite file
//! ([`BindingStore`]), so they survive a restart without making every REGISTER wait for fsync.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Bound;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{info, warn};

use super::bindings::{Binding, BindingFlow, BindingStore};
use super::customers::Customers;
use super::store::{TrunkGroup, TrunkGroupId};
use crate::sip::digest::{Algorithm, Authenticator, Credentials, DigestError};
use crate::sip::message::{Header, HeaderName, Message};
use crate::sip::transport::{ConnId, Flow};
use crate::sip::uri::{NameAddr, SipUri, Uri};

/// Registrar settings (keys of the `[carrier]` table).
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    /// The digest realm; the stored HA1 values were computed for it.
    pub realm: String,
    /// Expiry granted when the REGISTER names none.
    pub default_expires: u32,
    /// Shorter requests get 423 Interval Too Brief.
    pub min_expires: u32,
    /// Longer requests are granted this.
    pub max_expires: u32,
    /// Contacts one trunk group may bind on this server.
    pub max_contacts: usize,
    /// Challenge algorithms, most preferred first (RFC 8760 §2.4).
    pub algorithms: Vec<Algorithm>,
    /// Failed digest answers from one source address before it is throttled.
    pub auth_failures_allowed: u32,
    /// The window in which those failures are counted.
    pub auth_failure_window: Duration,
    /// How long a throttled source has every digest answer refused unchecked.
    pub auth_throttle: Duration,
}

/// One binding in memory: the stored record, its parsed URI and the live connection.
#[derive(Debug, Clone)]
struct Entry {
    uri: SipUri,
    binding: Binding,
    /// The TCP/TLS connection it registered over, while that connection lives.
    conn: Option<ConnId>,
}

/// A binding as the delivery side sees it.
#[derive(Debug, Clone)]
pub struct Contact {
    pub uri: SipUri,
    pub binding: Binding,
    pub conn: Option<ConnId>,
}

/// A live binding, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct ContactRef<'a> {
    pub uri: &'a SipUri,
    pub binding: &'a Binding,
    pub conn: Option<ConnId>,
}

/// The registrar: bindings of this server, digest state and the failure throttle.
pub struct Registrar {
    config: RegistrarConfig,
    auth: Authenticator,
    bindings: HashMap<TrunkGroupId, Vec<Entry>>,
    store: BindingStore,
    throttle: Throttle,
    /// Trunk groups whose number of bindings changed (see `take_presence_changes`).
    presence_changed: Vec<TrunkGroupId>,
    /// Every change to a trunk group's bindings (loaded, registered, refreshed, removed,
    /// expired) takes the next number: the prober follows them ([`Registrar::changes_after`])
    /// instead of walking every binding. Each trunk group's last change, by group and by
    /// number.
    last_change: HashMap<TrunkGroupId, u64>,
    change_log: BTreeMap<u64, TrunkGroupId>,
}

#[cfg(test)]
impl RegistrarConfig {
    /// Limits for unit tests (the throttle's and the prober's).
    pub(crate) fn for_tests() -> RegistrarConfig {
        RegistrarConfig {
            realm: "r".into(),
            default_expires: 3600,
            min_expires: 60,
            max_expires: 7200,
            max_contacts: 10,
            algorithms: vec![Algorithm::Md5],
            auth_failures_allowed: 3,
            auth_failure_window: Duration::from_secs(60),
            auth_throttle: Duration::from_secs(30),
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch (binding expiry survives restarts).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Registrar {
    /// New limits and digest settings (a reload) for the REGISTERs that follow; bindings
    /// stay as they were granted.
    pub fn set_config(&mut self, config: RegistrarConfig) {
        self.config = config;
    }

    /// A registrar holding the bindings loaded from `store`.
    pub fn new(
        config: RegistrarConfig,
        auth: Authenticator,
        store: BindingStore,
        loaded: Vec<Binding>,
    ) -> Registrar {
        let mut bindings: HashMap<TrunkGroupId, Vec<Entry>> = HashMap::new();
        for binding in loaded {
            let Ok(Uri::Sip(uri)) = Uri::parse(&binding.contact.as_str().into()) else {
                warn!(contact = %binding.contact, "stored binding with an unusable URI dropped");
                store.remove(binding.trunk_group, &binding.contact);
                continue;
            };
            // Room for one: a first push would make room for four entries of ~400 bytes, and
            // most groups have one binding.
            bindings
                .entry(binding.trunk_group)
                .or_insert_with(|| Vec::with_capacity(1))
                .push(Entry {
                    uri,
                    binding,
                    conn: None,
                });
        }
        for entries in bindings.values_mut() {
            entries.shrink_to_fit();
        }
        let mut registrar = Registrar {
            config,
            auth,
            bindings,
            store,
            throttle: Throttle::default(),
            presence_changed: Vec::new(),
            last_change: HashMap::new(),
            change_log: BTreeMap::new(),
        };
        let groups: Vec<TrunkGroupId> = registrar.bindings.keys().copied().collect();
        for group in groups {
            registrar.changed(group);
        }
        registrar
    }

    /// Records a change to `group`'s bindings.
    fn changed(&mut self, group: TrunkGroupId) {
        // Numbers only go up: the next one is taken before an old entry is removed.
        let n = self
            .change_log
            .last_key_value()
            .map_or(1, |(&last, _)| last + 1);
        if let Some(old) = self.last_change.insert(group, n) {
            self.change_log.remove(&old);
        }
        self.change_log.insert(n, group);
    }

    /// Adds or replaces a binding as a REGISTER would, without one (the prober's tests).
    #[cfg(test)]
    pub(crate) fn bind_for_test(&mut self, binding: Binding) {
        let Ok(Uri::Sip(uri)) = Uri::parse(&binding.contact.as_str().into()) else {
            panic!("not a SIP URI: {}", binding.contact);
        };
        let group = binding.trunk_group;
        let entries = self.bindings.entry(group).or_default();
        entries.retain(|e| e.binding.contact != binding.contact);
        entries.push(Entry {
            uri,
            binding,
            conn: None,
        });
        self.changed(group);
    }

    /// The trunk groups whose bindings changed since change `after` (0: since the start), each
    /// once with the number of its last change, in that order.
    pub fn changes_after(&self, after: u64) -> impl Iterator<Item = (u64, TrunkGroupId)> + '_ {
        self.change_log
            .range((Bound::Excluded(after), Bound::Unbounded))
            .map(|(&change, &group)| (change, group))
    }

    /// The live bindings of a trunk group, borrowed, in no particular order.
    pub fn live_contacts(
        &self,
        trunk_group: TrunkGroupId,
        now_ms: i64,
    ) -> impl Iterator<Item = ContactRef<'_>> + '_ {
        self.bindings
            .get(&trunk_group)
            .into_iter()
            .flatten()
            .filter(move |e| e.binding.expires_at_ms > now_ms)
            .map(|e| ContactRef {
                uri: &e.uri,
                binding: &e.binding,
                conn: e.conn,
            })
    }

    /// The live binding of a trunk group for a contact, borrowed.
    pub fn live_contact(
        &self,
        trunk_group: TrunkGroupId,
        contact: &str,
        now_ms: i64,
    ) -> Option<ContactRef<'_>> {
        self.live_contacts(trunk_group, now_ms)
            .find(|c| c.binding.contact == contact)
    }

    /// The live bindings of a trunk group, highest q first.
    pub fn contacts(&self, trunk_group: TrunkGroupId, now_ms: i64) -> Vec<Contact> {
        let mut out: Vec<Contact> = self
            .live_contacts(trunk_group, now_ms)
            .map(|c| Contact {
                uri: c.uri.clone(),
                binding: c.binding.clone(),
                conn: c.conn,
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.binding.q.unwrap_or(1000)));
        out
    }

    /// How many bindings are held.
    pub fn len(&self) -> usize {
        self.bindings.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Trunk groups with at least one binding here.
    pub fn trunk_groups(&self) -> usize {
        self.bindings.values().filter(|b| !b.is_empty()).count()
    }

    /// Drops expired bindings (memory and file).
    pub fn expire(&mut self, now_ms: i64) {
        let store = &self.store;
        let mut changed = Vec::new();
        let mut expired_groups = Vec::new();
        self.bindings.retain(|group, entries| {
            let before = entries.len();
            entries.retain(|e| {
                let live = e.binding.expires_at_ms > now_ms;
                if !live {
                    store.remove(e.binding.trunk_group, &e.binding.contact);
                }
                live
            });
            if entries.len() != before
                && let Some(e) = entries.first()
            {
                changed.push(e.binding.trunk_group);
            }
            if entries.is_empty() {
                expired_groups.push(*group);
            }
            !entries.is_empty()
        });
        for &group in changed.iter().chain(&expired_groups) {
            self.changed(group);
        }
        self.presence_changed.extend(changed);
        self.presence_changed.extend(expired_groups);
    }

    /// Whether some trunk group's number of bindings changed since the last
    /// [`take_presence_changes`](Self::take_presence_changes) (cheap: asked on every turn of
    /// the service loop).
    pub fn presence_changed(&self) -> bool {
        !self.presence_changed.is_empty()
    }

    /// The trunk groups whose number of bindings changed since the last call, with their
    /// live count now (for the presence rows of the shared store).
    pub fn take_presence_changes(&mut self, now_ms: i64) -> Vec<(TrunkGroupId, usize)> {
        let mut groups = std::mem::take(&mut self.presence_changed);
        groups.sort_unstable();
        groups.dedup();
        groups
            .into_iter()
            .map(|g| (g, self.live_contacts(g, now_ms).count()))
            .collect()
    }

    /// Every trunk group with live bindings and how many.
    pub fn presence(&self, now_ms: i64) -> Vec<(TrunkGroupId, usize)> {
        self.bindings
            .keys()
            .map(|&g| (g, self.live_contacts(g, now_ms).count()))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// Writes everything pending to the bindings file.
    pub async fn flush(&self) {
        if let Err(e) = self.store.flush().await {
            warn!(error = %e, "bindings not written");
        }
    }

    /// Answers a REGISTER that arrived over `flow`.
    pub fn register(
        &mut self,
        req: &Message,
        flow: &Flow,
        customers: &Customers,
        wall: SystemTime,
        now: Instant,
        to_tag: &str,
    ) -> Message {
        let reply = |code: u16, reason: &str| req.response(code, reason, Some(to_tag));
        let request = match RegisterRequest::parse(req, &self.config) {
            Ok(r) => r,
            Err(reason) => return reply(400, reason),
        };

        // Authentication (RFC 3261 §22): the AOR must be the trunk group the credentials prove.
        let group = match self.authenticate(req, flow.remote.ip(), customers, wall, now) {
            Ok(g) => g,
            Err(Denied::Challenge { stale }) => {
                let mut r = reply(401, "Unauthorized");
                let scope = scope_of(flow.remote.ip());
                for &alg in &self.config.algorithms {
                    let c =
                        self.auth
                            .challenge_scoped(wall, &self.config.realm, alg, stale, &scope);
                    r.push_header(Header::new(HeaderName::WwwAuthenticate, c.to_string()));
                }
                return r;
            }
            Err(Denied::Forbidden) => return reply(403, "Forbidden"),
            // 503, not 403: a PBX told 403 may stop registering for good (chan_pjsip does).
            Err(Denied::Throttled { retry_after }) => {
                let mut r = reply(503, "Service Unavailable (too many failed attempts)");
                r.push_header(Header::new(
                    HeaderName::RetryAfter,
                    retry_after.as_secs().max(1).to_string(),
                ));
                return r;
            }
        };
        // Compared unescaped: `null-%00-null` is the user `null-\0-null` (RFC 4475 §3.1.1.4).
        if crate::sip::syntax::unescape(&group.username) != request.aor_user.as_bytes() {
            return reply(
                403,
                "Forbidden (the To user is not the authenticated trunk group)",
            );
        }

        let now_ms = unix_ms(wall);
        match self.apply(group.id, &request, req, flow, now_ms) {
            Ok(()) => {}
            Err(Refusal::TooBrief) => {
                let mut r = reply(423, "Interval Too Brief");
                r.push_header(Header::new(
                    HeaderName::MinExpires,
                    self.config.min_expires.to_string(),
                ));
                return r;
            }
            // Not a reason for a PBX to give up: 500 with Retry-After (RFC 3261 §10.3 names no
            // code for a CSeq out of order).
            Err(Refusal::OutOfOrder) => {
                let mut r = reply(500, "CSeq out of order for this Call-ID");
                r.push_header(Header::new(HeaderName::RetryAfter, "1"));
                return r;
            }
            Err(Refusal::TooMany) => {
                return reply(
                    403,
                    "Forbidden (more contacts in one request than max_contacts)",
                );
            }
        }
        let mut r = reply(200, "OK");
        for c in self.contacts(group.id, now_ms) {
            let remaining = ((c.binding.expires_at_ms - now_ms + 999) / 1000).max(0);
            let mut value = format!(
                "<{}>{};expires={remaining}",
                c.binding.contact, c.binding.contact_params
            );
            if let Some(q) = c.binding.q {
                value.push_str(&format!(";q={}", format_q(q)));
            }
            r.push_header(Header::new(HeaderName::Contact, value));
        }
        r
    }

    fn authenticate<'c>(
        &mut self,
        req: &Message,
        source: IpAddr,
        customers: &'c Customers,
        wall: SystemTime,
        now: Instant,
    ) -> Result<&'c TrunkGroup, Denied> {
        let creds = req
            .headers()
            .iter()
            .filter(|h| h.name == HeaderName::Authorization)
            .filter_map(|h| Credentials::parse(&h.value_str()).ok())
            .find(|c| c.realm == self.config.realm);
        let Some(creds) = creds else {
            // No credentials for our realm (or another scheme, RFC 4475 §3.3.7): challenge.
            if let Some(h) = req.header(&HeaderName::Authorization)
                && let Err(e) = Credentials::parse(&h.value_str())
                && !matches!(e, DigestError::NotDigest { .. })
            {
                tracing::debug!(error = %e, "unusable Authorization header");
            }
            return Err(Denied::Challenge { stale: false });
        };
        if let Some(retry_after) = self.throttle.blocked_for(source, now) {
            return Err(Denied::Throttled { retry_after });
        }
        // RFC 2069 answers (no qop) carry no nonce count: they could be replayed for the
        // nonce's lifetime. Every PBX of note does qop=auth when offered.
        if creds.qop.is_none() {
            return Err(Denied::Challenge { stale: false });
        }
        let group = customers.trunk_group_by_username(&creds.username);
        let realm = &self.config.realm;
        let scope = scope_of(source);
        let result =
            self.auth
                .verify_scoped(wall, &creds, "REGISTER", realm, &scope, |user, alg| {
                    group
                        .filter(|g| g.username == user && g.realm == *realm)
                        .map(|g| g.ha1(alg).to_string())
                });
        match (result, group) {
            (Ok(()), Some(group)) => Ok(group),
            // Unreachable (verify needs an HA1 from the group), but never worth a panic.
            (Ok(()), None) => Err(Denied::Forbidden),
            (Err(failure), _) => match failure.rechallenge() {
                Some(stale) => Err(Denied::Challenge { stale }),
                None => {
                    if self.throttle.failed(source, now, &self.config) {
                        warn!(
                            source = %source,
                            failures = self.config.auth_failures_allowed,
                            throttle_ms = self.config.auth_throttle.as_millis() as u64,
                            "digest failures: throttling this source"
                        );
                    }
                    Err(Denied::Forbidden)
                }
            },
        }
    }

    /// Applies a REGISTER's contacts to a trunk group's bindings, all or nothing.
    fn apply(
        &mut self,
        group: TrunkGroupId,
        request: &RegisterRequest,
        req: &Message,
        flow: &Flow,
        now_ms: i64,
    ) -> Result<(), Refusal> {
        let current = self.bindings.get(&group).cloned().unwrap_or_default();
        let mut next = current.clone();
        let call_id = req.call_id();
        let cseq = req.cseq().seq;
        if request.star {
            // `Contact: *` with Expires 0 removes every binding, subject to Call-ID/CSeq order.
            if current
                .iter()
                .any(|e| e.binding.call_id == call_id && e.binding.cseq >= cseq)
            {
                return Err(Refusal::OutOfOrder);
            }
            next.clear();
        }
        for c in &request.contacts {
            let expires = c.expires.unwrap_or(request.expires);
            if expires != 0 && expires < self.config.min_expires {
                return Err(Refusal::TooBrief);
            }
            let expires = expires.min(self.config.max_expires);
            let existing = next.iter().position(|e| e.uri.equivalent(&c.uri));
            if let Some(i) = existing {
                let b = &next[i].binding;
                if b.call_id == call_id && b.cseq >= cseq {
                    return Err(Refusal::OutOfOrder);
                }
                next.remove(i);
            }
            if expires == 0 {
                continue;
            }
            next.push(Entry {
                uri: c.uri.clone(),
                binding: Binding {
                    trunk_group: group,
                    contact: c.uri.to_string(),
                    contact_params: c.params.clone(),
                    q: c.q,
                    expires_at_ms: now_ms + i64::from(expires) * 1000,
                    call_id: call_id.to_string(),
                    cseq,
                    flow: BindingFlow {
                        transport: flow.transport,
                        remote: flow.remote,
                        local: flow.local,
                    },
                    user_agent: req
                        .header(&HeaderName::UserAgent)
                        .map(|h| h.value_str().into_owned()),
                    registered_at_ms: now_ms,
                },
                conn: flow.conn,
            });
        }
        // Over the limit, the oldest other bindings go: a PBX that changes its Contact at every
        // restart (chan_pjsip with line=yes) must not be locked out by its own leftovers.
        while next.len() > self.config.max_contacts {
            let oldest = next
                .iter()
                .enumerate()
                .filter(|(_, e)| !request.contacts.iter().any(|c| e.uri.equivalent(&c.uri)))
                .min_by_key(|(_, e)| e.binding.registered_at_ms)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    next.remove(i);
                }
                None => return Err(Refusal::TooMany),
            }
        }
        // Commit: the file follows behind.
        for e in &current {
            if !next.iter().any(|n| n.binding.contact == e.binding.contact) {
                self.store.remove(group, &e.binding.contact);
            }
        }
        for e in &next {
            let unchanged = current.iter().any(|c| c.binding == e.binding);
            if !unchanged {
                self.store.upsert(e.binding.clone());
            }
        }
        if current.len() != next.len() {
            info!(
                trunk_group = group,
                bindings = next.len(),
                "bindings changed"
            );
            self.presence_changed.push(group);
        }
        if next.is_empty() {
            self.bindings.remove(&group);
        } else {
            next.shrink_to_fit();
            self.bindings.insert(group, next);
        }
        self.changed(group);
        Ok(())
    }
}

enum Denied {
    Challenge { stale: bool },
    Forbidden,
    Throttled { retry_after: Duration },
}

/// Nonces are bound to the client's address: a nonce fetched from one address fails, as
/// unknown (not as a wrong password), in a request from another. So a forged source address
/// cannot run up failures against a PBX's own address.
fn scope_of(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

enum Refusal {
    TooBrief,
    OutOfOrder,
    TooMany,
}

fn format_q(q: u16) -> String {
    let s = format!("{}.{:03}", q / 1000, q % 1000);
    let s = s.trim_end_matches('0');
    s.trim_end_matches('.').to_string()
}

/// The parts of a REGISTER the registrar acts on, checked before authentication so that a
/// malformed request gets 400 rather than a challenge (RFC 4475 §3.1.2.13, §3.3.4).
struct RegisterRequest {
    aor_user: String,
    star: bool,
    contacts: Vec<RequestedContact>,
    /// From the Expires header, else the default.
    expires: u32,
}

struct RequestedContact {
    uri: SipUri,
    /// The header's own parameters other than expires and q, as `;a=b…`.
    params: String,
    expires: Option<u32>,
    q: Option<u16>,
}

impl RegisterRequest {
    fn parse(req: &Message, config: &RegistrarConfig) -> Result<RegisterRequest, &'static str> {
        let aor = match &req.to().uri {
            Uri::Sip(u) => u,
            _ => return Err("Bad Request (the address-of-record must be a sip: or sips: URI)"),
        };
        let aor_user = aor
            .user
            .as_deref()
            .ok_or("Bad Request (the address-of-record has no user part)")?;
        let aor_user = String::from_utf8(crate::sip::syntax::unescape(aor_user))
            .map_err(|_| "Bad Request (the address-of-record user is not UTF-8)")?;
        let expires = match req.header(&HeaderName::Expires) {
            None => config.default_expires,
            Some(h) => parse_delta(&h.value_str()).ok_or("Bad Request (Expires)")?,
        };
        let values = req
            .header_values(&HeaderName::Contact)
            .map_err(|_| "Bad Request (Contact)")?;
        let star = values.iter().any(|v| &v[..] == "*");
        if star && (values.len() != 1 || expires != 0) {
            return Err("Bad Request (Contact: * needs Expires: 0 and no other contact)");
        }
        let mut contacts = Vec::new();
        for v in values.iter().filter(|v| &v[..] != "*") {
            let na = NameAddr::parse(v).map_err(|_| "Bad Request (Contact)")?;
            contacts.push(RequestedContact::from_name_addr(na)?);
        }
        Ok(RegisterRequest {
            aor_user,
            star,
            contacts,
            expires,
        })
    }
}

impl RequestedContact {
    fn from_name_addr(na: NameAddr) -> Result<RequestedContact, &'static str> {
        let Uri::Sip(uri) = na.uri else {
            return Err("Bad Request (a Contact must be a sip: or sips: URI)");
        };
        let mut expires = None;
        let mut q = None;
        let mut params = String::new();
        for p in &na.params.0 {
            if p.name.eq_ignore_ascii_case("expires") {
                expires = Some(
                    p.value
                        .as_deref()
                        .and_then(parse_delta)
                        .ok_or("Bad Request (Contact expires)")?,
                );
            } else if p.name.eq_ignore_ascii_case("q") {
                q = Some(
                    p.value
                        .as_deref()
                        .and_then(parse_q)
                        .ok_or("Bad Request (Contact q)")?,
                );
            } else {
                params.push(';');
                params.push_str(&p.name);
                if let Some(v) = &p.value {
                    params.push('=');
                    params.push_str(v);
                }
            }
        }
        Ok(RequestedContact {
            uri,
            params,
            expires,
            q,
        })
    }
}

/// delta-seconds; values past 2³²−1 saturate (RFC 3261 §25.1 allows any length).
fn parse_delta(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<u64>()
            .map_or(u32::MAX, |v| v.min(u64::from(u32::MAX)) as u32),
    )
}

/// q-value: 0 to 1 with up to three decimals, as thousandths.
fn parse_q(s: &str) -> Option<u16> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_val = format!("{frac:0<3}").parse::<u16>().ok()?;
    match int {
        "0" => Some(frac_val),
        "1" if frac_val == 0 => Some(1000),
        _ => None,
    }
}

// === Throttling digest failures ===

/// Counts digest failures per source address. A source that fails too often has its answers
/// refused unchecked for a while, so a password cannot be guessed at line rate; other sources,
/// including the trunk group's own PBX, are unaffected.
#[derive(Default)]
struct Throttle {
    sources: HashMap<IpAddr, SourceFailures>,
}

struct SourceFailures {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
    refused: u64,
}

/// More sources than this are not tracked (old entries are dropped first).
const MAX_TRACKED_SOURCES: usize = 100_000;

impl Throttle {
    /// How long `source` stays throttled, if it is.
    fn blocked_for(&mut self, source: IpAddr, now: Instant) -> Option<Duration> {
        let s = self.sources.get_mut(&source)?;
        match s.blocked_until {
            Some(until) if now < until => {
                s.refused += 1;
                Some(until - now)
            }
            Some(_) => {
                if s.refused > 0 {
                    info!(source = %source, refused = s.refused, "digest throttle lifted");
                }
                self.sources.remove(&source);
                None
            }
            None => None,
        }
    }

    /// Records a failure; true when this one starts a throttle (log it once per burst).
    fn failed(&mut self, source: IpAddr, now: Instant, config: &RegistrarConfig) -> bool {
        if self.sources.len() >= MAX_TRACKED_SOURCES {
            self.sources.retain(|_, s| {
                s.blocked_until.is_some_and(|u| u > now)
                    || now.duration_since(s.window_start) < config.auth_failure_window
            });
        }
        let s = self.sources.entry(source).or_insert(SourceFailures {
            window_start: now,
            failures: 0,
            blocked_until: None,
            refused: 0,
        });
        if now.duration_since(s.window_start) >= config.auth_failure_window {
            s.window_start = now;
            s.failures = 0;
        }
        s.failures += 1;
        if s.failures >= config.auth_failures_allowed && s.blocked_until.is_none() {
            s.blocked_until = Some(now + config.auth_throttle);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_values() {
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("1.000"), Some(1000));
        assert_eq!(parse_q("0.125"), Some(125));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("0.1234"), None);
        assert_eq!(format_q(500), "0.5");
        assert_eq!(format_q(1000), "1");
        assert_eq!(format_q(125), "0.125");
    }

    #[test]
    fn delta_seconds_saturate() {
        assert_eq!(parse_delta("3600"), Some(3600));
        assert_eq!(parse_delta("1".repeat(100).as_str()), Some(u32::MAX));
        assert_eq!(parse_delta("-1"), None);
    }

    #[test]
    fn throttle_counts_per_source_in_a_window() {
        let config = RegistrarConfig::for_tests();
        let mut t = Throttle::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let now = Instant::now();
        assert!(!t.failed(a, now, &config));
        assert!(!t.failed(a, now, &config));
        assert!(
            t.failed(a, now, &config),
            "the third failure starts the throttle"
        );
        assert!(!t.failed(a, now, &config), "logged once per burst");
        assert_eq!(
            t.blocked_for(a, now + Duration::from_secs(10)),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            t.blocked_for(b, now),
            None,
            "other sources are not affected"
        );
        assert_eq!(
            t.blocked_for(a, now + Duration::from_secs(31)),
            None,
            "the throttle ends"
        );
        // Failures spread beyond the window never add up to a throttle.
        for i in 0..10 {
            assert!(!t.failed(b, now + Duration::from_secs(61 * i), &config));
        }
    }
}
