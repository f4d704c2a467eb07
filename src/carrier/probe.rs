//! OPTIONS probing of registered contacts (issue 4; DESIGN.md "Beyond the seed"): a binding
//! whose PBX stopped answering is skipped as if unregistered, so a dead PBX costs a caller no
//! delivery timer.
//!
//! Every `interval` each live binding gets an OPTIONS in a client transaction of its own. Any
//! final response, whatever its code, means the PBX is alive (a PBX may well answer OPTIONS
//! with 404 or 405). No final response within `timeout`, a transport error (ICMP unreachable,
//! connection refused) or the transaction's own timeout is a miss; after `failures` misses in
//! a row the binding is *failing* and the proxy skips it, until it answers a probe again.
//!
//! Probes that come due together are paced ([`MIN_RATE`]), and the prober takes in the
//! registrar's changes ([`Registrar::changes_after`]) rather than walking every binding: with
//! 100 000 bindings an idle carrier does next to nothing.
//!
//! Like the proxy, the prober is a pure part of the service loop: handed the registrar, the
//! transaction table and `now`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use bytestring::ByteString;
use tokio::time::Instant;
use tracing::{info, warn};

use super::proxy::BranchTarget;
use super::registrar::{ContactRef, Registrar, unix_ms};
use super::store::TrunkGroupId;
use crate::sip::message::{Message, Method, Via};
use crate::sip::transaction::{ClientEvent, ClientId, Transactions};
use crate::sip::transport::Flow;
use crate::sip::uri::{Host, NameAddr, SipUri, Uri};

/// Probing settings (keys of the carrier config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    /// How often each binding is probed; `None`: probing is off.
    pub interval: Option<Duration>,
    /// A probe with no final response within this has missed.
    pub timeout: Duration,
    /// Misses in a row before a binding is skipped.
    pub failures: u32,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: Some(Duration::from_secs(30)),
            timeout: Duration::from_secs(2),
            failures: 2,
        }
    }
}

/// The pace: probes are sent at most at twice the rate that probes every binding once per
/// interval, and never held back below this many per second. So a round that comes due all at
/// once (every binding loaded at start, a mass re-registration) is spread over at most half
/// an interval instead of sent in one burst; the probes keep the spread in later rounds.
const MIN_RATE: f64 = 1000.0;

/// How many probes may go at once after a pause: this long at the rate.
const BURST: Duration = Duration::from_millis(20);

/// The shortest wait between two batches of paced probes.
const PACE_STEP: Duration = Duration::from_millis(5);

/// Trunk groups whose bindings changed, taken in per tick; more are taken on the next turn
/// of the service loop (a restart's 100 000 groups do not hold the loop for long).
const SYNC_BATCH: usize = 4096;

type Key = (TrunkGroupId, String);

#[derive(Debug)]
struct State {
    next_at: Instant,
    /// The probe in flight and when it misses.
    in_flight: Option<(ClientId, Instant)>,
    sent_at: Instant,
    misses: u32,
    failing: bool,
    /// When the binding was last registered or refreshed.
    registered_at_ms: i64,
}

impl State {
    /// When this binding needs the prober next: its probe misses, or its next is due.
    fn deadline(&self) -> Instant {
        match self.in_flight {
            Some((_, miss_at)) => miss_at,
            None => self.next_at,
        }
    }
}

/// A probed binding.
#[derive(Debug)]
struct Probed {
    contact: String,
    state: State,
}

/// The probed bindings of one trunk group.
#[derive(Debug, Default)]
struct Group {
    bindings: Vec<Probed>,
    /// The deadline of the group's entry in [`Prober::due`] (older entries are stale).
    queued: Option<Instant>,
    /// In [`Prober::waiting`].
    waiting: bool,
}

