//! The delivery proxy (RFC 3261 §16, transaction stateful): first step.
//!
//! An initial INVITE for a DID, from the upstream, becomes a [`Delivery`] over the DID's trunk
//! group's bindings on this server (the rule's primary stage). Each branch is a client
//! transaction; its responses are fed to the delivery, whose [`Action`]s say what the caller
//! gets. In-dialog requests that carry a Route naming this server (the Record-Route it added)
//! are forwarded to the next Route, else to their Request-URI; an ACK for a 2xx statelessly.
//!
//! Not yet here: peers (the next trunk server), the failover PBX and number, the PSTN gateway,
//! OPTIONS probing, ICMP errors, call records.
//!
//! The proxy is a pure part of the service loop: it is handed the transaction table and `now`,
//! and what it wants sent outside any transaction is polled with
//! [`poll_transmit`](Proxy::poll_transmit).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use tokio::time::Instant;
use tracing::{Span, debug, info, info_span};

use super::delivery_rule::{
    Action, BranchId, CallFacts, Delivery, DeliveryConfig, DeliveryOutcome, FailoverPlan, Target,
};
use super::registrar::Contact;
use super::store::TrunkGroupId;
use crate::sip::message::{Header, HeaderName, Message, Via};
use crate::sip::transaction::{ClientEvent, ClientId, ClientState, ServerId, Transactions};
use crate::sip::transport::{Flow, ListenSpec, Transport};
use crate::sip::uri::{Host, SipUri, Uri};

// === Addresses and CIDRs ===

/// An address block: `127.0.0.14` (one address), `127.0.0.0/24`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim_matches(['[', ']'])
            .parse()
            .map_err(|_| format!("`{s}`: `{addr}` is not an IP address"))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

// === Configuration ===

/// The proxy's settings (keys of the carrier config).
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// Sources initial requests are accepted from (the PSTN side).
    pub upstream: Vec<Cidr>,
    /// Timers and failover set of the delivery rule.
    pub delivery: DeliveryConfig,
}

impl ProxyConfig {
    /// Whether `ip` is an upstream address.
    pub fn is_upstream(&self, ip: IpAddr) -> bool {
        self.upstream.iter().any(|c| c.contains(ip))
    }
}

// === Targets ===

/// One binding as a branch target: its Contact URI and where requests for it go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchTarget {
    pub uri: SipUri,
    pub dest: Flow,
}

impl fmt::Display for BranchTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {}", self.uri, self.dest.remote)
    }
}

impl BranchTarget {
    /// Where requests for a binding go: over its connection when it registered over TCP or
    /// TLS; over UDP to the Contact's address when it is numeric, else to the address the
    /// REGISTER came from.
    pub fn of(contact: &Contact) -> BranchTarget {
        let flow = contact.binding.flow;
        let dest = if flow.transport.is_stream() {
            Flow {
                transport: flow.transport,
                local: flow.local,
                remote: flow.remote,
                conn: contact.conn,
            }
        } else {
            let remote = match contact.uri.host.ip() {
                Some(ip) => SocketAddr::new(ip, contact.uri.port.unwrap_or(5060)),
                None => flow.remote,
            };
            Flow {
                transport: Transport::Udp,
                local: flow.local,
                remote,
                conn: None,
            }
        };
        BranchTarget {
            uri: contact.uri.clone(),
            dest,
        }
    }
}

// === The proxy ===

/// What a client transaction of the proxy is for.
#[derive(Debug, Clone)]
enum Role {
    /// A branch of a call's delivery.
    Branch { call: ServerId, branch: BranchId },
    /// An in-dialog request forwarded for the caller's server transaction.
    Relay { server: ServerId },
    /// A CANCEL the proxy sent: its answer matters to no one.
    Cancel,
}

/// One inbound call being delivered.
struct Call {
    /// The INVITE as received (its top Via carries received/rport).
    request: Message,
    /// The flow it came in on.
    flow: Flow,
    did: String,
    trunk_group: TrunkGroupId,
    upstream: bool,
    started: Instant,
    delivery: Delivery<BranchTarget>,
    branches: HashMap<BranchId, ClientId>,
    /// Each branch's final response (for a later `Respond { from }`).
    finals: HashMap<BranchId, Message>,
    /// Branches to cancel once they send a provisional (RFC 3261 §9.1).
    cancel_pending: HashSet<BranchId>,
    span: Span,
}

