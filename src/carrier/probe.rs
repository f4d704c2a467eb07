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
//! Like the proxy, the prober is a pure part of the service loop: handed the registrar, the
//! transaction table and `now`.

use std::collections::HashMap;
use std::net::SocketAddr;
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

/// The prober's state: one entry per probed binding.
pub struct Prober {
    config: ProbeConfig,
    states: HashMap<Key, State>,
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
            self.states.clear();
            self.clients.clear();
            self.next_tick = None;
        }
        self.config = config;
    }

    pub fn new(config: ProbeConfig) -> Prober {
        Prober {
            config,
            states: HashMap::new(),
            clients: HashMap::new(),
            next_tick: None,
        }
    }

    /// Whether the binding of `trunk_group` for `contact` is failing its probes.
    pub fn is_failing(&self, trunk_group: TrunkGroupId, contact: &str) -> bool {
        self.states
            .get(&(trunk_group, contact.to_owned()))
            .is_some_and(|s| s.failing)
    }

    /// When [`tick`](Self::tick) must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// Sends the probes that are due, counts the ones that missed, and forgets bindings that
    /// are gone.
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
        let mut live = std::collections::HashSet::new();
        for c in registrar.each_contact(now_ms) {
            let key = (c.trunk_group, c.binding.contact.clone());
            live.insert(key.clone());
            let state = self.states.entry(key.clone()).or_insert_with(|| State {
                // A new binding is probed one interval after it registered: it just proved
                // it is alive.
                next_at: now + interval,
                in_flight: None,
                sent_at: now,
                misses: 0,
                failing: false,
                registered_at_ms: c.binding.registered_at_ms,
            });
            if state.registered_at_ms != c.binding.registered_at_ms {
                // Re-registered (a rebooted PBX, say): probe now rather than keep skipping it
                // for up to an interval on old evidence.
                state.registered_at_ms = c.binding.registered_at_ms;
                if state.failing && state.in_flight.is_none() {
                    state.next_at = now;
                }
            }
            if let Some((_, miss_at)) = state.in_flight {
                if miss_at > now {
                    continue;
                }
                // Missed; its transaction goes on, and a late answer still proves the PBX
                // alive (see on_client_event).
                state.in_flight = None;
                miss(state, &key, self.config.failures, "no answer");
            }
            if state.next_at > now {
                continue;
            }
            state.next_at = now + interval;
            let (req, dest) = probe_request(&c, max_forwards);
            match tx.new_client(now, req, dest, dest.transport.is_stream()) {
                Ok(id) => {
                    state.in_flight = Some((id, now + self.config.timeout));
                    state.sent_at = now;
                    self.clients.insert(id, key);
                }
                Err(e) => warn!(contact = %c.binding.contact, error = %e, "probe not sent"),
            }
        }
        self.states.retain(|k, _| live.contains(k));
        self.clients
            .retain(|id, k| live.contains(k) && tx.client(*id).is_some());
        self.next_tick = self
            .states
            .values()
            .map(|s| match s.in_flight {
                Some((_, miss_at)) => miss_at,
                None => s.next_at,
            })
            .min();
    }

    /// What a client transaction reported. Returns false when it is not a probe.
    pub fn on_client_event(&mut self, now: Instant, id: ClientId, event: &ClientEvent) -> bool {
        let Some(key) = self.clients.get(&id).cloned() else {
            return false;
        };
        let Some(state) = self.states.get_mut(&key) else {
            self.clients.remove(&id);
            return true;
        };
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
            ClientEvent::Timeout => miss(state, &key, self.config.failures, "timeout"),
            ClientEvent::TransportError => {
                miss(state, &key, self.config.failures, "transport error")
            }
        }
        if state.in_flight.is_some_and(|(current, _)| current == id) {
            state.in_flight = None;
        }
        self.clients.remove(&id);
        true
    }
}

fn miss(state: &mut State, key: &Key, failures: u32, why: &str) {
    state.misses = state.misses.saturating_add(1);
    if state.misses >= failures && !state.failing {
        state.failing = true;
        warn!(
            trunk_group = key.0,
            contact = %key.1,
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
    let us = SipUri::new(host_of(local), Some(local.port()));
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

fn host_of(addr: SocketAddr) -> Host {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => Host::V4(ip),
        std::net::IpAddr::V6(ip) => Host::V6(ip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_turned_off_by_a_reload_forgets_failing_bindings_and_its_deadline() {
        let now = Instant::now();
        let mut prober = Prober::new(ProbeConfig::default());
        prober.states.insert(
            (7, "sip:pbx@192.0.2.1".into()),
            State {
                next_at: now,
                in_flight: None,
                sent_at: now,
                misses: 2,
                failing: true,
                registered_at_ms: 0,
            },
        );
        prober.next_tick = Some(now);
        assert!(prober.is_failing(7, "sip:pbx@192.0.2.1"));
        prober.set_config(ProbeConfig {
            interval: None,
            ..ProbeConfig::default()
        });
        assert!(!prober.is_failing(7, "sip:pbx@192.0.2.1"));
        // A deadline left in the past would spin the service loop.
        assert_eq!(prober.poll_timeout(), None);
    }
}