/// The prober's state: one entry per probed binding.
pub struct Prober {
    config: ProbeConfig,
    groups: HashMap<TrunkGroupId, Group>,
    /// How many bindings `groups` holds.
    count: usize,
    /// The registrar's change ([`Registrar::changes_after`]) the groups are in step with.
    synced: u64,
    /// When each group needs the prober next, earliest first.
    due: BinaryHeap<Reverse<(Instant, TrunkGroupId)>>,
    /// Groups with a probe due but held back by the pace, in the order they came due.
    waiting: VecDeque<TrunkGroupId>,
    /// Probes that may be sent now (the pace's bucket), as of `refilled`.
    tokens: f64,
    refilled: Option<Instant>,
    clients: HashMap<ClientId, Key>,
    /// The earliest deadline, as of the last tick (the service loop asks for it on every turn:
    /// it must not cost a walk over every binding).
    next_tick: Option<Instant>,
}

impl Prober {
    /// New settings (a reload): probes are scheduled by them from the next one on. Probing
    /// turned off forgets every binding's state: none is skipped as failing any more.
    pub fn set_config(&mut self, config: ProbeConfig) {
        if config.interval.is_none() {
            *self = Prober::new(config);
        }
        self.config = config;
    }

    pub fn new(config: ProbeConfig) -> Prober {
        Prober {
            config,
            groups: HashMap::new(),
            count: 0,
            synced: 0,
            due: BinaryHeap::new(),
            waiting: VecDeque::new(),
            tokens: 0.0,
            refilled: None,
            clients: HashMap::new(),
            next_tick: None,
        }
    }

    /// A client transaction ended (see `Transactions::poll_ended`): a probe of ours that ended
    /// unreported is forgotten here too.
    pub fn client_ended(&mut self, id: ClientId) {
        self.clients.remove(&id);
    }

    /// Whether the binding of `trunk_group` for `contact` is failing its probes.
    pub fn is_failing(&self, trunk_group: TrunkGroupId, contact: &str) -> bool {
        self.groups.get(&trunk_group).is_some_and(|g| {
            g.bindings
                .iter()
                .any(|p| p.state.failing && p.contact == contact)
        })
    }

    /// When [`tick`](Self::tick) must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// Takes in the bindings that changed, sends the probes that are due (as the pace
    /// allows), counts the ones that missed, and forgets bindings that are gone.
    pub fn tick(
        &mut self,
        now: Instant,
        registrar: &Registrar,
        tx: &mut Transactions<Flow>,
        max_forwards: u32,
    ) {
        let Some(interval) = self.config.interval else {
            self.next_tick = None;
            return;
        };
        let now_ms = unix_ms(std::time::SystemTime::now());
        let changes: Vec<_> = registrar
            .changes_after(self.synced)
            .take(SYNC_BATCH + 1)
            .collect();
        let more_changes = changes.len() > SYNC_BATCH;
        for &(change, group) in changes.iter().take(SYNC_BATCH) {
            self.sync(group, now, now_ms, registrar, interval);
            self.synced = change;
        }

        // The pace's bucket.
        let rate = (2.0 * self.count as f64 / interval.as_secs_f64()).max(MIN_RATE);
        let burst = (rate * BURST.as_secs_f64()).max(1.0);
        let elapsed = self.refilled.map_or(burst / rate, |t| {
            now.saturating_duration_since(t).as_secs_f64()
        });
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = Some(now);

        // What waits for the pace goes first, in the order it came due.
        while self.tokens >= 1.0
            && let Some(group) = self.waiting.pop_front()
        {
            let Some(g) = self.groups.get_mut(&group) else {
                continue;
            };
            g.waiting = false;
            if self.serve(group, now, now_ms, registrar, tx, max_forwards, true) {
                self.groups.get_mut(&group).expect("still held").waiting = true;
                self.waiting.push_front(group);
            }
        }
        while let Some(&Reverse((at, group))) = self.due.peek() {
            if at > now {
                break;
            }
            self.due.pop();
            let Some(g) = self.groups.get_mut(&group) else {
                continue;
            };
            if g.queued != Some(at) {
                continue;
            }
            g.queued = None;
            // Behind what already waits for the pace.
            let may_send = !g.waiting && self.waiting.is_empty();
            let was_waiting = g.waiting;
            if self.serve(group, now, now_ms, registrar, tx, max_forwards, may_send) && !was_waiting
            {
                self.groups.get_mut(&group).expect("still held").waiting = true;
                self.waiting.push_back(group);
            }
        }

        let paced = (!self.waiting.is_empty()).then(|| {
            let wait = Duration::from_secs_f64((1.0 - self.tokens).max(0.0) / rate);
            now + wait.max(PACE_STEP)
        });
        let queued = self.due.peek().map(|Reverse((at, _))| *at);
        self.next_tick = if more_changes {
            Some(now)
        } else {
            [paced, queued].into_iter().flatten().min()
        };
    }