/// The transaction-stateful proxy's state: calls being delivered and the client transactions
/// it started.
pub struct Proxy {
    config: ProxyConfig,
    /// Key of the dialog tokens in this server's Record-Route (see [`dialog_token`]).
    dialog_key: [u8; 32],
    calls: HashMap<ServerId, Call>,
    clients: HashMap<ClientId, Role>,
    transmits: VecDeque<(Flow, Bytes)>,
}

/// A new call's facts, as the service found them.
pub struct NewCall<'a> {
    pub server: ServerId,
    pub request: &'a Message,
    pub flow: Flow,
    pub did: &'a str,
    pub trunk_group: TrunkGroupId,
    pub contacts: Vec<Contact>,
    pub server_name: &'a str,
}

impl Proxy {
    pub fn new(config: ProxyConfig, dialog_key: [u8; 32]) -> Proxy {
        Proxy {
            config,
            dialog_key,
            calls: HashMap::new(),
            clients: HashMap::new(),
            transmits: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The key of this server's dialog tokens.
    pub fn dialog_key(&self) -> &[u8; 32] {
        &self.dialog_key
    }

    /// Whether a call is being delivered for INVITE server transaction `id`.
    pub fn has_call(&self, id: ServerId) -> bool {
        self.calls.contains_key(&id)
    }

    /// How many calls are held.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// A message to send outside any transaction (a forwarded ACK).
    pub fn poll_transmit(&mut self) -> Option<(Flow, Bytes)> {
        self.transmits.pop_front()
    }

    /// The earliest delivery timer of any call.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.calls
            .values()
            .filter_map(|c| c.delivery.poll_timeout())
            .min()
    }

    /// Fires the delivery timers that are due.
    pub fn handle_timeout(&mut self, now: Instant, tx: &mut Transactions<Flow>) {
        let due: Vec<ServerId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.delivery.poll_timeout().is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(call) = self.calls.get_mut(&id) {
                let span = call.span.clone();
                let _g = span.enter();
                call.delivery.handle_timeout(now);
                self.drive(now, tx, id, None);
            }
        }
        self.sweep(tx);
    }

