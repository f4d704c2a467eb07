//! The delivery proxy (RFC 3261 §16, transaction stateful).
//!
//! An initial INVITE for a DID, from the upstream or a peer trunk server, becomes a
//! [`Delivery`] along the rule's plan ([`super::delivery_rule`]): the DID's trunk group's
//! bindings on this server, then the failover PBX (an address, a name resolved by RFC 3263, or
//! another trunk group's bindings) and the failover number through the PSTN gateway, or else
//! the next trunk server. Each branch is a client transaction; its responses are fed to the
//! delivery, whose [`Action`]s say what the caller gets. In-dialog requests that carry a Route
//! naming this server (the Record-Route it added) are forwarded to the next Route, else to
//! their Request-URI; an ACK for a 2xx statelessly.
//!
//! The proxy is a pure part of the service loop: it is handed the transaction table and `now`,
//! and what it wants done outside (a message sent outside any transaction, a DNS lookup) is
//! polled with [`poll_transmit`](Proxy::poll_transmit) and
//! [`poll_resolve`](Proxy::poll_resolve).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::sip::IdMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use tokio::time::Instant;
use tracing::{Span, debug, info, info_span};

use super::bindings::Binding;
use super::call_record::{AttemptRecord, CallRecord};
use super::delivery_rule::{
    Action, BranchId, CallFacts, Delivery, DeliveryConfig, DeliveryOutcome, FailoverPbx,
    FailoverPlan, Plan, Target,
};
use super::registrar::Contact;
use super::registrar::unix_ms;
use super::store::TrunkGroupId;
use crate::sip::digest::HmacKey;
use crate::sip::message::{Header, HeaderName, Message};
use crate::sip::transaction::{ClientEvent, ClientId, ClientState, ServerId, Transactions};
use crate::sip::transport::{ConnId, Flow, ListenSpec, Transport};
use crate::sip::uri::{Host, SipUri, Uri, push_decimal, push_host_port};

// === Addresses and CIDRs ===

/// An address block: `127.0.0.14` (one address), `127.0.0.0/24`, `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of one address.
    pub fn host(ip: IpAddr) -> Cidr {
        let ip = ip.to_canonical();
        Cidr {
            net: ip,
            prefix: if ip.is_ipv4() { 32 } else { 128 },
        }
    }

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

/// A configured next hop (the PSTN gateway, a peer trunk server): a SIP URI with an IP
/// address, so reaching it needs no DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub uri: SipUri,
    pub addr: SocketAddr,
    pub transport: Transport,
}

impl Hop {
    /// Parses `sip:IP[:PORT][;transport=udp|tcp]`.
    pub fn parse(text: &str) -> Result<Hop, String> {
        let uri = match Uri::parse(&ByteString::from(text)) {
            Ok(Uri::Sip(u)) => u,
            _ => return Err(format!("`{text}` is not a sip: URI")),
        };
        let Some(ip) = uri.host.ip() else {
            return Err(format!("`{text}`: name the host by its IP address"));
        };
        let transport = match uri_transport(&uri) {
            Some(t) => t,
            None if uri.secure => {
                return Err(format!(
                    "`{text}`: TLS towards other servers is not supported yet"
                ));
            }
            None => {
                let t = uri.params.value("transport").unwrap_or_default();
                return Err(format!("`{text}`: transport `{t}` is not supported"));
            }
        };
        let addr = SocketAddr::new(ip, uri.port.unwrap_or(5060));
        Ok(Hop {
            uri,
            addr,
            transport,
        })
    }
}

/// A peer trunk server (`[[carrier.peers]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub hop: Hop,
    /// Where its requests come from.
    pub trusted: Vec<Cidr>,
}