    /// Brings a trunk group's probed bindings in step with the registrar's: new ones are
    /// probed one interval from now (they just proved they are alive), gone ones forgotten.
    fn sync(
        &mut self,
        group: TrunkGroupId,
        now: Instant,
        now_ms: i64,
        registrar: &Registrar,
        interval: Duration,
    ) {
        let mut g = self.groups.remove(&group).unwrap_or_default();
        let live = registrar.live_contacts(group, now_ms).count();
        let mut old = std::mem::replace(&mut g.bindings, Vec::with_capacity(live));
        self.count -= old.len();
        for c in registrar.live_contacts(group, now_ms) {
            let probed = match old.iter().position(|p| p.contact == c.binding.contact) {
                Some(i) => {
                    let mut p = old.swap_remove(i);
                    let state = &mut p.state;
                    if state.registered_at_ms != c.binding.registered_at_ms {
                        // Re-registered (a rebooted PBX, say): probe now rather than keep
                        // skipping it for up to an interval on old evidence.
                        state.registered_at_ms = c.binding.registered_at_ms;
                        if state.failing && state.in_flight.is_none() {
                            state.next_at = now;
                        }
                    }
                    p
                }
                None => Probed {
                    contact: c.binding.contact.clone(),
                    state: State {
                        next_at: now + interval,
                        in_flight: None,
                        sent_at: now,
                        misses: 0,
                        failing: false,
                        registered_at_ms: c.binding.registered_at_ms,
                    },
                },
            };
            g.bindings.push(probed);
        }
        if g.bindings.is_empty() {
            // Its entries in `due` and `waiting` are skipped.
            return;
        }
        self.count += g.bindings.len();
        let next = g.bindings.iter().map(|p| p.state.deadline()).min();
        schedule(&mut self.due, group, &mut g, next);
        self.groups.insert(group, g);
    }