    /// Starts delivering an initial INVITE whose server transaction is `call.server`: 100
    /// Trying at once, then the primary stage.
    pub fn start_call(&mut self, now: Instant, tx: &mut Transactions<Flow>, call: NewCall<'_>) {
        let req = call.request;
        let span = info_span!(
            "call",
            call_id = %req.call_id(),
            did = %call.did,
            trunk_group = call.trunk_group,
        );
        let _g = span.enter();
        let trying = req.response(100, "Trying", None);
        if let Err(e) = tx.respond(call.server, now, trying) {
            debug!(error = %e, "100 Trying not sent");
        }
        let upstream = self.config.is_upstream(call.flow.remote.ip());
        let bindings: Vec<BranchTarget> = call.contacts.iter().map(BranchTarget::of).collect();
        info!(
            call_id = %req.call_id(),
            did = %call.did,
            trunk_group = call.trunk_group,
            source = %call.flow.remote,
            bindings = bindings.len(),
            targets = %bindings.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", "),
            outcome = "accepted",
            "inbound call"
        );
        let facts = CallFacts {
            trunk_group: call.trunk_group,
            bindings,
            failover: FailoverPlan::default(),
            failover_pbx_targets: None,
            server: call.server_name.to_string(),
            peers: Vec::new(),
            tried_by: Vec::new(),
        };
        let delivery = Delivery::new(now, facts, self.config.delivery);
        self.calls.insert(
            call.server,
            Call {
                request: req.clone(),
                flow: call.flow,
                did: call.did.to_string(),
                trunk_group: call.trunk_group,
                upstream,
                started: now,
                delivery,
                branches: HashMap::new(),
                finals: HashMap::new(),
                cancel_pending: HashSet::new(),
                span: span.clone(),
            },
        );
        self.drive(now, tx, call.server, None);
        self.sweep(tx);
    }

    /// The caller CANCELled INVITE server transaction `id` (its call exists).
    pub fn cancel(&mut self, now: Instant, tx: &mut Transactions<Flow>, id: ServerId) {
        if let Some(call) = self.calls.get_mut(&id) {
            let span = call.span.clone();
            let _g = span.enter();
            info!(
                call_id = %call.request.call_id(),
                did = %call.did,
                trunk_group = call.trunk_group,
                elapsed_ms = now.duration_since(call.started).as_millis() as u64,
                outcome = "caller cancelled",
                "CANCEL from the caller"
            );
            call.delivery.handle_cancel(now);
            self.drive(now, tx, id, None);
        }
        self.sweep(tx);
    }

    /// What a client transaction reported. Returns false when it is not one of the proxy's.
    pub fn on_client_event(
        &mut self,
        now: Instant,
        tx: &mut Transactions<Flow>,
        id: ClientId,
        event: ClientEvent,
    ) -> bool {
        let Some(role) = self.clients.get(&id).cloned() else {
            return false;
        };
        match role {
            Role::Cancel => {}
            Role::Relay { server } => relay_in_dialog(now, tx, server, event),
            Role::Branch { call, branch } => {
                if let Some(c) = self.calls.get_mut(&call) {
                    let span = c.span.clone();
                    let _g = span.enter();
                    let mut current = None;
                    match event {
                        ClientEvent::Provisional(m) => {
                            let status = m.status().unwrap_or(100);
                            if c.cancel_pending.remove(&branch) {
                                match tx.cancel(now, id) {
                                    Ok(cid) => {
                                        self.clients.insert(cid, Role::Cancel);
                                    }
                                    Err(e) => debug!(error = %e, "CANCEL not sent"),
                                }
                            }
                            c.delivery.handle_response(now, branch, status);
                            current = Some(*m);
                        }
                        ClientEvent::Final(m) | ClientEvent::Additional2xx(m) => {
                            let status = m.status().unwrap_or(500);
                            c.finals.insert(branch, (*m).clone());
                            c.delivery.handle_response(now, branch, status);
                            current = Some(*m);
                        }
                        ClientEvent::Timeout => c.delivery.handle_response(now, branch, 408),
                        ClientEvent::TransportError => {
                            c.delivery.handle_transport_error(now, branch)
                        }
                    }
                    self.drive(now, tx, call, current.map(|m| (branch, m)));
                }
            }
        }
        self.sweep(tx);
        true
    }

    /// Carries out the delivery's actions for call `id`; `current` is the response just fed.
    fn drive(
        &mut self,
        now: Instant,
        tx: &mut Transactions<Flow>,
        id: ServerId,
        current: Option<(BranchId, Message)>,
    ) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        while let Some(action) = call.delivery.poll_action() {
            match action {
                Action::StartBranch { branch, target } => match target {
                    Target::Binding(t) | Target::FailoverPbx(t) => {
                        let req = branch_request(call, &t, &self.dialog_key);
                        let target_s = t.to_string();
                        let reliable = t.dest.transport.is_stream();
                        match tx.new_client(now, req, t.dest, reliable) {
                            Ok(cid) => {
                                call.branches.insert(branch, cid);
                                self.clients.insert(cid, Role::Branch { call: id, branch });
                                info!(
                                    call_id = %call.request.call_id(),
                                    did = %call.did,
                                    trunk_group = call.trunk_group,
                                    branch = %branch,
                                    target = %target_s,
                                    outcome = "INVITE sent",
                                    elapsed_ms = now.duration_since(call.started).as_millis() as u64,
                                    "branch started"
                                );
                            }
                            Err(e) => {
                                info!(target = %target_s, error = %e, outcome = "not sent", "branch failed");
                                call.delivery.handle_transport_error(now, branch);
                            }
                        }
                    }
                    other => {
                        // Not in this step: peers, failover number.
                        info!(target = %describe(&other), outcome = "unsupported target", "branch skipped");
                        call.delivery.handle_transport_error(now, branch);
                    }
                },
                Action::CancelBranch { branch } => {
                    let Some(&cid) = call.branches.get(&branch) else {
                        continue;
                    };
                    match tx.client(cid).map(|c| c.state()) {
                        Some(ClientState::Proceeding) => match tx.cancel(now, cid) {
                            Ok(c) => {
                                self.clients.insert(c, Role::Cancel);
                            }
                            Err(e) => debug!(error = %e, "CANCEL not sent"),
                        },
                        Some(ClientState::Calling) => {
                            call.cancel_pending.insert(branch);
                        }
                        _ => {}
                    }
                }
                Action::ResolveFailoverPbx { .. } => {
                    call.delivery.handle_failover_pbx_targets(now, Vec::new());
                }
                Action::RelayProvisional { branch, .. } => {
                    if let Some((b, m)) = &current
                        && *b == branch
                    {
                        relay(now, tx, id, m.clone());
                    }
                }
                Action::RelayAnswer { branch, .. } => {
                    let m = match &current {
                        Some((b, m)) if *b == branch => Some(m.clone()),
                        _ => call.finals.get(&branch).cloned(),
                    };
                    if let Some(m) = m {
                        relay(now, tx, id, m);
                    }
                }
                Action::Respond { status, from } => {
                    let from_msg = from.and_then(|b| call.finals.get(&b).cloned());
                    let response = match from_msg {
                        Some(m) if m.status() == Some(status) => m,
                        Some(m) => with_status(&m, status).unwrap_or_else(|| {
                            call.request.response(
                                status,
                                reason(status),
                                Some(&super::server::new_tag()),
                            )
                        }),
                        None => call.request.response(
                            status,
                            reason(status),
                            Some(&super::server::new_tag()),
                        ),
                    };
                    let ours = from.is_none();
                    if ours {
                        let mut r = response;
                        r.push_header(Header::new(HeaderName::Server, super::server::SERVER));
                        if let Err(e) = tx.respond(id, now, r) {
                            debug!(error = %e, "final answer not sent");
                        }
                    } else {
                        relay(now, tx, id, response);
                    }
                }
                Action::Done(outcome) => {
                    let (outcome_s, target) = match &outcome {
                        DeliveryOutcome::Delivered { target, .. } => {
                            ("delivered", describe(target))
                        }
                        DeliveryOutcome::Reached { target, .. } => ("reached", describe(target)),
                        DeliveryOutcome::PassedToPeer { peer, .. } => {
                            ("passed to peer", peer.clone())
                        }
                        DeliveryOutcome::Failed { .. } => ("failed", String::new()),
                        DeliveryOutcome::Cancelled => ("cancelled", String::new()),
                    };
                    info!(
                        call_id = %call.request.call_id(),
                        did = %call.did,
                        trunk_group = call.trunk_group,
                        source = %call.flow.remote,
                        target = %target,
                        status = outcome.status(),
                        attempts = call.delivery.attempts().len(),
                        outcome = outcome_s,
                        elapsed_ms = now.duration_since(call.started).as_millis() as u64,
                        "call delivery ended"
                    );
                }
            }
        }
    }

    /// Forgets calls whose caller has its answer and whose branches are all gone.
    fn sweep(&mut self, tx: &Transactions<Flow>) {
        self.calls.retain(|_, c| {
            !c.delivery.is_done() || c.branches.values().any(|cid| tx.client(*cid).is_some())
        });
    }

    /// Forgets the client transactions that ended. Only once the table's events are drained:
    /// an ended transaction's Timeout or TransportError may still be queued until then.
    pub fn tidy(&mut self, tx: &Transactions<Flow>) {
        self.sweep(tx);
        self.clients.retain(|cid, _| tx.client(*cid).is_some());
    }

    /// Forwards an in-dialog request that named this server in its top Route (RFC 3261 §16.4,
    /// loose routing). `id` is its server transaction (`None` for an ACK, forwarded
    /// statelessly). Returns the answer to send at once when it cannot be forwarded.
    pub fn forward_in_dialog(
        &mut self,
        now: Instant,
        tx: &mut Transactions<Flow>,
        id: Option<ServerId>,
        req: &Message,
        flow: Flow,
        bound: &[ListenSpec],
    ) -> Option<Message> {
        let mut m = req.clone();
        let mut routes = req.header_values(&HeaderName::Route).unwrap_or_default();
        if !routes.is_empty() {
            routes.remove(0);
        }
        m.remove_headers(&HeaderName::Route);
        for r in &routes {
            m.push_header(Header::new(HeaderName::Route, r.to_string()));
        }
        let max_forwards = req.max_forwards().unwrap_or(70);
        if max_forwards == 0 {
            return Some(req.response(483, "Too Many Hops", None));
        }
        m.set_max_forwards(max_forwards - 1);
        let next = match routes.first() {
            Some(r) => crate::sip::uri::NameAddr::parse(r).ok().map(|n| n.uri),
            None => req.uri().cloned(),
        };
        let Some(remote) = next.as_ref().and_then(uri_addr) else {
            info!(call_id = %req.call_id(), method = %req.method(), outcome = "no numeric next hop", "in-dialog request refused");
            return Some(req.response(404, "Not Found", None));
        };
        let local = bound
            .iter()
            .find(|l| l.transport == Transport::Udp && l.addr.is_ipv4() == remote.is_ipv4())
            .map(|l| l.addr)
            .unwrap_or(flow.local);
        let dest = Flow {
            transport: Transport::Udp,
            local,
            remote,
            conn: None,
        };
        m.push_via(our_via(Transport::Udp, local));
        info!(
            call_id = %req.call_id(),
            method = %req.method(),
            source = %flow.remote,
            target = %remote,
            outcome = "forwarded",
            "in-dialog request"
        );
        match id {
            None => {
                self.transmits.push_back((dest, m.to_bytes()));
                None
            }
            Some(server) => match tx.new_client(now, m, dest, false) {
                Ok(cid) => {
                    self.clients.insert(cid, Role::Relay { server });
                    None
                }
                Err(e) => {
                    debug!(error = %e, "in-dialog request not forwarded");
                    Some(req.response(500, "Server Internal Error", None))
                }
            },
        }
    }
}