/// The proxy's settings (keys of the carrier config).
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// This trunk server's name.
    pub name: String,
    /// The trunk servers in order (this one may be among them).
    pub peers: Vec<Peer>,
    /// Where failover numbers go.
    pub pstn_gateway: Option<Hop>,
    /// DNS servers for failover PBXs given by name; empty: the system's.
    pub dns_servers: Vec<SocketAddr>,
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

    /// The peer trunk server (not this one) that `ip` belongs to.
    pub fn peer_at(&self, ip: IpAddr) -> Option<&Peer> {
        self.peers
            .iter()
            .filter(|p| p.name != self.name)
            .find(|p| p.trusted.iter().any(|c| c.contains(ip)))
    }

    /// Whether `ip` may assert identities (P-Asserted-Identity): the upstream, a peer or the
    /// PSTN gateway; customers' PBXs may not.
    pub fn asserts_identity(&self, ip: IpAddr) -> bool {
        self.accepts_calls_from(ip)
            || self
                .pstn_gateway
                .as_ref()
                .is_some_and(|g| g.addr.ip().to_canonical() == ip.to_canonical())
    }

    /// Whether new calls are accepted from `ip`: the upstream or a peer.
    pub fn accepts_calls_from(&self, ip: IpAddr) -> bool {
        self.is_upstream(ip) || self.peer_at(ip).is_some()
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
        BranchTarget::for_binding(&contact.uri, &contact.binding, contact.conn)
    }

    /// [`BranchTarget::of`] from a binding's parts.
    pub fn for_binding(uri: &SipUri, binding: &Binding, conn: Option<ConnId>) -> BranchTarget {
        let flow = binding.flow;
        let dest = if flow.transport.is_stream() {
            Flow {
                transport: flow.transport,
                local: flow.local,
                remote: flow.remote,
                conn,
            }
        } else {
            let remote = match uri.host.ip() {
                Some(ip) => SocketAddr::new(ip, uri.port.unwrap_or(5060)),
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
            uri: uri.clone(),
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
    /// A branch still alive after its call's caller got the final answer (boxed: the
    /// other roles are small, and a table of them holds every lingering branch).
    Settled(Box<Settled>),
}

/// What is left of a call for a branch that outlives it: the call itself is forgotten, but a
/// 2xx is still relayed (RFC 6026) and a CANCEL still follows a ring.
#[derive(Debug, Clone, Copy)]
struct Settled {
    server: ServerId,
    reply_to: Flow,
    /// The branch went to a customer's PBX: its P-Asserted-Identity is not passed on.
    untrusted: bool,
    cancel_pending: bool,
}

/// One inbound call being delivered.
struct Call {
    /// The INVITE as received (its top Via carries received/rport).
    request: Message,
    /// The flow it came in on.
    flow: Flow,
    /// Where responses to it go (RFC 3261 §18.2.2, RFC 3581).
    reply_to: Flow,
    did: String,
    trunk_group: TrunkGroupId,
    /// It came from the upstream or a peer: its P-Asserted-Identity is kept.
    trusted: bool,
    /// The servers that tried it before this one (from a peer's mark).
    tried_by: Vec<String>,
    /// The peer that passed it here.
    from_peer: Option<String>,
    started: Instant,
    /// When it arrived, wall clock (Unix ms), for its record.
    started_at_ms: i64,
    delivery: Delivery<BranchTarget>,
    branches: IdMap<BranchId, ClientId>,
    /// The finals not passed on when they came (for a later `Respond { from }`).
    finals: IdMap<BranchId, Message>,
    /// Branches to cancel once they send a provisional (RFC 3261 §9.1).
    cancel_pending: foldhash::HashSet<BranchId>,
    /// The delivery deadline last put in the proxy's timer heap.
    armed: Option<Instant>,
    span: Span,
    /// The settings it started under: a reload does not change where its later stages go.
    config: Arc<ProxyConfig>,
}

/// The transaction-stateful proxy's state: calls being delivered and the client transactions
/// it started.
pub struct Proxy {
    config: Arc<ProxyConfig>,
    /// Key of the dialog tokens in this server's Record-Route (see [`dialog_token`]).
    dialog_key: HmacKey,
    /// The listen addresses: where branches are sent from.
    bound: Vec<ListenSpec>,
    calls: IdMap<ServerId, Call>,
    clients: IdMap<ClientId, Role>,
    transmits: VecDeque<(Flow, Bytes)>,
    resolves: VecDeque<ResolveRequest>,
    records: VecDeque<CallRecord>,
    /// Delivery deadlines of the calls; an entry no longer the call's deadline is stale.
    timers: BinaryHeap<Reverse<(Instant, ServerId)>>,
}

/// A new call's facts, as the service found them.
pub struct NewCall<'a> {
    pub server: ServerId,
    pub request: &'a Message,
    pub flow: Flow,
    pub did: &'a str,
    pub trunk_group: TrunkGroupId,
    /// The trunk group's usable contacts on this server, highest q first.
    pub contacts: Vec<Contact>,
    /// The failover settings of the DID and its trunk group.
    pub failover: FailoverPlan,
    /// When the failover PBX is another trunk group: its usable contacts on this server.
    pub failover_contacts: Vec<Contact>,
}

/// A failover PBX given by name, to be resolved (RFC 3263) for a call.
#[derive(Debug, Clone)]
pub struct ResolveRequest {
    pub call: ServerId,
    pub uri: SipUri,
}

impl Proxy {
    pub fn new(config: ProxyConfig, dialog_key: HmacKey, bound: Vec<ListenSpec>) -> Proxy {
        Proxy {
            config: Arc::new(config),
            dialog_key,
            bound,
            calls: IdMap::default(),
            clients: IdMap::default(),
            transmits: VecDeque::new(),
            resolves: VecDeque::new(),
            records: VecDeque::new(),
            timers: BinaryHeap::new(),
        }
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// New settings (a reload), for calls that start from now on: a call in progress keeps
    /// the plan it was given.
    pub fn set_config(&mut self, config: ProxyConfig) {
        self.config = Arc::new(config);
    }

    /// The key of this server's dialog tokens.
    pub fn dialog_key(&self) -> &HmacKey {
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

    /// The record of a call whose caller got its final answer.
    pub fn poll_record(&mut self) -> Option<CallRecord> {
        self.records.pop_front()
    }

    /// A failover PBX to resolve: report the answer with [`on_resolved`](Self::on_resolved).
    pub fn poll_resolve(&mut self) -> Option<ResolveRequest> {
        self.resolves.pop_front()
    }

    /// The resolved targets of a call's failover PBX (empty when the lookup failed).
    pub fn on_resolved(
        &mut self,
        now: Instant,
        tx: &mut Transactions<Flow>,
        id: ServerId,
        uri: &SipUri,
        targets: Vec<(SocketAddr, Transport)>,
    ) {
        let targets: Vec<BranchTarget> = targets
            .into_iter()
            .map(|(addr, transport)| target_at(&self.bound, uri.clone(), addr, transport))
            .collect();
        if let Some(call) = self.calls.get_mut(&id) {
            let span = call.span.clone();
            let _g = span.enter();
            info!(
                call_id = %call.request.call_id(),
                did = %call.did,
                failover_pbx = %uri,
                targets = %targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
                "failover PBX resolved"
            );
            call.delivery.handle_failover_pbx_targets(now, targets);
            self.drive(now, tx, id, None);
        }
        self.sweep_call(id, tx);
    }

    /// The earliest delivery timer of any call.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        // Entries whose call moved its deadline or is gone are dropped lazily.
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if self.deadline_of(id) == Some(at) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    fn deadline_of(&self, id: ServerId) -> Option<Instant> {
        self.calls.get(&id).and_then(|c| c.delivery.poll_timeout())
    }

    /// Fires the delivery timers that are due.
    pub fn handle_timeout(&mut self, now: Instant, tx: &mut Transactions<Flow>) {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.deadline_of(id) != Some(at) {
                continue;
            }
            if let Some(call) = self.calls.get_mut(&id) {
                let span = call.span.clone();
                let _g = span.enter();
                call.delivery.handle_timeout(now);
                self.drive(now, tx, id, None);
            }
            self.sweep_call(id, tx);
        }
    }

    /// Starts delivering an initial INVITE whose server transaction is `call.server`: 100
    /// Trying at once, then the rule's plan, stage by stage.
    pub fn start_call(&mut self, now: Instant, tx: &mut Transactions<Flow>, call: NewCall<'_>) {
        let req = call.request;
        let span = info_span!(
            "call",
            call_id = %req.call_id(),
            did = %call.did,
            trunk_group = call.trunk_group,
            trunk_server = %self.config.name,
        );
        let _g = span.enter();
        let trying = req.response(100, "Trying", None);
        if let Err(e) = tx.respond(call.server, now, trying) {
            debug!(error = %e, "100 Trying not sent");
        }
        let source = call.flow.remote.ip();
        let from_peer = self.config.peer_at(source).map(|p| p.name.clone());
        let trusted = from_peer.is_some() || self.config.is_upstream(source);
        // Which servers tried the call: believed only from a peer.
        let tried_by = match &from_peer {
            Some(_) => req
                .header_tokens(&tried_by_header())
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect(),
            None => Vec::new(),
        };
        let already_diverted = diverted(req, call.did, call.failover.number());
        let plan = plan_call(
            &self.config,
            &self.bound,
            CallSetup {
                trunk_group: call.trunk_group,
                contacts: &call.contacts,
                failover: call.failover,
                failover_contacts: &call.failover_contacts,
                tried_by: tried_by.clone(),
                already_diverted,
            },
        );
        info!(
            call_id = %req.call_id(),
            did = %call.did,
            trunk_group = call.trunk_group,
            trunk_server = %self.config.name,
            source = %call.flow.remote,
            from_peer = %from_peer.as_deref().unwrap_or("-"),
            tried_by = %tried_by.join(","),
            outcome = "accepted",
            "inbound call"
        );
        for stage in plan.stages() {
            info!(
                call_id = %req.call_id(),
                did = %call.did,
                trunk_group = call.trunk_group,
                trunk_server = %self.config.name,
                stage = %stage.stage,
                plan = %stage,
                "delivery plan"
            );
        }
        let delivery = Delivery::with_plan(now, plan, self.config.delivery);
        self.calls.insert(
            call.server,
            Call {
                request: req.clone(),
                flow: call.flow,
                reply_to: super::server::response_flow(req.top_via(), call.flow),
                did: call.did.to_string(),
                trunk_group: call.trunk_group,
                trusted,
                tried_by,
                from_peer,
                started: now,
                started_at_ms: unix_ms(SystemTime::now()),
                delivery,
                branches: IdMap::default(),
                finals: IdMap::default(),
                cancel_pending: foldhash::HashSet::default(),
                armed: None,
                span: span.clone(),
                config: self.config.clone(),
            },
        );
        self.drive(now, tx, call.server, None);
        self.sweep_call(call.server, tx);
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
        self.sweep_call(id, tx);
    }

    /// What a client transaction reported. Returns false when it is not one of the proxy's.
    pub fn on_client_event(
        &mut self,
        now: Instant,
        tx: &mut Transactions<Flow>,
        id: ClientId,
        event: ClientEvent,
    ) -> bool {
        match self.clients.get(&id) {
            None => return false,
            Some(Role::Cancel) => {}
            Some(&Role::Relay { server }) => relay_in_dialog(now, tx, server, event),
            Some(Role::Settled(settled)) => {
                let settled = **settled;
                self.on_settled_event(now, tx, id, event, settled);
            }
            Some(&Role::Branch { call, branch }) => {
                if let Some(c) = self.calls.get_mut(&call) {
                    let span = c.span.clone();
                    let _g = span.enter();
                    let mut current = None;
                    let mut is_final = false;
                    let untrusted = untrusted_branch(c, branch);
                    let (bound, key) = (&self.bound, &self.dialog_key);
                    let prepare = |m: &mut Message| prepare_answer(m, bound, key, untrusted);
                    match event {
                        ClientEvent::Provisional(mut m) => {
                            let status = m.status().unwrap_or(100);
                            if status > 100 {
                                prepare(&mut m);
                            }
                            if c.cancel_pending.remove(&branch) {
                                send_cancel(&mut self.clients, now, tx, id);
                            }
                            c.delivery.handle_response(now, branch, status);
                            current = Some(m);
                        }
                        ClientEvent::Final(mut m) | ClientEvent::Additional2xx(mut m) => {
                            prepare(&mut m);
                            let status = m.status().unwrap_or(500);
                            c.delivery.handle_response(now, branch, status);
                            current = Some(m);
                            is_final = true;
                        }
                        ClientEvent::Timeout => c.delivery.handle_response(now, branch, 408),
                        ClientEvent::TransportError => {
                            c.delivery.handle_transport_error(now, branch)
                        }
                    }
                    let unused = self.drive(now, tx, call, current.map(|m| (branch, m)));
                    // A final the actions did not pass on is kept for a later answer.
                    if let Some((branch, m)) = unused.filter(|_| is_final)
                        && let Some(c) = self.calls.get_mut(&call)
                    {
                        c.finals.insert(branch, m);
                    }
                }
                self.sweep_call(call, tx);
            }
        }
        true
    }

    /// An event of a branch that outlived its call (see [`Settled`]).
    fn on_settled_event(
        &mut self,
        now: Instant,
        tx: &mut Transactions<Flow>,
        id: ClientId,
        event: ClientEvent,
        settled: Settled,
    ) {
        match event {
            ClientEvent::Provisional(_) if settled.cancel_pending => {
                self.clients.insert(
                    id,
                    Role::Settled(Box::new(Settled {
                        cancel_pending: false,
                        ..settled
                    })),
                );
                send_cancel(&mut self.clients, now, tx, id);
            }
            ClientEvent::Final(mut m) | ClientEvent::Additional2xx(mut m)
                if m.status().is_some_and(|s| (200..300).contains(&s)) =>
            {
                prepare_answer(&mut m, &self.bound, &self.dialog_key, settled.untrusted);
                relay_answer(
                    now,
                    tx,
                    &mut self.transmits,
                    settled.server,
                    settled.reply_to,
                    m,
                );
            }
            _ => {}
        }
    }

    /// Carries out the delivery's actions for call `id`; `current` is the response just fed.
    /// Returns `current` unless an action passed it on.
    fn drive(
        &mut self,
        now: Instant,
        tx: &mut Transactions<Flow>,
        id: ServerId,
        current: Option<(BranchId, Message)>,
    ) -> Option<(BranchId, Message)> {
        let unused = self.drive_actions(now, tx, id, current);
        // Re-arm the call's delivery timer when it moved.
        if let Some(call) = self.calls.get_mut(&id) {
            let deadline = call.delivery.poll_timeout();
            if deadline != call.armed {
                call.armed = deadline;
                if let Some(at) = deadline {
                    self.timers.push(Reverse((at, id)));
                }
            }
        }
        unused
    }

    fn drive_actions(
        &mut self,
        now: Instant,
        tx: &mut Transactions<Flow>,
        id: ServerId,
        mut current: Option<(BranchId, Message)>,
    ) -> Option<(BranchId, Message)> {
        let Some(call) = self.calls.get_mut(&id) else {
            return current;
        };
        while let Some(action) = call.delivery.poll_action() {
            match action {
                Action::StartBranch { branch, target } => {
                    let built =
                        branch_for(call, &target, &call.config, &self.bound, &self.dialog_key);
                    let elapsed_ms = now.duration_since(call.started).as_millis() as u64;
                    let (req, t) = match built {
                        Ok(b) => b,
                        Err(why) => {
                            info!(
                                call_id = %call.request.call_id(),
                                did = %call.did,
                                trunk_group = call.trunk_group,
                                branch = %branch,
                                branch_target = %target,
                                outcome = why,
                                elapsed_ms,
                                "branch not started"
                            );
                            call.delivery.handle_transport_error(now, branch);
                            continue;
                        }
                    };
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
                                branch_target = %target,
                                to = %t,
                                outcome = "INVITE sent",
                                elapsed_ms,
                                "branch started"
                            );
                        }
                        Err(e) => {
                            info!(branch_target = %target, error = %e, outcome = "not sent", "branch failed");
                            call.delivery.handle_transport_error(now, branch);
                        }
                    }
                }
                Action::CancelBranch { branch } => {
                    let Some(&cid) = call.branches.get(&branch) else {
                        continue;
                    };
                    match tx.client(cid).map(|c| c.state()) {
                        Some(ClientState::Proceeding) => {
                            send_cancel(&mut self.clients, now, tx, cid)
                        }
                        Some(ClientState::Calling) => {
                            call.cancel_pending.insert(branch);
                        }
                        _ => {}
                    }
                }
                Action::ResolveFailoverPbx { pbx } => {
                    // Only a failover PBX given by name gets here (see start_call).
                    match pbx {
                        FailoverPbx::Uri(text) => match Uri::parse(&ByteString::from(text)) {
                            Ok(Uri::Sip(uri)) => {
                                self.resolves.push_back(ResolveRequest { call: id, uri })
                            }
                            _ => call.delivery.handle_failover_pbx_targets(now, Vec::new()),
                        },
                        FailoverPbx::TrunkGroup(_) => {
                            call.delivery.handle_failover_pbx_targets(now, Vec::new())
                        }
                    }
                }
                Action::RelayProvisional { branch, .. } => {
                    // Taken, not cloned: the relay edits it without a copy.
                    if let Some((_, m)) = current.take_if(|(b, _)| *b == branch) {
                        relay(now, tx, id, m);
                    }
                }
                Action::RelayAnswer { branch, .. } => {
                    // The response just fed is taken, so the relay edits it without a copy.
                    let m = match current.take_if(|(b, _)| *b == branch) {
                        Some((_, m)) => Some(m),
                        None => call.finals.get(&branch).cloned(),
                    };
                    if let Some(m) = m {
                        relay_answer(now, tx, &mut self.transmits, id, call.reply_to, m);
                    }
                }
                Action::Respond { status, from } => {
                    let from_msg = from.and_then(|b| match current.take_if(|(cb, _)| *cb == b) {
                        Some((_, m)) => Some(m),
                        None => call.finals.get(&b).cloned(),
                    });
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
                            ("delivered", target.to_string())
                        }
                        DeliveryOutcome::Reached { target, .. } => ("reached", target.to_string()),
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
                        answered_by = %target,
                        status = outcome.status(),
                        attempts = call.delivery.attempts().len(),
                        outcome = outcome_s,
                        elapsed_ms = now.duration_since(call.started).as_millis() as u64,
                        "call delivery ended"
                    );
                    self.records.push_back(call_record(
                        call,
                        &self.config.name,
                        now,
                        &outcome,
                        outcome_s,
                        target,
                    ));
                }
            }
        }
        current
    }

    /// Forgets call `id` once its caller has its final answer. Its branches that still live
    /// (lingering for their timers, or cancelled and not yet answered) keep only what they
    /// need as [`Role::Settled`]: a call's state is otherwise held for the 32 s of timer M.
    fn sweep_call(&mut self, id: ServerId, tx: &Transactions<Flow>) {
        if !self.calls.get(&id).is_some_and(|c| c.delivery.is_done()) {
            return;
        }
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        for (&branch, &cid) in &call.branches {
            if tx.client(cid).is_none() {
                self.clients.remove(&cid);
                continue;
            }
            let settled = Settled {
                server: id,
                reply_to: call.reply_to,
                untrusted: untrusted_branch(&call, branch),
                cancel_pending: call.cancel_pending.contains(&branch),
            };
            self.clients.insert(cid, Role::Settled(Box::new(settled)));
        }
    }

    /// A client transaction ended (see [`Transactions::poll_ended`]): forgotten here too.
    pub fn client_ended(&mut self, id: ClientId) {
        self.clients.remove(&id);
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
        if !self.config.asserts_identity(flow.remote.ip()) {
            m.remove_headers(&pai_header());
        }
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
        push_our_via(&mut m, Transport::Udp, local);
        info!(
            call_id = %req.call_id(),
            trunk_server = %self.config.name,
            method = %req.method(),
            source = %flow.remote,
            next_hop = %remote,
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
        ClientEvent::Provisional(mut m)
        | ClientEvent::Final(mut m)
        | ClientEvent::Additional2xx(mut m) => {
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
fn relay(now: Instant, tx: &mut Transactions<Flow>, server: ServerId, m: Message) {
    let m = without_our_via(m);
    if let Err(e) = tx.respond(server, now, m) {
        debug!(error = %e, "response not relayed");
    }
}

/// A 2xx after the caller's final answer (RFC 6026): through the server transaction while it
/// accepts one, else statelessly to `reply_to`, so the caller can ACK it and hang up; nobody
/// else would.
fn relay_answer(
    now: Instant,
    tx: &mut Transactions<Flow>,
    transmits: &mut VecDeque<(Flow, Bytes)>,
    server: ServerId,
    reply_to: Flow,
    m: Message,
) {
    let m = without_our_via(m);
    if tx.respond(server, now, m.clone()).is_err() {
        transmits.push_back((reply_to, m.to_bytes()));
    }
}

/// A branch's answer made fit for the caller: our Record-Route rewritten, and the
/// P-Asserted-Identity of an untrusted branch removed.
fn prepare_answer(m: &mut Message, bound: &[ListenSpec], key: &HmacKey, untrusted: bool) {
    rewrite_record_route(m, bound, key);
    if untrusted {
        m.remove_headers(&pai_header());
    }
}

/// CANCELs INVITE client transaction `id` (the proxy follows the CANCEL as [`Role::Cancel`]).
fn send_cancel(
    clients: &mut IdMap<ClientId, Role>,
    now: Instant,
    tx: &mut Transactions<Flow>,
    id: ClientId,
) {
    match tx.cancel(now, id) {
        Ok(cid) => {
            clients.insert(cid, Role::Cancel);
        }
        Err(e) => debug!(error = %e, "CANCEL not sent"),
    }
}

fn without_our_via(mut m: Message) -> Message {
    if m.vias().len() > 1 {
        m.pop_via();
    }
    m
}

/// What [`plan_call`] needs to know of a call.
pub struct CallSetup<'a> {
    pub trunk_group: TrunkGroupId,
    /// The trunk group's usable contacts here, highest q first.
    pub contacts: &'a [Contact],
    pub failover: FailoverPlan,
    /// The failover trunk group's usable contacts here (when the failover PBX is one).
    pub failover_contacts: &'a [Contact],
    /// The servers that tried the call already.
    pub tried_by: Vec<String>,
    /// The call was diverted from this DID or to its number before.
    pub already_diverted: bool,
}

/// The delivery rule's plan for a call on this server: what the proxy follows, and what
/// `explain` prints. A failover PBX given by an address is a target at once; one given by
/// name is left to be resolved when the call gets that far; an unusable one has no targets.
pub fn plan_call(
    config: &ProxyConfig,
    bound: &[ListenSpec],
    call: CallSetup<'_>,
) -> Plan<BranchTarget> {
    let failover_pbx_targets = match &call.failover.pbx {
        None => None,
        Some(FailoverPbx::TrunkGroup(_)) => Some(
            call.failover_contacts
                .iter()
                .map(BranchTarget::of)
                .collect(),
        ),
        Some(FailoverPbx::Uri(text)) => match Uri::parse(&ByteString::from(text.as_str())) {
            Ok(Uri::Sip(u)) => match (u.host.ip(), uri_transport(&u)) {
                (_, None) => Some(Vec::new()),
                (Some(ip), Some(t)) => {
                    let addr = SocketAddr::new(ip, u.port.unwrap_or(t.default_port()));
                    Some(vec![target_at(bound, u, addr, t)])
                }
                (None, Some(_)) => None,
            },
            _ => Some(Vec::new()),
        },
    };
    Plan::new(CallFacts {
        trunk_group: call.trunk_group,
        bindings: call.contacts.iter().map(BranchTarget::of).collect(),
        failover: call.failover,
        failover_pbx_targets,
        server: config.name.clone(),
        peers: config.peers.iter().map(|p| p.name.clone()).collect(),
        tried_by: call.tried_by,
        already_diverted: call.already_diverted,
    })
}

/// A customer's PBX does not assert identities to the caller: only the gateway's and a peer's
/// answers keep their P-Asserted-Identity.
fn untrusted_branch(call: &Call, branch: BranchId) -> bool {
    matches!(
        call.delivery
            .attempts()
            .get(branch.index())
            .map(|a| &a.target),
        Some(Target::Binding(_) | Target::FailoverPbx(_))
    )
}

/// The record of a call that has its final answer.
fn call_record(
    call: &Call,
    server: &str,
    now: Instant,
    outcome: &DeliveryOutcome<BranchTarget>,
    outcome_name: &str,
    answered_by: String,
) -> CallRecord {
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    CallRecord {
        call_id: call.request.call_id().to_string(),
        did: call.did.clone(),
        trunk_group: call.trunk_group,
        server: server.to_string(),
        source: call.flow.remote.to_string(),
        from_peer: call.from_peer.clone(),
        started_at_ms: call.started_at_ms,
        duration_ms: ms(now.saturating_duration_since(call.started)),
        status: outcome.status(),
        outcome: outcome_name.to_string(),
        answered_by: (!answered_by.is_empty()).then_some(answered_by),
        attempts: call
            .delivery
            .attempts()
            .iter()
            .map(|a| AttemptRecord {
                stage: a.stage.to_string(),
                target: a.target.to_string(),
                offset_ms: ms(a.started.saturating_duration_since(call.started)),
                duration_ms: a.duration().map(ms),
                outcome: a
                    .outcome
                    .map_or_else(|| "undecided".to_string(), |o| o.to_string()),
            })
            .collect(),
    }
}

/// The header in which trunk servers mark which of them tried a call (a comma-separated list
/// of their configured names). Believed only from a peer; never sent to a PBX or the gateway.
pub const TRIED_BY: &str = "Lifeline-Tried-By";

fn pai_header() -> HeaderName {
    HeaderName::Other("P-Asserted-Identity".into())
}

fn tried_by_header() -> HeaderName {
    HeaderName::Other(TRIED_BY.into())
}

/// The INVITE of one branch and where it goes, or why the target cannot be tried.
fn branch_for(
    call: &Call,
    target: &Target<BranchTarget>,
    config: &ProxyConfig,
    bound: &[ListenSpec],
    dialog_key: &HmacKey,
) -> Result<(Message, BranchTarget), &'static str> {
    match target {
        Target::Binding(t) | Target::FailoverPbx(t) => {
            let mut t = t.clone();
            t.uri.user = Some(ByteString::from(call.did.as_str()));
            Ok((branch_request(call, &t, dialog_key), t))
        }
        Target::FailoverNumber(number) => {
            let Some(gw) = &config.pstn_gateway else {
                return Err("no pstn_gateway configured");
            };
            let mut uri = gw.uri.clone();
            uri.user = Some(ByteString::from(number.as_str()));
            let t = target_at(bound, uri, gw.addr, gw.transport);
            let mut m = branch_request(call, &t, dialog_key);
            // RFC 5806: the most recent diversion first.
            let diversion = format!(
                "<sip:{}@{}>;reason=unavailable;counter=1",
                call.did,
                host_port(call.flow.local)
            );
            prepend_diversion(&mut m, diversion);
            Ok((m, t))
        }
        Target::NextServer(name) => {
            let Some(peer) = config.peers.iter().find(|p| p.name == *name) else {
                return Err("peer not configured");
            };
            let mut uri = peer.hop.uri.clone();
            uri.user = Some(ByteString::from(call.did.as_str()));
            let t = target_at(bound, uri, peer.hop.addr, peer.hop.transport);
            let mut m = branch_request(call, &t, dialog_key);
            let mut tried = call.tried_by.clone();
            tried.push(config.name.clone());
            m.push_header(Header::new(tried_by_header(), tried.join(", ")));
            Ok((m, t))
        }
    }
}

/// A branch target for `uri` at `addr`, sent from this server's listen address of that
/// transport and address family.
fn target_at(
    bound: &[ListenSpec],
    uri: SipUri,
    addr: SocketAddr,
    transport: Transport,
) -> BranchTarget {
    let local = bound
        .iter()
        .find(|l| l.transport == transport && l.addr.is_ipv4() == addr.is_ipv4())
        .or_else(|| bound.iter().find(|l| l.addr.is_ipv4() == addr.is_ipv4()))
        .or(bound.first())
        .map(|l| l.addr)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    BranchTarget {
        uri,
        dest: Flow {
            transport,
            local,
            remote: addr,
            conn: None,
        },
    }
}

/// The transport a URI asks for (`None`: one this server cannot use towards it).
fn uri_transport(uri: &SipUri) -> Option<Transport> {
    if uri.secure {
        return None;
    }
    match uri.params.value("transport") {
        None => Some(Transport::Udp),
        Some(t) => Transport::from_token(t).filter(|t| *t != Transport::Tls),
    }
}

fn diversion_header() -> HeaderName {
    HeaderName::Other("Diversion".into())
}

/// Adds a Diversion entry before the request's others: they are read newest first.
fn prepend_diversion(m: &mut Message, value: String) {
    let existing = m.header_values(&diversion_header()).unwrap_or_default();
    m.remove_headers(&diversion_header());
    m.push_header(Header::new(diversion_header(), value));
    for v in existing {
        m.push_header(Header::new(diversion_header(), v.to_string()));
    }
}

/// Whether a Diversion or History-Info entry of `req` names the DID or the failover number:
/// the call has been diverted along this path before. Every Diversion entry is a diversion;
/// of History-Info (RFC 7044) the last entry is only the current Request-URI (an upstream
/// that keeps History-Info adds one for the DID itself), so it does not count.
fn diverted(req: &Message, did: &str, number: Option<&str>) -> bool {
    let digits = |s: &str| s.trim_start_matches('+').to_string();
    let wanted: Vec<String> = std::iter::once(did).chain(number).map(digits).collect();
    let mut history = req
        .name_addrs(&HeaderName::Other("History-Info".into()))
        .unwrap_or_default();
    history.pop();
    req.name_addrs(&diversion_header())
        .unwrap_or_default()
        .into_iter()
        .chain(history)
        .filter_map(|n| match n.uri {
            Uri::Sip(u) => u
                .user_unescaped()
                .map(|u| String::from_utf8_lossy(&u).into_owned()),
            Uri::Tel(t) => Some(t.number.to_string()),
            _ => None,
        })
        .any(|user| wanted.contains(&digits(&user)))
}

/// The INVITE for one branch (RFC 3261 §16.6): the Request-URI `target.uri`, one hop less,
/// P-Asserted-Identity only from a trusted source, no tried-by mark, this server's
/// Record-Route and Via.
fn branch_request(call: &Call, target: &BranchTarget, dialog_key: &HmacKey) -> Message {
    let mut m = call.request.clone();
    let mut uri = target.uri.clone();
    uri.password = None;
    uri.headers = None;
    m.set_uri(Uri::Sip(uri));
    m.set_max_forwards(call.request.max_forwards().unwrap_or(70).saturating_sub(1));
    if !call.trusted {
        m.remove_headers(&pai_header());
    }
    m.remove_headers(&tried_by_header());
    let transport_param = match call.flow.transport {
        Transport::Udp => "",
        Transport::Tcp => ";transport=tcp",
        Transport::Tls => ";transport=tls",
    };
    // The callee's requests of the dialog go to the caller's Contact.
    let token = dialog_token(
        dialog_key,
        call.request.call_id(),
        &target_key(contact_uri(&call.request).as_ref()),
    );
    let mut rr = String::with_capacity(80);
    rr.push_str("<sip:");
    push_host_port(&mut rr, call.flow.local);
    for part in [transport_param, ";lr;", DIALOG_PARAM, "=", &token, ">"] {
        rr.push_str(part);
    }
    m.insert_header_first(Header::new(HeaderName::RecordRoute, rr));
    push_our_via(&mut m, target.dest.transport, target.dest.local);
    m
}

/// Puts this server's Via, with a fresh branch, on top of `m`: written once, parsed once.
fn push_our_via(m: &mut Message, transport: Transport, local: SocketAddr) {
    let mut text = String::with_capacity(80);
    text.push_str("SIP/2.0/");
    text.push_str(transport.as_str());
    text.push(' ');
    push_host_port(&mut text, local);
    text.push_str(";branch=z9hG4bK");
    let mut random = [0u8; 12];
    rand::fill(&mut random);
    text.push_str(&hex::encode(random));
    text.push_str(";rport");
    m.push_via_text(ByteString::from(text))
        .expect("our own Via parses");
}

fn host_port(addr: SocketAddr) -> String {
    let mut text = String::with_capacity(48);
    push_host_port(&mut text, addr);
    text
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

/// A dialog token: an HMAC, under this server's key, of the Call-ID and of the remote target
/// that requests carrying it may be sent to (`host:port` of a Contact). It goes into this
/// server's Record-Route: in the INVITE bound to the caller's Contact (what the callee's
/// requests are sent to), rewritten in the callee's responses to bind the callee's Contact
/// (RFC 3261 §16.7 lets a proxy rewrite its own Record-Route in responses). An in-dialog
/// request is forwarded only when its top Route carries the token of its Call-ID and its
/// Request-URI. Without the token anyone could have the carrier relay a "mid-dialog" INVITE
/// anywhere; without the target, a party of one call could reuse its token to reach any
/// address, the PSTN gateway included (toll fraud). A target refreshed by a re-INVITE is not
/// followed: requests to the new Contact are refused.
pub fn dialog_token(key: &HmacKey, call_id: &str, target: &str) -> String {
    let mac = key.mac(&[
        b"lifeline dialog",
        call_id.as_bytes(),
        b"\0",
        target.as_bytes(),
    ]);
    hex::encode(&mac[..12])
}

/// The `host:port` a dialog token binds: a SIP URI's host (lowercase) and port (5060 when
/// absent); empty for other URIs (no request can match it).
pub fn target_key(uri: Option<&Uri>) -> String {
    match uri.and_then(|u| u.as_sip()) {
        Some(u) => {
            let mut key = String::with_capacity(48);
            u.host.push_to(&mut key);
            key.push(':');
            push_decimal(&mut key, u.port.unwrap_or(5060).into());
            key.make_ascii_lowercase();
            key
        }
        None => String::new(),
    }
}

/// The first Contact URI of a message.
fn contact_uri(m: &Message) -> Option<Uri> {
    m.name_addrs(&HeaderName::Contact)
        .ok()
        .and_then(|c| c.into_iter().next())
        .map(|n| n.uri)
}

/// In a response of the callee, binds this server's Record-Route token to the callee's Contact:
/// the caller's requests of the dialog are sent there.
fn rewrite_record_route(m: &mut Message, bound: &[ListenSpec], key: &HmacKey) {
    let Ok(routes) = m.name_addrs(&HeaderName::RecordRoute) else {
        return;
    };
    let ours = |n: &crate::sip::uri::NameAddr| {
        names_us(&n.uri, bound)
            && n.uri
                .as_sip()
                .is_some_and(|u| u.params.value(DIALOG_PARAM).is_some())
    };
    if !routes.iter().any(ours) {
        return;
    }
    let token = dialog_token(key, m.call_id(), &target_key(contact_uri(m).as_ref()));
    let values: Vec<String> = routes
        .into_iter()
        .map(|mut n| {
            if ours(&n)
                && let Uri::Sip(u) = &mut n.uri
            {
                u.params.set(DIALOG_PARAM, Some(&token));
            }
            n.to_string()
        })
        .collect();
    m.remove_headers(&HeaderName::RecordRoute);
    for v in values {
        m.push_header(Header::new(HeaderName::RecordRoute, v));
    }
}

/// Whether the request's top Route names this server and carries the dialog token of the
/// request's Call-ID and Request-URI: the dialog was set up through this server, and the
/// request goes to a party of it.
pub fn routed_through_us(req: &Message, bound: &[ListenSpec], key: &HmacKey) -> bool {
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
            let want = dialog_token(key, req.call_id(), &target_key(req.uri()));
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

    fn invite_with(headers: &str) -> Message {
        let text = format!(
            "INVITE sip:+15550001111@127.0.0.1 SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.2;branch=z9hG4bK1\r\n\
             From: <sip:a@127.0.0.2>;tag=1\r\nTo: <sip:+15550001111@127.0.0.1>\r\n\
             Call-ID: c1\r\nCSeq: 1 INVITE\r\n{headers}Content-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(text)).unwrap()
    }

    #[test]
    fn a_diversion_naming_the_did_or_the_number_is_a_loop() {
        let did = "+15550001111";
        let plain = invite_with("");
        assert!(!diverted(&plain, did, Some("+15559990001")));
        // The DID itself, written without `+`, in a SIP URI.
        let m = invite_with("Diversion: <sip:15550001111@192.0.2.1>;reason=unavailable\r\n");
        assert!(diverted(&m, did, None));
        // The failover number, in a tel: URI of History-Info, retargeted from (not the last).
        let m = invite_with(
            "History-Info: <tel:+15559990001>;index=1, <sip:+15550001111@192.0.2.1>;index=1.1\r\n",
        );
        assert!(diverted(&m, did, Some("+15559990001")));
        assert!(!diverted(&m, did, Some("+15559990002")));
        // An upstream keeping History-Info names the DID as the current target (the last
        // entry): that is no diversion.
        let m = invite_with("History-Info: <sip:+15550001111@192.0.2.9>;index=1\r\n");
        assert!(!diverted(&m, did, Some("+15559990001")));
    }

    fn bound() -> Vec<ListenSpec> {
        vec!["udp:127.0.0.10:5060".parse().unwrap()]
    }

    fn in_dialog(ruri: &str, token: &str) -> Message {
        let text = format!(
            "BYE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.11;branch=z9hG4bK2\r\n\
             Route: <sip:127.0.0.10:5060;lr;lld={token}>\r\n\
             From: <sip:a@127.0.0.2>;tag=1\r\nTo: <sip:b@127.0.0.1>;tag=2\r\n\
             Call-ID: c1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(text)).unwrap()
    }

    /// A failure kept from an earlier branch (not passed on in its drive) is what the
    /// caller gets when a later drive (here the delivery timer of the next branch) ends the call.
    #[test]
    fn a_kept_failure_answers_the_caller_from_a_later_drive() {
        use crate::carrier::bindings::{Binding, BindingFlow};
        use crate::carrier::delivery_rule::FailoverPlan;
        use crate::sip::transaction::{RequestDisposition, TimerConfig};
        let t0 = Instant::now();
        let mut tx: Transactions<Flow> = Transactions::new(TimerConfig::default());
        let mut proxy = Proxy::new(ProxyConfig::default(), HmacKey::new(&[7; 32]), bound());
        let caller = Flow {
            transport: Transport::Udp,
            local: "127.0.0.10:5060".parse().unwrap(),
            remote: "127.0.0.2:5060".parse().unwrap(),
            conn: None,
        };
        let invite = invite_with("Max-Forwards: 70\r\nContact: <sip:a@127.0.0.2>\r\n");
        let RequestDisposition::New(server) = tx.handle_request(t0, &invite, caller, false) else {
            panic!("new")
        };
        let contact = |n: u8| {
            let text = format!("sip:pbx@127.0.0.{n}:5060");
            let Ok(Uri::Sip(uri)) = Uri::parse(&ByteString::from(text.clone())) else {
                panic!()
            };
            Contact {
                uri,
                binding: Binding {
                    trunk_group: 5,
                    contact: text,
                    contact_params: String::new(),
                    q: None,
                    expires_at_ms: i64::MAX,
                    call_id: "r".into(),
                    cseq: 1,
                    flow: BindingFlow {
                        transport: Transport::Udp,
                        remote: SocketAddr::from(([127, 0, 0, n], 5060)),
                        local: "127.0.0.10:5060".parse().unwrap(),
                    },
                    user_agent: None,
                    registered_at_ms: 0,
                },
                conn: None,
            }
        };
        proxy.start_call(
            t0,
            &mut tx,
            NewCall {
                server,
                request: &invite,
                flow: caller,
                did: "+15550001111",
                trunk_group: 5,
                contacts: vec![contact(31), contact(32)],
                failover: FailoverPlan::default(),
                failover_contacts: Vec::new(),
            },
        );
        let sent = |tx: &mut Transactions<Flow>| {
            std::iter::from_fn(|| tx.poll_transmit())
                .map(|(f, b)| (f.remote, Message::parse(b).unwrap()))
                .collect::<Vec<_>>()
        };
        let out = sent(&mut tx);
        let to_b0 = SocketAddr::from(([127, 0, 0, 31], 5060));
        let (_, branch0) = out
            .iter()
            .find(|(r, m)| *r == to_b0 && m.is_request())
            .expect("INVITE to the first binding");
        let mut answer = branch0.response(503, "Service Unavailable", Some("b0"));
        answer.push_header(Header::new(
            HeaderName::parse(&ByteString::from("X-Marker")),
            "from-branch-0",
        ));
        let answer = Message::parse(answer.to_bytes()).unwrap();
        let (cid, event) = tx
            .handle_response(t0 + std::time::Duration::from_millis(10), answer)
            .unwrap();
        assert!(proxy.on_client_event(t0, &mut tx, cid, event.unwrap()));
        let out = sent(&mut tx);
        assert!(
            out.iter()
                .all(|(r, m)| *r != caller.remote || m.status() == Some(100)),
            "no final to the caller yet: {out:?}"
        );
        assert!(out.iter().any(|(r, m)| r.port() == 5060
            && *r == SocketAddr::from(([127, 0, 0, 32], 5060))
            && m.is_request()));
        // The second binding never answers: its delivery timer ends the call in a later drive.
        let at = proxy.poll_timeout().expect("delivery timer");
        proxy.handle_timeout(at, &mut tx);
        let out = sent(&mut tx);
        let finals: Vec<_> = out
            .iter()
            .filter(|(r, m)| *r == caller.remote && m.status().is_some_and(|s| s >= 200))
            .map(|(_, m)| m.clone())
            .collect();
        assert_eq!(finals.len(), 1, "{out:?}");
        assert_eq!(finals[0].status(), Some(500));
        let text = String::from_utf8(finals[0].to_bytes().to_vec()).unwrap();
        assert!(text.contains("X-Marker: from-branch-0"), "{text}");
    }

    #[test]
    fn a_target_key_is_the_lower_case_host_and_port() {
        let key = |u: &str| target_key(Some(&Uri::parse(&ByteString::from(u)).unwrap()));
        assert_eq!(key("sip:a@PBX.Example.com"), "pbx.example.com:5060");
        assert_eq!(
            key("sip:a@203.0.113.9:5070;transport=udp"),
            "203.0.113.9:5070"
        );
        assert_eq!(key("sips:a@[2001:DB8::1]:5061"), "[2001:db8::1]:5061");
        assert_eq!(key("tel:+15551234567"), "");
        assert_eq!(target_key(None), "");
    }

    #[test]
    fn a_dialog_token_is_good_only_towards_the_target_it_binds() {
        let key = HmacKey::new(&[7u8; 32]);
        let caller = "sip:caller@127.0.0.14:5070";
        let token = dialog_token(&key, "c1", "127.0.0.14:5070");
        assert!(routed_through_us(
            &in_dialog(caller, &token),
            &bound(),
            &key
        ));
        // The same token cannot send the dialog's requests anywhere else (the gateway).
        let gw = "sip:+19005550000@127.0.0.13:5060";
        assert!(!routed_through_us(&in_dialog(gw, &token), &bound(), &key));
        // Nor another Call-ID, nor another key.
        let other = dialog_token(&key, "c2", "127.0.0.14:5070");
        assert!(!routed_through_us(
            &in_dialog(caller, &other),
            &bound(),
            &HmacKey::new(&[8u8; 32])
        ));
        assert!(!routed_through_us(
            &in_dialog(caller, &other),
            &bound(),
            &key
        ));
    }

    #[test]
    fn the_callees_answer_binds_the_token_to_its_contact() {
        let key = HmacKey::new(&[7u8; 32]);
        let text = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.14:5070;branch=z9hG4bK1\r\n\
                    Record-Route: <sip:127.0.0.20:5060;lr;lld=aaaa>, <sip:127.0.0.10:5060;lr;lld=bbbb>\r\n\
                    From: <sip:a@127.0.0.14>;tag=1\r\nTo: <sip:b@127.0.0.10>;tag=2\r\n\
                    Call-ID: c1\r\nCSeq: 1 INVITE\r\nContact: <sip:pbx@127.0.0.11:5071>\r\n\
                    Content-Length: 0\r\n\r\n";
        let mut m = Message::parse(Bytes::from(text)).unwrap();
        rewrite_record_route(&mut m, &bound(), &key);
        let rr = m.header_values(&HeaderName::RecordRoute).unwrap();
        assert_eq!(rr.len(), 2);
        // The other server's entry untouched, ours rebound to the callee's Contact.
        assert_eq!(&rr[0][..], "<sip:127.0.0.20:5060;lr;lld=aaaa>");
        let token = dialog_token(&key, "c1", "127.0.0.11:5071");
        assert!(rr[1].contains(&token), "{rr:?}");
        assert!(routed_through_us(
            &in_dialog("sip:pbx@127.0.0.11:5071", &token),
            &bound(),
            &key
        ));
    }

    #[test]
    fn a_new_diversion_goes_first() {
        let mut m = invite_with("Diversion: <sip:+15557770000@192.0.2.1>;reason=user-busy\r\n");
        prepend_diversion(
            &mut m,
            "<sip:+15550001111@127.0.0.1>;reason=unavailable".into(),
        );
        let values = m.header_values(&diversion_header()).unwrap();
        assert_eq!(values.len(), 2);
        assert!(values[0].starts_with("<sip:+15550001111@"), "{values:?}");
        assert!(values[1].contains("user-busy"), "{values:?}");
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