    /// Counts `group`'s misses due at `now` and, if `may_send`, sends its probes due as far
    /// as the pace allows; then schedules its next deadline. True if a probe due was held
    /// back (the caller queues the group in `waiting`).
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &mut self,
        group: TrunkGroupId,
        now: Instant,
        now_ms: i64,
        registrar: &Registrar,
        tx: &mut Transactions<Flow>,
        max_forwards: u32,
        may_send: bool,
    ) -> bool {
        let Some(interval) = self.config.interval else {
            return false;
        };
        let Some(g) = self.groups.get_mut(&group) else {
            return false;
        };
        let mut held = false;
        let mut i = 0;
        while i < g.bindings.len() {
            let p = &mut g.bindings[i];
            if let Some((_, miss_at)) = p.state.in_flight
                && miss_at <= now
            {
                // Missed; its transaction goes on, and a late answer still proves the PBX
                // alive (see on_client_event).
                p.state.in_flight = None;
                miss(
                    &mut p.state,
                    group,
                    &p.contact,
                    self.config.failures,
                    "no answer",
                );
            }
            if p.state.in_flight.is_some() || p.state.next_at > now {
                i += 1;
                continue;
            }
            if !may_send || self.tokens < 1.0 {
                held = true;
                i += 1;
                continue;
            }
            let Some(c) = registrar.live_contact(group, &p.contact, now_ms) else {
                // Expired since the group was last taken in.
                g.bindings.swap_remove(i);
                self.count -= 1;
                continue;
            };
            self.tokens -= 1.0;
            p.state.next_at = now + interval;
            let (req, dest) = probe_request(&c, max_forwards);
            match tx.new_client(now, req, dest, dest.transport.is_stream()) {
                Ok(id) => {
                    p.state.in_flight = Some((id, now + self.config.timeout));
                    p.state.sent_at = now;
                    self.clients.insert(id, (group, p.contact.clone()));
                }
                Err(e) => warn!(contact = %c.binding.contact, error = %e, "probe not sent"),
            }
            i += 1;
        }
        if g.bindings.is_empty() {
            self.groups.remove(&group);
            return false;
        }
        // What is held back waits for the pace, not for a deadline.
        let next = g
            .bindings
            .iter()
            .filter(|p| p.state.in_flight.is_some() || p.state.next_at > now)
            .map(|p| p.state.deadline())
            .min();
        schedule(&mut self.due, group, g, next);
        held
    }

    /// What a client transaction reported. Returns false when it is not a probe.
    pub fn on_client_event(&mut self, now: Instant, id: ClientId, event: &ClientEvent) -> bool {
        let Some((group, contact)) = self.clients.get(&id) else {
            return false;
        };
        let probed = self
            .groups
            .get_mut(group)
            .and_then(|g| g.bindings.iter_mut().find(|p| p.contact == *contact));
        let Some(Probed { state, .. }) = probed else {
            self.clients.remove(&id);
            return true;
        };
        let key = (*group, contact.as_str());
        match event {
            ClientEvent::Provisional(_) => return true,
            ClientEvent::Final(m) | ClientEvent::Additional2xx(m) => {
                if state.failing {
                    info!(
                        trunk_group = key.0,
                        contact = %key.1,
                        status = m.status().unwrap_or(0),
                        "binding answers its probes again: used for calls"
                    );
                }
                state.misses = 0;
                state.failing = false;
                let rtt = now.saturating_duration_since(state.sent_at);
                tracing::debug!(trunk_group = key.0, contact = %key.1, rtt_ms = rtt.as_millis() as u64, "probe answered");
            }
            // A probe already counted as missed by the prober's own timeout is not counted
            // twice when its transaction gives up too.
            ClientEvent::Timeout | ClientEvent::TransportError
                if state.in_flight.is_none_or(|(current, _)| current != id) => {}
            ClientEvent::Timeout => miss(state, key.0, key.1, self.config.failures, "timeout"),
            ClientEvent::TransportError => {
                miss(state, key.0, key.1, self.config.failures, "transport error")
            }
        }
        if state.in_flight.is_some_and(|(current, _)| current == id) {
            state.in_flight = None;
        }
        self.clients.remove(&id);
        true
    }
}

/// Queues `group` in `due` at `next` unless an entry at that time or earlier is there (an
/// early entry costs one look at the group, which then queues its real deadline).
fn schedule(
    due: &mut BinaryHeap<Reverse<(Instant, TrunkGroupId)>>,
    group: TrunkGroupId,
    g: &mut Group,
    next: Option<Instant>,
) {
    if let Some(at) = next
        && g.queued.is_none_or(|q| at < q)
    {
        g.queued = Some(at);
        due.push(Reverse((at, group)));
    }
}

fn miss(state: &mut State, trunk_group: TrunkGroupId, contact: &str, failures: u32, why: &str) {
    state.misses = state.misses.saturating_add(1);
    if state.misses >= failures && !state.failing {
        state.failing = true;
        warn!(
            trunk_group,
            contact = %contact,
            misses = state.misses,
            why,
            "binding failing its probes: skipped for calls until it answers"
        );
    }
}