/// Relays a response of an in-dialog request's client transaction to its server transaction.
fn relay_in_dialog(
    now: Instant,
    tx: &mut Transactions<Flow>,
    server: ServerId,
    event: ClientEvent,
) {
    let response = match event {
        ClientEvent::Provisional(m) if m.status() == Some(100) => return,
        ClientEvent::Provisional(m) | ClientEvent::Final(m) | ClientEvent::Additional2xx(m) => {
            let mut m = *m;
            if !m.pop_via() {
                return;
            }
            m
        }
        ClientEvent::Timeout | ClientEvent::TransportError => {
            let Some(req) = tx.server_request(server) else {
                return;
            };
            let (code, text) = if matches!(event, ClientEvent::Timeout) {
                (408, "Request Timeout")
            } else {
                (503, "Service Unavailable")
            };
            req.response(code, text, Some(&super::server::new_tag()))
        }
    };
    if let Err(e) = tx.respond(server, now, response) {
        debug!(error = %e, "in-dialog response not relayed");
    }
}

/// Relays a branch's response to the caller (our Via removed).
fn relay(now: Instant, tx: &mut Transactions<Flow>, server: ServerId, mut m: Message) {
    if m.vias().len() > 1 {
        m.pop_via();
    }
    if let Err(e) = tx.respond(server, now, m) {
        debug!(error = %e, "response not relayed");
    }
}