/// The OPTIONS for one binding (RFC 3261 §11), and where it goes.
fn probe_request(c: &ContactRef<'_>, max_forwards: u32) -> (Message, Flow) {
    let target = BranchTarget::for_binding(c.uri, c.binding, c.conn);
    let dest = target.dest;
    let local = dest.local;
    let mut uri = c.uri.clone();
    uri.headers = None;
    uri.password = None;
    let us = SipUri::new(Host::from(local.ip()), Some(local.port()));
    let mut from_uri = us.clone();
    from_uri.user = Some(ByteString::from_static("lifeline"));
    let from = NameAddr::parse(&ByteString::from(format!(
        "<{from_uri}>;tag={}",
        super::server::new_tag()
    )))
    .expect("our own From parses");
    let to = NameAddr::parse(&ByteString::from(format!("<{uri}>"))).expect("a URI parses");
    let via = Via::parse(&ByteString::from(format!(
        "SIP/2.0/{} {};branch=z9hG4bK{:016x};rport",
        dest.transport.as_str(),
        local,
        rand::random::<u64>()
    )))
    .expect("our own Via parses");
    let call_id = format!("{:016x}@lifeline-probe", rand::random::<u64>());
    let req = Message::request(
        Method::Options,
        Uri::Sip(uri),
        via,
        from,
        to,
        &call_id,
        1,
        max_forwards,
    );
    (req, dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carrier::bindings::{Binding, BindingFlow, BindingStore};
    use crate::carrier::registrar::RegistrarConfig;
    use crate::sip::digest::Authenticator;
    use crate::sip::transaction::TimerConfig;
    use crate::sip::transport::Transport;

    const INTERVAL: Duration = Duration::from_secs(30);

    fn binding(group: TrunkGroupId, registered_at_ms: i64) -> Binding {
        Binding {
            trunk_group: group,
            contact: format!("sip:pbx{group}@192.0.2.1:{}", 1000 + group),
            contact_params: String::new(),
            q: None,
            expires_at_ms: unix_ms(std::time::SystemTime::now()) + 3_600_000,
            call_id: format!("{group}@pbx"),
            cseq: 1,
            flow: BindingFlow {
                transport: Transport::Udp,
                remote: "192.0.2.1:5060".parse().unwrap(),
                local: "192.0.2.10:5060".parse().unwrap(),
            },
            user_agent: None,
            registered_at_ms,
        }
    }

    /// A registrar holding one binding for each of trunk groups 1..=groups.
    async fn registrar(groups: i64) -> (tempfile::TempDir, Registrar) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BindingStore::open(dir.path(), Duration::from_secs(3600), 0)
            .await
            .unwrap();
        let config = RegistrarConfig::for_tests();
        let loaded = (1..=groups).map(|g| binding(g, 1)).collect();
        let auth = Authenticator::new(Duration::from_secs(60));
        (dir, Registrar::new(config, auth, store, loaded))
    }

    /// Ticks at `at` and returns the probes sent, by trunk group.
    fn tick(
        prober: &mut Prober,
        at: Instant,
        registrar: &Registrar,
        tx: &mut Transactions<Flow>,
    ) -> Vec<TrunkGroupId> {
        prober.tick(at, registrar, tx, 70);
        let mut sent = Vec::new();
        while let Some((flow, _)) = tx.poll_transmit() {
            sent.push(i64::from(flow.remote.port()) - 1000);
        }
        sent
    }

    /// The client transaction of the probe in flight for `group`.
    fn in_flight(prober: &Prober, group: TrunkGroupId) -> ClientId {
        prober.groups[&group].bindings[0].state.in_flight.unwrap().0
    }

    #[tokio::test]
    async fn a_binding_is_probed_every_interval_and_fails_after_misses_in_a_row() {
        let (_dir, mut registrar) = registrar(1).await;
        let mut tx = Transactions::new(TimerConfig::default());
        let config = ProbeConfig::default();
        let mut prober = Prober::new(config);
        let t0 = Instant::now();
        let contact = "sip:pbx1@192.0.2.1:1001";

        assert!(tick(&mut prober, t0, &registrar, &mut tx).is_empty());
        assert_eq!(
            prober.poll_timeout(),
            Some(t0 + INTERVAL),
            "one interval after"
        );
        assert!(tick(&mut prober, t0 + INTERVAL / 2, &registrar, &mut tx).is_empty());
        assert_eq!(tick(&mut prober, t0 + INTERVAL, &registrar, &mut tx), [1]);
        let miss_at = t0 + INTERVAL + config.timeout;
        assert_eq!(prober.poll_timeout(), Some(miss_at));

        // No answer in time: a miss; the late transport error is not counted again.
        assert!(tick(&mut prober, miss_at, &registrar, &mut tx).is_empty());
        let late = *prober.clients.keys().next().unwrap();
        assert!(prober.on_client_event(miss_at, late, &ClientEvent::TransportError));
        assert!(!prober.is_failing(1, contact));
        assert_eq!(prober.poll_timeout(), Some(t0 + 2 * INTERVAL));

        // A transport error is the second miss in a row.
        let t2 = t0 + 2 * INTERVAL;
        assert_eq!(tick(&mut prober, t2, &registrar, &mut tx), [1]);
        let id = in_flight(&prober, 1);
        assert!(prober.on_client_event(t2, id, &ClientEvent::TransportError));
        assert!(prober.is_failing(1, contact));
        assert!(!prober.is_failing(1, "sip:other@192.0.2.1"));
        assert!(!prober.is_failing(2, contact));

        // Re-registered while failing: probed at once, and any answer means alive.
        let mut refreshed = binding(1, 2);
        refreshed.cseq = 2;
        registrar.bind_for_test(refreshed);
        let t3 = t2 + Duration::from_secs(1);
        assert_eq!(tick(&mut prober, t3, &registrar, &mut tx), [1]);
        let id = in_flight(&prober, 1);
        let answer = tx
            .client(id)
            .unwrap()
            .request()
            .unwrap()
            .response(404, "Not Found", None);
        assert!(prober.on_client_event(t3, id, &ClientEvent::Final(answer)));
        assert!(!prober.is_failing(1, contact));
        // Reported once: the same transaction again is not a probe of ours any more.
        assert!(!prober.on_client_event(t3, id, &ClientEvent::Timeout));
        let just_before = t3 + INTERVAL - Duration::from_millis(1);
        assert!(tick(&mut prober, just_before, &registrar, &mut tx).is_empty());
        assert_eq!(tick(&mut prober, t3 + INTERVAL, &registrar, &mut tx), [1]);
    }

    #[tokio::test]
    async fn a_round_due_at_once_is_paced_and_stays_spread() {
        let groups = 3000;
        let (_dir, registrar) = registrar(groups).await;
        let mut tx = Transactions::new(TimerConfig::default());
        let mut prober = Prober::new(ProbeConfig::default());
        let t0 = Instant::now();
        assert!(tick(&mut prober, t0, &registrar, &mut tx).is_empty());
        assert_eq!(prober.count, 3000);

        // 3000 bindings every 30 s: paced at the floor, 1000/s, after a burst of 20.
        let mut at = t0 + INTERVAL;
        let mut sent_at = HashMap::new();
        let mut ticks = 0;
        while sent_at.len() < 3000 {
            let sent = tick(&mut prober, at, &registrar, &mut tx);
            let elapsed = at - (t0 + INTERVAL);
            let allowed = 20.0 + elapsed.as_secs_f64() * 1000.0;
            for g in sent {
                assert!(sent_at.insert(g, at).is_none(), "{g} sent twice");
            }
            assert!(
                sent_at.len() as f64 <= allowed + 1e-6,
                "{} by {elapsed:?}",
                sent_at.len()
            );
            for id in prober.clients.keys().copied().collect::<Vec<_>>() {
                prober.on_client_event(at, id, &ClientEvent::TransportError);
            }
            let next = prober.poll_timeout().unwrap();
            assert!(next > at);
            at = next;
            ticks += 1;
            assert!(ticks < 1000, "stuck");
        }
        let last = *sent_at.values().max().unwrap();
        let spread = last - (t0 + INTERVAL);
        assert!(spread >= Duration::from_millis(2900), "{spread:?}");
        assert!(spread <= Duration::from_millis(3100), "{spread:?}");

        // The next round: each binding one interval after its own probe.
        let mut again = HashMap::new();
        let mut at = prober.poll_timeout().unwrap();
        while again.len() < 3000 {
            for g in tick(&mut prober, at, &registrar, &mut tx) {
                again.insert(g, at);
                let id = in_flight(&prober, g);
                prober.on_client_event(at, id, &ClientEvent::TransportError);
            }
            at = prober.poll_timeout().unwrap();
        }
        for (g, at) in &again {
            let due = sent_at[g] + INTERVAL;
            assert!(*at >= due && *at - due < Duration::from_millis(50), "{g}");
        }
        // Two misses each: all failing.
        assert!((1..=groups).all(|g| prober.is_failing(g, &binding(g, 1).contact)));
    }

    #[tokio::test]
    async fn changes_are_taken_in_by_batches_and_gone_bindings_forgotten() {
        let groups = SYNC_BATCH as i64 + 10;
        let (_dir, mut registrar) = registrar(groups).await;
        let mut tx = Transactions::new(TimerConfig::default());
        let mut prober = Prober::new(ProbeConfig::default());
        let t0 = Instant::now();
        tick(&mut prober, t0, &registrar, &mut tx);
        assert_eq!(prober.count, SYNC_BATCH);
        assert_eq!(prober.poll_timeout(), Some(t0), "more to take in at once");
        tick(&mut prober, t0, &registrar, &mut tx);
        assert_eq!(prober.count, SYNC_BATCH + 10);
        assert_eq!(prober.poll_timeout(), Some(t0 + INTERVAL));

        // Expired and dropped by the registrar: forgotten at the next tick.
        let now_ms = unix_ms(std::time::SystemTime::now());
        let mut short = binding(1, 5);
        short.expires_at_ms = now_ms + 60_000;
        registrar.bind_for_test(short);
        tick(&mut prober, t0, &registrar, &mut tx);
        assert_eq!(prober.count, SYNC_BATCH + 10);
        registrar.expire(now_ms + 60_001);
        tick(&mut prober, t0, &registrar, &mut tx);
        assert_eq!(prober.count, SYNC_BATCH + 9);
        assert!(!prober.groups.contains_key(&1));
    }

    #[tokio::test]
    async fn probing_turned_off_by_a_reload_forgets_failing_bindings_and_its_deadline() {
        let (_dir, registrar) = registrar(1).await;
        let mut tx = Transactions::new(TimerConfig::default());
        let mut prober = Prober::new(ProbeConfig::default());
        let t0 = Instant::now();
        let contact = "sip:pbx1@192.0.2.1:1001";
        tick(&mut prober, t0, &registrar, &mut tx);
        for round in 1..=2 {
            let at = t0 + INTERVAL * round;
            assert_eq!(tick(&mut prober, at, &registrar, &mut tx), [1]);
            let id = in_flight(&prober, 1);
            prober.on_client_event(at, id, &ClientEvent::TransportError);
        }
        assert!(prober.is_failing(1, contact));
        prober.set_config(ProbeConfig {
            interval: None,
            ..ProbeConfig::default()
        });
        assert!(!prober.is_failing(1, contact));
        // A deadline left in the past would spin the service loop.
        assert_eq!(prober.poll_timeout(), None);
        // Turned on again: every binding is taken in afresh.
        prober.set_config(ProbeConfig::default());
        let t3 = t0 + INTERVAL * 3;
        assert!(tick(&mut prober, t3, &registrar, &mut tx).is_empty());
        assert_eq!(prober.poll_timeout(), Some(t3 + INTERVAL));
    }
}