/// The INVITE for one branch (RFC 3261 §16.6).
fn branch_request(call: &Call, target: &BranchTarget, dialog_key: &[u8; 32]) -> Message {
    let mut m = call.request.clone();
    let mut uri = target.uri.clone();
    uri.user = Some(ByteString::from(call.did.as_str()));
    uri.password = None;
    uri.headers = None;
    m.set_uri(Uri::Sip(uri));
    m.set_max_forwards(call.request.max_forwards().unwrap_or(70).saturating_sub(1));
    if !call.upstream {
        m.remove_headers(&HeaderName::Other("P-Asserted-Identity".into()));
    }
    let transport_param = match call.flow.transport {
        Transport::Udp => "",
        Transport::Tcp => ";transport=tcp",
        Transport::Tls => ";transport=tls",
    };
    let token = dialog_token(dialog_key, call.request.call_id());
    m.insert_header_first(Header::new(
        HeaderName::RecordRoute,
        format!(
            "<sip:{}{transport_param};lr;{DIALOG_PARAM}={token}>",
            host_port(call.flow.local)
        ),
    ));
    m.push_via(our_via(target.dest.transport, target.dest.local));
    m
}

/// This server's Via with a fresh branch.
fn our_via(transport: Transport, local: SocketAddr) -> Via {
    let text = format!(
        "SIP/2.0/{} {};branch=z9hG4bK{:016x}{:08x};rport",
        transport.as_str(),
        host_port(local),
        rand::random::<u64>(),
        rand::random::<u32>()
    );
    Via::parse(&ByteString::from(text)).expect("our own Via parses")
}

fn host_port(addr: SocketAddr) -> String {
    addr.to_string()
}

/// The numeric address of a SIP URI (maddr ignored); `None` for a host name.
fn uri_addr(uri: &Uri) -> Option<SocketAddr> {
    let u = uri.as_sip()?;
    let ip = match &u.host {
        Host::Name(_) => return None,
        h => h.ip()?,
    };
    Some(SocketAddr::new(ip, u.port.unwrap_or(5060)))
}

/// Whether `uri` names this server: one of its bound addresses.
pub fn names_us(uri: &Uri, bound: &[ListenSpec]) -> bool {
    let Some(addr) = uri_addr(uri) else {
        return false;
    };
    bound.iter().any(|l| {
        l.addr.port() == addr.port() && l.addr.ip().to_canonical() == addr.ip().to_canonical()
    })
}

/// The Record-Route parameter that carries the dialog token.
pub const DIALOG_PARAM: &str = "lld";

/// A dialog token: an HMAC of the Call-ID under this server's key. It goes into the
/// Record-Route of every call this server delivers; an in-dialog request is forwarded only when
/// its top Route carries the token of its own Call-ID. Without it, anyone could have the
/// carrier relay a "mid-dialog" INVITE to any address (an open relay, toll fraud).
pub fn dialog_token(key: &[u8; 32], call_id: &str) -> String {
    let mac = crate::sip::digest::hmac_sha256(key, &[b"lifeline dialog", call_id.as_bytes()]);
    hex::encode(&mac[..12])
}

/// Whether the request's top Route names this server and carries the dialog token of the
/// request's Call-ID: the dialog was set up through this server.
pub fn routed_through_us(req: &Message, bound: &[ListenSpec], key: &[u8; 32]) -> bool {
    let Some(top) = req
        .name_addrs(&HeaderName::Route)
        .ok()
        .and_then(|r| r.into_iter().next())
    else {
        return false;
    };
    let token = top.uri.as_sip().and_then(|u| u.params.value(DIALOG_PARAM));
    names_us(&top.uri, bound)
        && token.is_some_and(|t| {
            let want = dialog_token(key, req.call_id());
            bool::from(subtle::ConstantTimeEq::ct_eq(t.as_bytes(), want.as_bytes()))
        })
}

/// A copy of `m` with another status code (503 passed on as 500, RFC 3261 §16.7 step 6).
fn with_status(m: &Message, status: u16) -> Option<Message> {
    let bytes = m.to_bytes();
    let end = bytes.windows(2).position(|w| w == b"\r\n")?;
    let mut out = BytesMut::with_capacity(bytes.len());
    out.extend_from_slice(format!("SIP/2.0 {status} {}", reason(status)).as_bytes());
    out.extend_from_slice(&bytes[end..]);
    Message::parse(out.freeze()).ok()
}

fn describe(target: &Target<BranchTarget>) -> String {
    target.to_string()
}

/// The reason phrase the proxy writes.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Trying",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        480 => "Temporarily Unavailable",
        483 => "Too Many Hops",
        487 => "Request Terminated",
        500 => "Server Internal Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matches_addresses_and_blocks() {
        let one: Cidr = "127.0.0.14".parse().unwrap();
        assert!(one.contains("127.0.0.14".parse().unwrap()));
        assert!(!one.contains("127.0.0.15".parse().unwrap()));
        let block: Cidr = "127.0.0.0/24".parse().unwrap();
        assert!(block.contains("127.0.0.200".parse().unwrap()));
        assert!(!block.contains("127.0.1.1".parse().unwrap()));
        assert!(block.contains("::ffff:127.0.0.9".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        assert!(!v6.contains("127.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("10.1.2.3".parse().unwrap()));
        assert!(
            "::1"
                .parse::<Cidr>()
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn a_changed_status_keeps_the_rest() {
        let raw = "SIP/2.0 503 Service Unavailable\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let m = Message::parse(Bytes::from_static(raw.as_bytes())).unwrap();
        let n = with_status(&m, 500).unwrap();
        assert_eq!(n.status(), Some(500));
        assert_eq!(n.to().tag(), Some("2"));
    }
}
