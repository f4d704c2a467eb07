//! SIP transactions (RFC 3261 §17, with the RFC 6026 corrections) as pure state machines, and
//! the table that matches what arrives to them.
//!
//! Nothing here does I/O or reads a clock (the quinn-proto model): every entry point takes
//! `now`, and the output is polled:
//!
//! - `poll_transmit`: bytes for the transaction's peer (requests, ACKs, responses and their
//!   retransmissions);
//! - `poll_event`: what the transaction user (TU: the proxy core) must hear about;
//! - `poll_timeout` / `handle_timeout`: the next deadline, and firing what is due.
//!
//! [`ClientTransaction`] and [`ServerTransaction`] are one transaction each; [`Transactions`]
//! holds many, matches received requests and responses to them (§17.1.3, §17.2.3) and forgets
//! them once terminated.
//!
//! Timers (64·T1 is [`TimerConfig::timeout`]; "reliable" means TCP or TLS):
//!
//! | Timer | What it does                                      | Value                           |
//! |-------|---------------------------------------------------|---------------------------------|
//! | A     | INVITE retransmission (unreliable only)           | T1, doubling, capped at T2      |
//! | B     | INVITE client gives up in Calling                 | 64·T1                           |
//! | D     | INVITE client absorbs final retransmissions       | `timer_d`; 0 when reliable      |
//! | E     | non-INVITE retransmission (unreliable only)       | T1 doubling to T2; T2 after 1xx |
//! | F     | non-INVITE client gives up                        | 64·T1                           |
//! | G     | INVITE server final retransmission (unreliable)   | T1, doubling, capped at T2      |
//! | H     | INVITE server gives up waiting for the ACK        | 64·T1                           |
//! | I     | INVITE server absorbs ACK retransmissions         | T4; 0 when reliable             |
//! | J     | non-INVITE server absorbs request retransmissions | 64·T1; 0 when reliable          |
//! | K     | non-INVITE client absorbs final retransmissions   | T4; 0 when reliable             |
//! | L     | INVITE server in Accepted (RFC 6026)              | 64·T1                           |
//! | M     | INVITE client in Accepted (RFC 6026)              | 64·T1                           |
//!
//! Accepted (RFC 6026): after a 2xx the INVITE transactions do not end at once as RFC 3261
//! said. The server one keeps absorbing INVITE retransmissions (which RFC 3261 would take for a
//! new request and forward again) and passes the TU's 2xx retransmissions through; the client
//! one passes every further 2xx (retransmissions, other forks) to the TU, which forwards them.
//! Neither generates or absorbs the ACK of a 2xx: that is end to end, for the TU.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{Hash, Hasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use super::IdMap;

use bytes::Bytes;
use tokio::time::Instant;

use super::message::{Header, HeaderName, Message, Method, Via};
use super::uri::{Host, Uri};

/// A map keyed by what peers choose (branches, hosts): SipHash with a random key, and lookups
/// by borrowed parts ([`hashbrown::Equivalent`]) so that matching a message allocates nothing.
type WireMap<K, V> = hashbrown::HashMap<K, V, RandomState>;

/// Pops the next item of a transaction's output queue. A transaction that kept no request
/// mostly lingers for its timers (in Accepted a 2xx may still pass through): its emptied queue
/// gives its buffer back rather than holding it for the 32 s a lingering transaction may live.
fn pop_output<T>(queue: &mut VecDeque<T>, lingering: bool) -> Option<T> {
    let next = queue.pop_front();
    if lingering && queue.is_empty() && queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
    next
}

/// Max-Forwards of the ACK and CANCEL this layer builds (RFC 3261 §8.1.1.6).
const MAX_FORWARDS: u32 = 70;

// === Timer configuration ===

/// The RFC 3261 timer base values (§17.1.1.1, table 4 of appendix A). Every other timer
/// derives from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerConfig {
    /// Round-trip estimate: the first retransmission interval (default 500 ms).
    pub t1: Duration,
    /// The longest retransmission interval (default 4 s).
    pub t2: Duration,
    /// How long a message may stay in the network (default 5 s): timers I and K.
    pub t4: Duration,
    /// Timer D: how long an INVITE client transaction absorbs retransmissions of a 300–699
    /// response over an unreliable transport (RFC 3261: at least 32 s; default 32 s).
    pub timer_d: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            timer_d: Duration::from_secs(32),
        }
    }
}

impl TimerConfig {
    /// 64·T1: timers B, F, H and J (and RFC 6026's L and M).
    pub fn timeout(&self) -> Duration {
        self.t1.saturating_mul(64)
    }

    /// The interval after `interval` for timers A, E and G: doubled, capped at T2.
    fn backoff(&self, interval: Duration) -> Duration {
        interval.saturating_mul(2).min(self.t2)
    }
}

/// `now + d`, or `None` (never) when that is past what an `Instant` can hold; only absurd
/// configured durations get there, and "never" is the honest reading of them.
fn deadline(now: Instant, d: Duration) -> Option<Instant> {
    now.checked_add(d)
}

fn due(at: Option<Instant>, now: Instant) -> bool {
    at.is_some_and(|t| t <= now)
}

/// The timers one transaction can have running. Each kind of transaction uses the slots for
/// its own letters.
#[derive(Debug, Clone, Default)]
struct Timers {
    /// A, E or G: the next retransmission.
    retransmit: Option<Instant>,
    /// The interval that led to `retransmit`, doubled on each firing.
    interval: Duration,
    /// B, F or H: giving up, with a Timeout event to the TU.
    give_up: Option<Instant>,
    /// D, I, J, K, L or M: how long a finished transaction stays to absorb retransmissions.
    linger: Option<Instant>,
}

impl Timers {
    fn next(&self) -> Option<Instant> {
        [self.retransmit, self.give_up, self.linger]
            .into_iter()
            .flatten()
            .min()
    }

    fn start_retransmit(&mut self, now: Instant, interval: Duration) {
        self.interval = interval;
        self.retransmit = deadline(now, interval);
    }

    fn clear(&mut self) {
        *self = Timers::default();
    }
}

/// What a status code means to a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Provisional,
    Success,
    /// 300–699; also 700 and above, which is not SIP: it ends a transaction like a failure.
    Failure,
}

fn class(code: u16) -> Class {
    match code {
        0..=199 => Class::Provisional,
        200..=299 => Class::Success,
        _ => Class::Failure,
    }
}

// === Errors ===

/// Why the table or a transaction refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransactionError {
    /// No such transaction: it never existed, or it terminated and was forgotten.
    #[error("no such transaction")]
    Unknown,
    /// The transaction has terminated.
    #[error("the transaction has terminated")]
    Terminated,
    /// The request's top Via has no RFC 3261 branch (`z9hG4bK…`), so responses could not be
    /// matched to it.
    #[error("the request's top Via has no RFC 3261 branch")]
    NoBranch,
    /// A client transaction with this branch and method already exists.
    #[error("a client transaction with this branch and method already exists")]
    DuplicateBranch,
    /// ACK never has a client transaction of its own (§17.1.1.3: a non-2xx ACK is sent by the
    /// INVITE transaction, a 2xx ACK by the TU).
    #[error("ACK is not sent in a transaction of its own")]
    Ack,
    /// A request where a response was expected, or the reverse.
    #[error("wrong kind of message: {0}")]
    WrongKind(&'static str),
    /// CANCEL applies to INVITE transactions only.
    #[error("only an INVITE transaction can be cancelled")]
    NotInvite,
    /// The final response has been sent; the transaction discards further responses
    /// (§17.2.1, §17.2.2), except 2xx retransmissions of an INVITE in Accepted.
    #[error("the final response has already been sent")]
    AlreadyFinal,
}

// === Client transactions ===

/// The state of a client transaction (§17.1.1.2, §17.1.2.2, RFC 6026).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// INVITE sent, nothing heard yet.
    Calling,
    /// Non-INVITE request sent, nothing heard yet.
    Trying,
    /// A provisional response arrived.
    Proceeding,
    /// A final response arrived (300–699 for INVITE, any for non-INVITE); absorbing its
    /// retransmissions (timer D or K).
    Completed,
    /// INVITE only: a 2xx arrived; further 2xx go to the TU until timer M (RFC 6026).
    Accepted,
    /// Done; a table forgets it.
    Terminated,
}

/// What a client transaction tells its TU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A provisional response. Every one is passed up (§17.1.1.2), repeats included: a proxy
    /// forwards 180 and 183, and reliable provisionals (RFC 3262) are retransmitted on purpose.
    Provisional(Message),
    /// The final response (once per transaction).
    Final(Message),
    /// INVITE in Accepted: a further 2xx, retransmitted or from another fork (RFC 6026).
    /// A proxy forwards it upstream like the first.
    Additional2xx(Message),
    /// Timer B or F fired without a final response. A proxy treats it as a 408.
    Timeout,
    /// The transport could not deliver the request (§17.1.4), e.g. ICMP unreachable. A proxy
    /// treats it as a 503 (§16.9).
    TransportError,
}

/// One client transaction: sends a request and follows its responses (§17.1).
///
/// Built with the request already addressed (top Via with its branch); the request is sent at
/// once (see [`poll_transmit`](Self::poll_transmit)). ACK must not be given: it is never a
/// transaction of its own ([`Transactions::new_client`] refuses it).
#[derive(Debug, Clone)]
pub struct ClientTransaction {
    invite: bool,
    reliable: bool,
    config: TimerConfig,
    state: ClientState,
    /// The request, while an answer may still need it (ACK, CANCEL); dropped once a final
    /// response came, so that a transaction lingering for its timers stays small.
    request: Option<Message>,
    /// Serialized once: retransmissions are the same bytes (empty once dropped).
    request_bytes: Bytes,
    /// The ACK sent for a 300–699 response, re-sent for each retransmission of it.
    ack: Option<Bytes>,
    timers: Timers,
    transmits: VecDeque<Bytes>,
    events: VecDeque<ClientEvent>,
}

// === impl ClientTransaction ===

impl ClientTransaction {
    /// Starts a client transaction: the request is queued for sending and, over an unreliable
    /// transport, timer A or E is started; timer B or F runs on every transport.
    pub fn new(now: Instant, request: Message, reliable: bool, config: TimerConfig) -> Self {
        let invite = *request.method() == Method::Invite;
        let request_bytes = request.to_bytes();
        let mut timers = Timers::default();
        if !reliable {
            timers.start_retransmit(now, config.t1);
        }
        timers.give_up = deadline(now, config.timeout());
        ClientTransaction {
            invite,
            reliable,
            state: if invite {
                ClientState::Calling
            } else {
                ClientState::Trying
            },
            request: Some(request),
            transmits: VecDeque::from([request_bytes.clone()]),
            request_bytes,
            ack: None,
            timers,
            events: VecDeque::new(),
            config,
        }
    }

    /// The request this transaction sends (to build a CANCEL with [`cancel_for`]), until a
    /// final response came.
    pub fn request(&self) -> Option<&Message> {
        self.request.as_ref()
    }

    /// After the final response: only the timers and the ACK are left to serve.
    fn forget_request(&mut self) {
        self.request = None;
        self.request_bytes = Bytes::new();
    }

    /// The current state.
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// Whether this is an INVITE transaction.
    pub fn is_invite(&self) -> bool {
        self.invite
    }

    /// Whether the transport is reliable (no retransmissions, no lingering).
    pub fn is_reliable(&self) -> bool {
        self.reliable
    }

    /// Whether the transaction is over; nothing more will come out of it.
    pub fn is_terminated(&self) -> bool {
        self.state == ClientState::Terminated
    }

    /// A response matched to this transaction (the caller matched it, §17.1.3). Requests are
    /// ignored.
    pub fn handle_response(&mut self, now: Instant, response: &Message) {
        let Some(code) = response.status() else {
            return;
        };
        if self.invite {
            self.invite_response(now, class(code), response);
        } else {
            self.non_invite_response(now, class(code), response);
        }
    }

    fn invite_response(&mut self, now: Instant, class: Class, response: &Message) {
        use ClientState::*;
        match (self.state, class) {
            (Calling | Proceeding, Class::Provisional) => {
                // Proceeding stops retransmissions and timer B: the wait for a final response
                // is now the TU's (a proxy's Timer C, §16.6 step 11).
                self.state = Proceeding;
                self.timers.clear();
                self.events
                    .push_back(ClientEvent::Provisional(response.clone()));
            }
            (Calling | Proceeding, Class::Success) => {
                self.timers.clear();
                self.forget_request();
                self.state = Accepted;
                self.timers.linger = deadline(now, self.config.timeout());
                self.events.push_back(ClientEvent::Final(response.clone()));
            }
            (Accepted, Class::Success) => {
                self.events
                    .push_back(ClientEvent::Additional2xx(response.clone()));
            }
            (Calling | Proceeding, Class::Failure) => {
                let Some(request) = self.request.as_ref() else {
                    return;
                };
                let ack = ack_for(request, response).to_bytes();
                self.forget_request();
                self.transmits.push_back(ack.clone());
                self.ack = Some(ack);
                self.events.push_back(ClientEvent::Final(response.clone()));
                self.timers.clear();
                let wait = if self.reliable {
                    Duration::ZERO
                } else {
                    self.config.timer_d
                };
                self.linger(now, wait);
            }
            (Completed, Class::Failure) => {
                // A retransmission of the final response: our ACK was lost (§17.1.1.2).
                if let Some(ack) = &self.ack {
                    self.transmits.push_back(ack.clone());
                }
            }
            // Late provisionals, 2xx after a failure, failures after a 2xx: absorbed.
            _ => {}
        }
    }

    fn non_invite_response(&mut self, now: Instant, class: Class, response: &Message) {
        use ClientState::*;
        match (self.state, class) {
            (Trying | Proceeding, Class::Provisional) => {
                // Timer E keeps running; once it fires in Proceeding it repeats every T2.
                self.state = Proceeding;
                self.events
                    .push_back(ClientEvent::Provisional(response.clone()));
            }
            (Trying | Proceeding, Class::Success | Class::Failure) => {
                self.timers.clear();
                self.forget_request();
                self.events.push_back(ClientEvent::Final(response.clone()));
                let wait = if self.reliable {
                    Duration::ZERO
                } else {
                    self.config.t4
                };
                self.linger(now, wait);
            }
            // Completed: retransmissions absorbed.
            _ => {}
        }
    }

    /// Enters Completed for `wait` (timer D or K), or Terminated at once when it is zero.
    fn linger(&mut self, now: Instant, wait: Duration) {
        if wait.is_zero() {
            self.state = ClientState::Terminated;
        } else {
            self.state = ClientState::Completed;
            self.timers.linger = deadline(now, wait);
        }
    }

    /// The transport failed to send for this transaction (§17.1.4): the TU hears of it and the
    /// transaction ends, so a proxy can try the next target at once.
    pub fn handle_transport_error(&mut self, _now: Instant) {
        if self.state != ClientState::Terminated {
            self.timers.clear();
            self.state = ClientState::Terminated;
            self.events.push_back(ClientEvent::TransportError);
        }
    }

    /// The earliest deadline, if any timer runs.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Fires every timer due at `now`, each at most once (a late call does not burst
    /// retransmissions).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == ClientState::Terminated {
            return;
        }
        // Giving up wins over a retransmission due at the same moment.
        if due(self.timers.give_up, now) {
            self.timers.clear();
            self.state = ClientState::Terminated;
            self.events.push_back(ClientEvent::Timeout);
            return;
        }
        if due(self.timers.linger, now) {
            self.timers.clear();
            self.state = ClientState::Terminated;
            return;
        }
        if due(self.timers.retransmit, now) {
            self.transmits.push_back(self.request_bytes.clone());
            // Timer A doubles up to T2. RFC 3261 §17.1.1.2 lets it double without a cap
            // (about 7 sends in 64·T1); capping at T2 like non-INVITE requests, as Kamailio's
            // tm does, re-sends more often late in Calling and so survives a lossy path better.
            let next = if self.state == ClientState::Proceeding {
                // Timer E in Proceeding: every T2 (§17.1.2.2).
                self.config.t2
            } else {
                self.config.backoff(self.timers.interval)
            };
            self.timers.start_retransmit(now, next);
        }
    }

    /// The next bytes to send to the peer.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        pop_output(&mut self.transmits, self.request.is_none())
    }

    /// The next event for the TU.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        pop_output(&mut self.events, self.request.is_none())
    }
}

// === Server transactions ===

/// The state of a server transaction (§17.2.1, §17.2.2, RFC 6026).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Non-INVITE: the request arrived, no response sent yet.
    Trying,
    /// A provisional response was sent (INVITE starts here: the TU sends 100 Trying).
    Proceeding,
    /// A final response was sent (300–699 for INVITE, any for non-INVITE); re-sent on
    /// retransmissions of the request, and for INVITE on timer G until the ACK.
    Completed,
    /// INVITE only: the ACK arrived; absorbing its retransmissions until timer I.
    Confirmed,
    /// INVITE only: a 2xx was sent; absorbing INVITE retransmissions until timer L (RFC 6026).
    Accepted,
    /// Done; a table forgets it.
    Terminated,
}

/// What a server transaction tells its TU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// Timer H fired: no ACK came for the 300–699 response (§17.2.1).
    Timeout,
    /// The transport could not deliver a response (§17.2.4).
    TransportError,
}

/// One server transaction: absorbs retransmissions of a received request and sends the TU's
/// responses reliably (§17.2).
///
/// The transaction does not send 100 Trying by itself: the TU answers an INVITE with 100 at
/// once (as a proxy does on receiving one), which also covers the "within 200 ms" rule of
/// §17.2.1.
#[derive(Debug, Clone)]
pub struct ServerTransaction {
    invite: bool,
    reliable: bool,
    config: TimerConfig,
    state: ServerState,
    /// The request, until a final response was sent (responses are built from it).
    request: Option<Message>,
    /// The last response sent: re-sent for request retransmissions and on timer G.
    last_response: Option<Bytes>,
    timers: Timers,
    transmits: VecDeque<Bytes>,
    events: VecDeque<ServerEvent>,
}

// === impl ServerTransaction ===

impl ServerTransaction {
    /// Starts a server transaction for a received request (not an ACK: an ACK either belongs
    /// to an INVITE transaction or to the TU). No timer runs until the TU responds.
    pub fn new(_now: Instant, request: &Message, reliable: bool, config: TimerConfig) -> Self {
        let invite = *request.method() == Method::Invite;
        ServerTransaction {
            invite,
            reliable,
            config,
            state: if invite {
                ServerState::Proceeding
            } else {
                ServerState::Trying
            },
            request: Some(request.clone()),
            last_response: None,
            timers: Timers::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The request that created the transaction (to build responses to it), until a final
    /// response was sent.
    pub fn request(&self) -> Option<&Message> {
        self.request.as_ref()
    }

    /// The current state.
    pub fn state(&self) -> ServerState {
        self.state
    }

    /// Whether this is an INVITE transaction.
    pub fn is_invite(&self) -> bool {
        self.invite
    }

    /// Whether the transport is reliable (no retransmissions, no lingering).
    pub fn is_reliable(&self) -> bool {
        self.reliable
    }

    /// Whether the transaction is over; nothing more will come out of it.
    pub fn is_terminated(&self) -> bool {
        self.state == ServerState::Terminated
    }

    /// Sends a response from the TU.
    ///
    /// Provisional responses may be sent until the final one. INVITE: a 2xx enters Accepted
    /// (the TU may send further 2xx through it, which is how a proxy forwards 2xx
    /// retransmissions), a 300–699 enters Completed. Non-INVITE: any final enters Completed.
    pub fn respond(&mut self, now: Instant, response: &Message) -> Result<(), TransactionError> {
        use ServerState::*;
        let Some(code) = response.status() else {
            return Err(TransactionError::WrongKind("a request is not a response"));
        };
        let class = class(code);
        match (self.invite, self.state, class) {
            (_, Terminated, _) => return Err(TransactionError::Terminated),
            (true, Proceeding, Class::Provisional)
            | (false, Trying | Proceeding, Class::Provisional) => {
                self.state = Proceeding;
            }
            (true, Proceeding, Class::Success) => {
                self.state = Accepted;
                self.timers.linger = deadline(now, self.config.timeout());
            }
            (true, Accepted, Class::Success) => {}
            (true, Proceeding, Class::Failure) => {
                self.state = Completed;
                if !self.reliable {
                    self.timers.start_retransmit(now, self.config.t1);
                }
                // Timer H runs on every transport: the ACK may never come.
                self.timers.give_up = deadline(now, self.config.timeout());
            }
            (false, Trying | Proceeding, Class::Success | Class::Failure) => {
                if self.reliable {
                    self.state = Terminated;
                } else {
                    self.state = Completed;
                    self.timers.linger = deadline(now, self.config.timeout());
                }
            }
            _ => return Err(TransactionError::AlreadyFinal),
        }
        let bytes = response.to_bytes();
        if self.state == Proceeding {
            self.last_response = Some(bytes.clone());
        } else {
            // Final: only the last response and the timers are served from now on. In
            // Accepted not even that: 2xx retransmissions are the TU's (RFC 6026).
            self.request = None;
            self.last_response = (self.state != Accepted).then(|| bytes.clone());
        }
        self.transmits.push_back(bytes);
        Ok(())
    }

    /// A request matched to this transaction (§17.2.3): a retransmission of the original
    /// request, or for INVITE the ACK. Returns whether the transaction absorbed it; `false`
    /// means it is not the transaction's business (an ACK while in Accepted is the 2xx's ACK,
    /// for the TU).
    pub fn handle_request(&mut self, now: Instant, request: &Message) -> bool {
        use ServerState::*;
        if !request.is_request() || self.state == Terminated {
            return false;
        }
        let ack = *request.method() == Method::Ack;
        match (self.invite, self.state, ack) {
            (true, Completed, true) => {
                self.timers.clear();
                if self.reliable {
                    self.state = Terminated;
                } else {
                    self.state = Confirmed;
                    self.timers.linger = deadline(now, self.config.t4);
                }
                true
            }
            // ACK retransmissions, or an ACK before any final response: nothing to do.
            (true, Confirmed | Proceeding, true) => true,
            // In Accepted it is the 2xx's ACK; a non-INVITE has no ACK: the TU's business.
            (_, _, true) => false,
            // Retransmissions of the request: re-send what the state says (§17.2.1, §17.2.2).
            (_, Proceeding | Completed, false) => {
                if let Some(last) = &self.last_response {
                    self.transmits.push_back(last.clone());
                }
                true
            }
            // Trying (nothing sent yet), Confirmed, Accepted: absorbed silently. In Accepted
            // 2xx retransmissions are the TU's to send (RFC 6026).
            (_, _, false) => true,
        }
    }

    /// The transport failed to send a response (§17.2.4): the TU hears of it and the
    /// transaction ends.
    pub fn handle_transport_error(&mut self, _now: Instant) {
        if self.state != ServerState::Terminated {
            self.timers.clear();
            self.state = ServerState::Terminated;
            self.events.push_back(ServerEvent::TransportError);
        }
    }

    /// The earliest deadline, if any timer runs.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Fires every timer due at `now`, each at most once.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == ServerState::Terminated {
            return;
        }
        if due(self.timers.give_up, now) {
            self.timers.clear();
            self.state = ServerState::Terminated;
            self.events.push_back(ServerEvent::Timeout);
            return;
        }
        if due(self.timers.linger, now) {
            self.timers.clear();
            self.state = ServerState::Terminated;
            return;
        }
        if due(self.timers.retransmit, now) {
            if let Some(last) = &self.last_response {
                self.transmits.push_back(last.clone());
            }
            let next = self.config.backoff(self.timers.interval);
            self.timers.start_retransmit(now, next);
        }
    }

    /// The next bytes to send to the peer.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        pop_output(&mut self.transmits, self.request.is_none())
    }

    /// The next event for the TU.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        pop_output(&mut self.events, self.request.is_none())
    }
}

// === Building ACK and CANCEL ===

/// The ACK a client transaction sends for a 300–699 response (§17.1.1.3): Request-URI,
/// Call-ID, From, CSeq number and the single top Via of the original request; To from the
/// response (with its tag); the request's Route headers; Max-Forwards 70; no body.
///
/// If `request` is not a request, its To URI stands in for the Request-URI (a transaction
/// never gets there).
pub fn ack_for(request: &Message, response: &Message) -> Message {
    let mut ack = Message::request(
        Method::Ack,
        request_uri(request),
        request.top_via().clone(),
        request.from().clone(),
        response.to().clone(),
        request.call_id(),
        request.cseq().seq,
        MAX_FORWARDS,
    );
    copy_routes(request, &mut ack);
    ack
}

/// The CANCEL for a request (§9.1): Request-URI, Call-ID, From, To (as in the request, no tag
/// from any response), CSeq number and top Via of the request (the same branch is how the
/// next hop finds the INVITE it cancels, §9.2); its Route headers; Max-Forwards 70; no body.
pub fn cancel_for(request: &Message) -> Message {
    let mut cancel = Message::request(
        Method::Cancel,
        request_uri(request),
        request.top_via().clone(),
        request.from().clone(),
        request.to().clone(),
        request.call_id(),
        request.cseq().seq,
        MAX_FORWARDS,
    );
    copy_routes(request, &mut cancel);
    cancel
}

fn request_uri(request: &Message) -> Uri {
    request
        .uri()
        .cloned()
        .unwrap_or_else(|| request.to().uri.clone())
}

/// Route headers are copied as received: the route set must be the same bytes downstream.
fn copy_routes(from: &Message, to: &mut Message) {
    for h in from
        .headers()
        .iter()
        .filter(|h| h.name == HeaderName::Route)
    {
        to.push_header(Header::clone(h));
    }
}

// === Transaction table ===

/// A client transaction in a [`Transactions`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(u64);

/// A server transaction in a [`Transactions`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(u64);

/// Either kind of transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransactionId {
    Client(ClientId),
    Server(ServerId),
}

impl From<ClientId> for TransactionId {
    fn from(id: ClientId) -> Self {
        TransactionId::Client(id)
    }
}

impl From<ServerId> for TransactionId {
    fn from(id: ServerId) -> Self {
        TransactionId::Server(id)
    }
}

/// An event from some transaction of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// From a client transaction. Response-driven events are returned by
    /// [`Transactions::handle_response`]; here come the others (Timeout, TransportError).
    Client(ClientId, ClientEvent),
    /// From a server transaction.
    Server(ServerId, ServerEvent),
}

/// What [`Transactions::handle_request`] did with a received request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestDisposition {
    /// A new request: server transaction `id` now exists, and the TU must answer it through
    /// [`Transactions::respond`]. A CANCEL gets its own transaction; see
    /// [`Transactions::find_invite_for_cancel`].
    New(ServerId),
    /// A retransmission, or the ACK of a 300–699 response: the transaction layer handled it
    /// (re-sending the last response where the state says so). Nothing for the TU.
    Absorbed,
    /// An ACK no transaction absorbs: the ACK of a 2xx (a transaction of its own, §17.1.1.3),
    /// or one that came too late. The TU decides (a proxy routes a 2xx ACK like any request,
    /// without a transaction).
    Ack,
}

/// The key of a server transaction (§17.2.3).
#[derive(Debug, Clone)]
enum ServerKey {
    /// RFC 3261: branch, sent-by and method. ACK is filed under INVITE: it matches the INVITE
    /// transaction it acknowledges. Sent-by guards against two clients choosing one branch.
    /// The branch is shared with the entry's copy of the key.
    Branch {
        branch: Arc<str>,
        host: Host,
        port: Option<u16>,
        method: Method,
    },
    /// RFC 2543: no magic cookie, so the request's identity is matched field by field.
    Legacy(Box<LegacyKey>),
}

/// The parts of a [`ServerKey::Branch`], borrowed: a request is looked up by them without
/// building a key, and a filed key hashes and compares through them. Sent-by host names
/// compare case-insensitively (§19.1.4), so both hash them case-folded.
#[derive(Clone, Copy)]
struct BranchKeyRef<'a> {
    branch: &'a str,
    host: &'a Host,
    port: Option<u16>,
    method: &'a Method,
}

impl<'a> BranchKeyRef<'a> {
    /// What `request` is filed under, its method taken as `method` if given (else ACK as
    /// INVITE); `None` without an RFC 3261 branch.
    fn of(request: &'a Message, method: Option<&'a Method>) -> Option<BranchKeyRef<'a>> {
        let via = request.top_via();
        Some(BranchKeyRef {
            branch: via.rfc3261_branch()?,
            host: &via.host,
            port: via.port,
            method: method.unwrap_or(match request.method() {
                Method::Ack => &INVITE,
                m => m,
            }),
        })
    }
}

impl Hash for BranchKeyRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u8(0);
        self.branch.hash(h);
        hash_host_folded(self.host, h);
        self.port.hash(h);
        self.method.hash(h);
    }
}

/// Hashes a host as [`Host::matches`] compares it: a name case-folded, in fixed-size pieces
/// (names equal but for case have equal lengths, so they hash alike).
fn hash_host_folded<H: Hasher>(host: &Host, h: &mut H) {
    match host {
        Host::Name(name) => {
            h.write_u8(0);
            let mut buf = [0u8; 64];
            for piece in name.as_bytes().chunks(buf.len()) {
                let folded = &mut buf[..piece.len()];
                folded.copy_from_slice(piece);
                folded.make_ascii_lowercase();
                h.write(folded);
            }
            h.write_u8(0xff);
        }
        Host::V4(a) => {
            h.write_u8(1);
            h.write(&a.octets());
        }
        Host::V6(a) => {
            h.write_u8(2);
            h.write(&a.octets());
        }
    }
}

impl hashbrown::Equivalent<ServerKey> for BranchKeyRef<'_> {
    fn equivalent(&self, key: &ServerKey) -> bool {
        key.branch_ref().is_some_and(|k| {
            k.branch == self.branch
                && k.host.matches(self.host)
                && k.port == self.port
                && k.method == self.method
        })
    }
}

impl Hash for ServerKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        match (self.branch_ref(), self) {
            (Some(parts), _) => parts.hash(h),
            (None, ServerKey::Legacy(k)) => {
                h.write_u8(1);
                k.hash(h);
            }
            (None, ServerKey::Branch { .. }) => {} // branch_ref has the parts of every one
        }
    }
}

impl PartialEq for ServerKey {
    fn eq(&self, other: &ServerKey) -> bool {
        match (self, other) {
            (ServerKey::Legacy(a), ServerKey::Legacy(b)) => a == b,
            _ => self
                .branch_ref()
                .is_some_and(|parts| hashbrown::Equivalent::equivalent(&parts, other)),
        }
    }
}

impl Eq for ServerKey {}

/// What a request is filed under: ACK under INVITE (§17.2.3).
static INVITE: Method = Method::Invite;

/// The RFC 2543 matching fields (§17.2.3). For an ACK, the To tag is the one of the response
/// sent, so that key is filed only once the final response is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LegacyKey {
    request_uri: Box<str>,
    to_tag: Option<Box<str>>,
    from_tag: Option<Box<str>>,
    call_id: Box<str>,
    cseq: u32,
    /// The top Via as transport, sent-by and branch: the parameters a proxy edits
    /// (`received`, `rport`) do not change what a request is.
    via_transport: Box<str>,
    via_host: Host,
    via_port: Option<u16>,
    via_branch: Option<Box<str>>,
    method: Method,
}

/// Host names compare case-insensitively (§19.1.4): RFC 2543 keys hold them in lower case.
fn host_key(host: &Host) -> Host {
    match host {
        Host::Name(n) if n.bytes().any(|b| b.is_ascii_uppercase()) => {
            Host::Name(n.to_ascii_lowercase().into())
        }
        other => other.clone(),
    }
}

impl ServerKey {
    /// The key `request` is filed under, its method taken as `method` if given.
    fn of(request: &Message, method: Option<&Method>) -> ServerKey {
        match BranchKeyRef::of(request, method) {
            Some(parts) => ServerKey::Branch {
                branch: Arc::from(parts.branch),
                host: parts.host.clone(),
                port: parts.port,
                method: parts.method.clone(),
            },
            None => ServerKey::Legacy(Box::new(LegacyKey::of(
                request,
                request.top_via(),
                method.unwrap_or(request.method()).clone(),
            ))),
        }
    }

    /// The parts of an RFC 3261 key.
    fn branch_ref(&self) -> Option<BranchKeyRef<'_>> {
        match self {
            ServerKey::Branch {
                branch,
                host,
                port,
                method,
            } => Some(BranchKeyRef {
                branch,
                host,
                port: *port,
                method,
            }),
            ServerKey::Legacy(_) => None,
        }
    }

    /// For an RFC 2543 INVITE answered with `response` (300–699): the key its ACK arrives
    /// under, carrying the response's To tag.
    fn legacy_ack(&self, response: &Message) -> Option<ServerKey> {
        match self {
            ServerKey::Branch { .. } => None,
            ServerKey::Legacy(k) => {
                let mut k = k.clone();
                k.method = Method::Ack;
                k.to_tag = response.to().tag().map(Box::from);
                Some(ServerKey::Legacy(k))
            }
        }
    }
}

impl LegacyKey {
    fn of(request: &Message, via: &Via, method: Method) -> LegacyKey {
        LegacyKey {
            request_uri: request
                .uri()
                .map(|u| u.to_string().into())
                .unwrap_or_default(),
            to_tag: request.to().tag().map(Box::from),
            from_tag: request.from().tag().map(Box::from),
            call_id: request.call_id().into(),
            cseq: request.cseq().seq,
            via_transport: via.transport.to_ascii_uppercase().into(),
            via_host: host_key(&via.host),
            via_port: via.port,
            via_branch: via.branch().map(Box::from),
            method,
        }
    }
}

/// The key of a client transaction (§17.1.3): the branch we put in the top Via, and the method
/// (a CANCEL shares its INVITE's branch).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientKey {
    branch: Arc<str>,
    method: Method,
}

/// A [`ClientKey`] made of borrowed parts, to look one up without building it.
struct ClientKeyRef<'a> {
    branch: &'a str,
    method: &'a Method,
}

impl Hash for ClientKeyRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.branch.hash(h);
        self.method.hash(h);
    }
}

impl Hash for ClientKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        ClientKeyRef {
            branch: &self.branch,
            method: &self.method,
        }
        .hash(h);
    }
}

impl hashbrown::Equivalent<ClientKey> for ClientKeyRef<'_> {
    fn equivalent(&self, key: &ClientKey) -> bool {
        *key.branch == *self.branch && key.method == *self.method
    }
}

#[derive(Debug)]
struct ClientEntry<D> {
    tx: ClientTransaction,
    dest: D,
    key: ClientKey,
    /// The deadline last filed in the timer heap.
    scheduled: Option<Instant>,
}

#[derive(Debug)]
struct ServerEntry<D> {
    tx: ServerTransaction,
    dest: D,
    /// The request's key.
    key: ServerKey,
    /// For an RFC 2543 INVITE, the key its ACK comes under once a failure was sent.
    ack_key: Option<ServerKey>,
    scheduled: Option<Instant>,
}

/// All transactions of an endpoint, with the matching of §17.1.3 and §17.2.3. Pure: no I/O,
/// no clock.
///
/// `D` is where a transaction's messages go (e.g. socket address and connection), attached by
/// the caller and handed back with each transmit. Transactions are forgotten as soon as they
/// terminate.
///
/// Timers: a binary heap of (deadline, id), filed whenever a transaction's next deadline
/// changes; entries that no longer match their transaction's deadline are skipped lazily.
#[derive(Debug)]
pub struct Transactions<D> {
    config: TimerConfig,
    next_id: u64,
    /// Boxed: a table of 10 000s of lingering transactions then moves 16-byte slots when it
    /// grows, not 400-byte entries (and holds no room for entries in its empty slots).
    clients: IdMap<ClientId, Box<ClientEntry<D>>>,
    client_keys: WireMap<ClientKey, ClientId>,
    servers: IdMap<ServerId, Box<ServerEntry<D>>>,
    server_keys: WireMap<ServerKey, ServerId>,
    timers: BinaryHeap<Reverse<(Instant, TransactionId)>>,
    transmits: VecDeque<(D, Bytes)>,
    events: VecDeque<Event>,
    /// Client transactions forgotten, for a TU that asked ([`report_ended`](Self::report_ended)).
    ended: Option<VecDeque<ClientId>>,
    /// The live transactions by destination: an ICMP error fails those of one destination
    /// without a walk over all (a probe round brings thousands of them).
    by_dest: HashMap<D, foldhash::HashSet<TransactionId>>,
}

// === impl Transactions ===

impl<D: Clone + Eq + Hash> Transactions<D> {
    /// Transactions created from now on use `config`; running ones keep theirs.
    pub fn set_config(&mut self, config: TimerConfig) {
        self.config = config;
    }

    /// An empty table whose transactions use `config`.
    pub fn new(config: TimerConfig) -> Self {
        Transactions {
            config,
            next_id: 0,
            clients: IdMap::default(),
            client_keys: WireMap::default(),
            servers: IdMap::default(),
            server_keys: WireMap::default(),
            timers: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            ended: None,
            by_dest: HashMap::new(),
        }
    }

    /// From now on, every client transaction the table forgets is reported by
    /// [`poll_ended`](Self::poll_ended), so a TU can drop what it keeps for it without a walk.
    pub fn report_ended(&mut self) {
        self.ended.get_or_insert_default();
    }

    /// A client transaction that ended and was forgotten (its last events are queued before).
    pub fn poll_ended(&mut self) -> Option<ClientId> {
        self.ended.as_mut()?.pop_front()
    }

    /// The timer values.
    pub fn config(&self) -> &TimerConfig {
        &self.config
    }

    /// How many transactions are alive.
    pub fn len(&self) -> usize {
        self.clients.len() + self.servers.len()
    }

    /// Whether no transaction is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A client transaction, while it lives.
    pub fn client(&self, id: ClientId) -> Option<&ClientTransaction> {
        self.clients.get(&id).map(|e| &e.tx)
    }

    /// A server transaction, while it lives.
    pub fn server(&self, id: ServerId) -> Option<&ServerTransaction> {
        self.servers.get(&id).map(|e| &e.tx)
    }

    /// The request that created a server transaction, while it lives.
    pub fn server_request(&self, id: ServerId) -> Option<&Message> {
        self.server(id).and_then(ServerTransaction::request)
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    // --- client side ---

    /// Starts a client transaction sending `request` to `dest`. The request must carry an
    /// RFC 3261 branch in its top Via (responses are matched on it) and must not be an ACK.
    pub fn new_client(
        &mut self,
        now: Instant,
        request: Message,
        dest: D,
        reliable: bool,
    ) -> Result<ClientId, TransactionError> {
        if !request.is_request() {
            return Err(TransactionError::WrongKind("a response is not a request"));
        }
        if *request.method() == Method::Ack {
            return Err(TransactionError::Ack);
        }
        let branch = request.branch().ok_or(TransactionError::NoBranch)?;
        let key = ClientKey {
            branch: Arc::from(branch),
            method: request.method().clone(),
        };
        if self.client_keys.contains_key(&key) {
            return Err(TransactionError::DuplicateBranch);
        }
        let id = ClientId(self.next_id());
        let tx = ClientTransaction::new(now, request, reliable, self.config.clone());
        self.client_keys.insert(key.clone(), id);
        self.index(&dest, id.into());
        self.clients.insert(
            id,
            Box::new(ClientEntry {
                tx,
                dest,
                key,
                scheduled: None,
            }),
        );
        self.sync_client(id);
        Ok(id)
    }

    /// Starts the CANCEL of INVITE client transaction `id` (§9.1), to the same destination
    /// over the same transport. The TU should only do so once a provisional response came.
    pub fn cancel(&mut self, now: Instant, id: ClientId) -> Result<ClientId, TransactionError> {
        let entry = self.clients.get(&id).ok_or(TransactionError::Unknown)?;
        if !entry.tx.is_invite() {
            return Err(TransactionError::NotInvite);
        }
        // After a final response there is nothing left to cancel.
        let request = entry.tx.request().ok_or(TransactionError::AlreadyFinal)?;
        let cancel = cancel_for(request);
        let (dest, reliable) = (entry.dest.clone(), entry.tx.is_reliable());
        self.new_client(now, cancel, dest, reliable)
    }

    /// A received response. `Err`: it matches no client transaction (a stray, dropped per
    /// RFC 3261 §18.1.2 as updated by RFC 6026), handed back. Otherwise the transaction it
    /// matched, and what the TU must hear (`None` when it was absorbed, e.g. a retransmitted
    /// final response, for which the ACK was re-sent). The event holds the response itself,
    /// unshared, so that relaying it edits it without a copy.
    pub fn handle_response(
        &mut self,
        now: Instant,
        response: Message,
    ) -> Result<(ClientId, Option<ClientEvent>), Message> {
        let Some(&id) = (!response.is_request())
            .then(|| response.top_via().branch())
            .flatten()
            .and_then(|branch| {
                self.client_keys.get(&ClientKeyRef {
                    branch,
                    method: &response.cseq().method,
                })
            })
        else {
            return Err(response);
        };
        let Some(entry) = self.clients.get_mut(&id) else {
            return Err(response);
        };
        entry.tx.handle_response(now, &response);
        drop(response);
        // A response causes at most one event; any other stays queued for poll_event.
        let event = entry.tx.poll_event();
        self.sync_client(id);
        Ok((id, event))
    }

    // --- server side ---

    /// A received request: creates a server transaction when it is new, or hands a
    /// retransmission or an ACK to the transaction it matches (§17.2.3). `dest` is where
    /// responses go; a retransmission moves it (the latest copy of the request came from
    /// there). A message that is not a request is treated as absorbed.
    pub fn handle_request(
        &mut self,
        now: Instant,
        request: &Message,
        dest: D,
        reliable: bool,
    ) -> RequestDisposition {
        if !request.is_request() {
            return RequestDisposition::Absorbed;
        }
        let ack = *request.method() == Method::Ack;
        if let Some(id) = self.find_server(request, None)
            && let Some(entry) = self.servers.get_mut(&id)
        {
            let absorbed = entry.tx.handle_request(now, request);
            if !ack && entry.dest != dest {
                let old = std::mem::replace(&mut entry.dest, dest.clone());
                self.unindex(&old, id.into());
                self.index(&dest, id.into());
            }
            self.sync_server(id);
            return if absorbed {
                RequestDisposition::Absorbed
            } else {
                RequestDisposition::Ack
            };
        }
        if ack {
            return RequestDisposition::Ack;
        }
        let id = ServerId(self.next_id());
        let tx = ServerTransaction::new(now, request, reliable, self.config.clone());
        let key = ServerKey::of(request, None);
        self.server_keys.insert(key.clone(), id);
        self.index(&dest, id.into());
        self.servers.insert(
            id,
            Box::new(ServerEntry {
                tx,
                dest,
                key,
                ack_key: None,
                scheduled: None,
            }),
        );
        self.sync_server(id);
        RequestDisposition::New(id)
    }

    /// The INVITE server transaction a CANCEL targets (§9.2): the one whose request matches the
    /// CANCEL by the rules of §17.2.3 with the method taken as INVITE.
    pub fn find_invite_for_cancel(&self, cancel: &Message) -> Option<ServerId> {
        if !cancel.is_request() {
            return None;
        }
        self.find_server(cancel, Some(&INVITE))
            .filter(|id| self.servers.get(id).is_some_and(|e| e.tx.is_invite()))
    }

    /// The server transaction `request` matches, its method taken as `method` if given.
    fn find_server(&self, request: &Message, method: Option<&Method>) -> Option<ServerId> {
        match BranchKeyRef::of(request, method) {
            // RFC 3261: looked up by the message's own parts, nothing built.
            Some(parts) => self.server_keys.get(&parts),
            None => self.server_keys.get(&ServerKey::of(request, method)),
        }
        .copied()
    }

    /// Sends the TU's response through server transaction `id` (see
    /// [`ServerTransaction::respond`]).
    pub fn respond(
        &mut self,
        id: ServerId,
        now: Instant,
        response: Message,
    ) -> Result<(), TransactionError> {
        let entry = self.servers.get_mut(&id).ok_or(TransactionError::Unknown)?;
        entry.tx.respond(now, &response)?;
        // An RFC 2543 ACK carries the To tag of the failure it acknowledges: file that key now.
        if entry.tx.state() == ServerState::Completed
            && entry.tx.is_invite()
            && entry.ack_key.is_none()
            && let Some(ack_key) = entry.key.legacy_ack(&response)
            && !self.server_keys.contains_key(&ack_key)
        {
            self.server_keys.insert(ack_key.clone(), id);
            entry.ack_key = Some(ack_key);
        }
        self.sync_server(id);
        Ok(())
    }

    // --- both ---

    /// The transport failed to send for transaction `id`: the TU hears of it (through
    /// [`poll_event`](Self::poll_event)) and the transaction ends.
    pub fn handle_transport_error(
        &mut self,
        now: Instant,
        id: impl Into<TransactionId>,
    ) -> Result<(), TransactionError> {
        match id.into() {
            TransactionId::Client(id) => {
                let entry = self.clients.get_mut(&id).ok_or(TransactionError::Unknown)?;
                entry.tx.handle_transport_error(now);
                self.sync_client(id);
            }
            TransactionId::Server(id) => {
                let entry = self.servers.get_mut(&id).ok_or(TransactionError::Unknown)?;
                entry.tx.handle_transport_error(now);
                self.sync_server(id);
            }
        }
        Ok(())
    }

    /// `dest` is unreachable (e.g. ICMP port unreachable for it): every transaction sending
    /// there fails as by [`handle_transport_error`](Self::handle_transport_error), oldest
    /// first. Returns how many.
    pub fn handle_unreachable(&mut self, now: Instant, dest: &D) -> usize {
        let mut ids: Vec<TransactionId> = self
            .by_dest
            .get(dest)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        for &id in &ids {
            let _ = self.handle_transport_error(now, id);
        }
        ids.len()
    }

    fn index(&mut self, dest: &D, id: TransactionId) {
        self.by_dest.entry(dest.clone()).or_default().insert(id);
    }

    fn unindex(&mut self, dest: &D, id: TransactionId) {
        if let Some(ids) = self.by_dest.get_mut(dest) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_dest.remove(dest);
            }
        }
    }

    /// The earliest deadline of any transaction.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if self.scheduled(id) == Some(at) {
                return Some(at);
            }
            // Stale: the transaction moved its deadline or is gone.
            self.timers.pop();
        }
        None
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Collect first: a transaction rescheduled at `now` (a zero interval) fires on the
        // next call, not in an endless loop here.
        let mut due = Vec::new();
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            // Taking the deadline makes any duplicate of this heap entry stale.
            if self.scheduled(id) == Some(at) {
                self.clear_scheduled(id);
                due.push(id);
            }
        }
        for id in due {
            match id {
                TransactionId::Client(id) => {
                    if let Some(entry) = self.clients.get_mut(&id) {
                        entry.tx.handle_timeout(now);
                        self.sync_client(id);
                    }
                }
                TransactionId::Server(id) => {
                    if let Some(entry) = self.servers.get_mut(&id) {
                        entry.tx.handle_timeout(now);
                        self.sync_server(id);
                    }
                }
            }
        }
    }

    /// The next message to send, with its destination.
    pub fn poll_transmit(&mut self) -> Option<(D, Bytes)> {
        self.transmits.pop_front()
    }

    /// The next event for the TU.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn scheduled(&self, id: TransactionId) -> Option<Instant> {
        match id {
            TransactionId::Client(id) => self.clients.get(&id).and_then(|e| e.scheduled),
            TransactionId::Server(id) => self.servers.get(&id).and_then(|e| e.scheduled),
        }
    }

    fn clear_scheduled(&mut self, id: TransactionId) {
        match id {
            TransactionId::Client(id) => {
                if let Some(e) = self.clients.get_mut(&id) {
                    e.scheduled = None;
                }
            }
            TransactionId::Server(id) => {
                if let Some(e) = self.servers.get_mut(&id) {
                    e.scheduled = None;
                }
            }
        }
    }

    /// After anything happened to a client transaction: collects its output, files its next
    /// deadline, forgets it once terminated.
    fn sync_client(&mut self, id: ClientId) {
        let Some(entry) = self.clients.get_mut(&id) else {
            return;
        };
        while let Some(bytes) = entry.tx.poll_transmit() {
            self.transmits.push_back((entry.dest.clone(), bytes));
        }
        while let Some(event) = entry.tx.poll_event() {
            self.events.push_back(Event::Client(id, event));
        }
        if entry.tx.is_terminated() {
            if let Some(entry) = self.clients.remove(&id) {
                self.client_keys.remove(&entry.key);
                self.unindex(&entry.dest, id.into());
                if let Some(ended) = &mut self.ended {
                    ended.push_back(id);
                }
            }
            return;
        }
        let next = entry.tx.poll_timeout();
        if next != entry.scheduled {
            entry.scheduled = next;
            if let Some(at) = next {
                self.timers.push(Reverse((at, id.into())));
            }
        }
    }

    /// As [`sync_client`](Self::sync_client), for a server transaction.
    fn sync_server(&mut self, id: ServerId) {
        let Some(entry) = self.servers.get_mut(&id) else {
            return;
        };
        while let Some(bytes) = entry.tx.poll_transmit() {
            self.transmits.push_back((entry.dest.clone(), bytes));
        }
        while let Some(event) = entry.tx.poll_event() {
            self.events.push_back(Event::Server(id, event));
        }
        if entry.tx.is_terminated() {
            if let Some(entry) = self.servers.remove(&id) {
                self.unindex(&entry.dest, id.into());
                for key in std::iter::once(entry.key).chain(entry.ack_key) {
                    if self.server_keys.get(&key) == Some(&id) {
                        self.server_keys.remove(&key);
                    }
                }
            }
            return;
        }
        let next = entry.tx.poll_timeout();
        if next != entry.scheduled {
            entry.scheduled = next;
            if let Some(at) = next {
                self.timers.push(Reverse((at, id.into())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::CSeq;

    const INVITE: &str = "INVITE sip:+15551234567@203.0.113.10:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKc1a1;rport\r\n\
Route: <sip:edge1.example.net;lr>\r\n\
Route: <sip:edge2.example.net;lr>\r\n\
Max-Forwards: 69\r\n\
From: \"Alice\" <sip:1000@pbx.example.com>;tag=a1\r\n\
To: <sip:+15551234567@carrier.example.net>\r\n\
Call-ID: call-1@pbx.example.com\r\n\
CSeq: 10 INVITE\r\n\
Contact: <sip:1000@198.51.100.7:5060>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\n";

    const OPTIONS: &str = "OPTIONS sip:carrier.example.net SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKo1\r\n\
Max-Forwards: 70\r\n\
From: <sip:pbx@pbx.example.com>;tag=o1\r\n\
To: <sip:carrier.example.net>\r\n\
Call-ID: opt-1@pbx.example.com\r\n\
CSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n";

    fn msg(text: &str) -> Message {
        Message::parse(Bytes::copy_from_slice(text.as_bytes())).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The common face of both kinds, to drive their timers.
    trait Machine {
        fn timeout(&self) -> Option<Instant>;
        fn fire(&mut self, now: Instant);
        fn transmit(&mut self) -> Option<Bytes>;
    }

    impl Machine for ClientTransaction {
        fn timeout(&self) -> Option<Instant> {
            self.poll_timeout()
        }
        fn fire(&mut self, now: Instant) {
            self.handle_timeout(now)
        }
        fn transmit(&mut self) -> Option<Bytes> {
            self.poll_transmit()
        }
    }

    impl Machine for ServerTransaction {
        fn timeout(&self) -> Option<Instant> {
            self.poll_timeout()
        }
        fn fire(&mut self, now: Instant) {
            self.handle_timeout(now)
        }
        fn transmit(&mut self) -> Option<Bytes> {
            self.poll_transmit()
        }
    }

    fn drain(m: &mut impl Machine) -> Vec<Bytes> {
        std::iter::from_fn(|| m.transmit()).collect()
    }

    /// Fires each deadline up to `until` (ms after `t0`) exactly when due. Returns when each
    /// send happened (ms after `t0`) and the bytes sent.
    fn run(m: &mut impl Machine, t0: Instant, until: u64) -> Vec<(u64, Bytes)> {
        let mut sent = Vec::new();
        while let Some(at) = m.timeout() {
            if at > t0 + ms(until) {
                break;
            }
            m.fire(at);
            let offset = (at - t0).as_millis() as u64;
            sent.extend(drain(m).into_iter().map(|b| (offset, b)));
        }
        sent
    }

    fn offsets(sent: &[(u64, Bytes)]) -> Vec<u64> {
        sent.iter().map(|(t, _)| *t).collect()
    }

    // --- client ---

    #[test]
    fn timer_a_doubles_capped_at_t2_then_timer_b_times_out() {
        let t0 = Instant::now();
        let invite = msg(INVITE);
        let mut tx = ClientTransaction::new(t0, invite.clone(), false, TimerConfig::default());
        assert_eq!(tx.state(), ClientState::Calling);
        assert_eq!(drain(&mut tx), vec![invite.to_bytes()]);
        let sent = run(&mut tx, t0, 60_000);
        // T1, 2·T1, 4·T1, then T2 each time; timer B (64·T1 = 32 s) comes first after 31.5 s.
        assert_eq!(
            offsets(&sent),
            [
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
        );
        assert!(sent.iter().all(|(_, b)| *b == invite.to_bytes()));
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
        assert_eq!(tx.poll_event(), None);
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn timer_b_fires_at_64_t1() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(t0, msg(INVITE), false, TimerConfig::default());
        drain(&mut tx);
        tx.handle_timeout(t0 + ms(31_999));
        assert_eq!(tx.poll_event(), None);
        // A late wake-up fires once, not a burst of the retransmissions it missed.
        assert_eq!(drain(&mut tx).len(), 1);
        tx.handle_timeout(t0 + ms(32_000));
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
        assert!(drain(&mut tx).is_empty());
    }

    #[test]
    fn timer_e_doubles_to_t2_then_timer_f_times_out() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(t0, msg(OPTIONS), false, TimerConfig::default());
        assert_eq!(tx.state(), ClientState::Trying);
        drain(&mut tx);
        let sent = run(&mut tx, t0, 60_000);
        assert_eq!(
            offsets(&sent),
            [
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
        );
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn timer_e_is_t2_in_proceeding_and_timer_f_still_runs() {
        let t0 = Instant::now();
        let options = msg(OPTIONS);
        let mut tx = ClientTransaction::new(t0, options.clone(), false, TimerConfig::default());
        drain(&mut tx);
        assert_eq!(offsets(&run(&mut tx, t0, 500)), [500]);
        // A 100 at 1 s: the retransmission already due at 1.5 s stays, then every T2.
        let trying = options.response(100, "Trying", None);
        tx.handle_response(t0 + ms(1000), &trying);
        assert_eq!(tx.state(), ClientState::Proceeding);
        assert_eq!(tx.poll_event(), Some(ClientEvent::Provisional(trying)));
        let sent = run(&mut tx, t0, 60_000);
        assert_eq!(
            offsets(&sent),
            [1500, 5500, 9500, 13500, 17500, 21500, 25500, 29500]
        );
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
    }

    #[test]
    fn reliable_transport_sends_once_and_does_not_linger() {
        let t0 = Instant::now();
        let cfg = TimerConfig::default();
        let options = msg(OPTIONS);
        let mut tx = ClientTransaction::new(t0, options.clone(), true, cfg.clone());
        assert_eq!(drain(&mut tx).len(), 1);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(32_000)));
        // Timer K is zero: the final response ends the transaction.
        tx.handle_response(t0 + ms(10), &options.response(200, "OK", Some("x")));
        assert!(matches!(tx.poll_event(), Some(ClientEvent::Final(_))));
        assert!(tx.is_terminated());

        let invite = msg(INVITE);
        let mut tx = ClientTransaction::new(t0, invite.clone(), true, cfg);
        assert_eq!(drain(&mut tx).len(), 1);
        assert!(run(&mut tx, t0, 60_000).is_empty());
        assert_eq!(tx.poll_event(), Some(ClientEvent::Timeout));
        // Timer D is zero: the ACK goes out and the transaction ends.
        let mut tx = ClientTransaction::new(t0, invite.clone(), true, TimerConfig::default());
        drain(&mut tx);
        tx.handle_response(t0 + ms(10), &invite.response(503, "Unavailable", Some("x")));
        assert_eq!(drain(&mut tx).len(), 1);
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_failure_is_acked_and_passed_up_once() {
        let t0 = Instant::now();
        let cfg = TimerConfig {
            timer_d: ms(2000),
            ..TimerConfig::default()
        };
        let invite = msg(INVITE);
        let mut tx = ClientTransaction::new(t0, invite.clone(), false, cfg);
        drain(&mut tx);
        let ringing = invite.response(180, "Ringing", Some("b1"));
        tx.handle_response(t0 + ms(100), &ringing);
        tx.handle_response(t0 + ms(150), &ringing);
        assert_eq!(
            tx.poll_event(),
            Some(ClientEvent::Provisional(ringing.clone()))
        );
        assert_eq!(tx.poll_event(), Some(ClientEvent::Provisional(ringing)));
        assert_eq!(tx.state(), ClientState::Proceeding);
        // Proceeding: no more retransmissions, and no timer B.
        assert_eq!(tx.poll_timeout(), None);

        let busy = invite.response(486, "Busy Here", Some("b1"));
        let at = t0 + ms(5000);
        tx.handle_response(at, &busy);
        assert_eq!(tx.poll_event(), Some(ClientEvent::Final(busy.clone())));
        assert_eq!(tx.state(), ClientState::Completed);
        let sent = drain(&mut tx);
        assert_eq!(sent.len(), 1);
        let ack = msg(std::str::from_utf8(&sent[0]).unwrap());
        assert_eq!(*ack.method(), Method::Ack);
        assert_eq!(
            ack.uri().unwrap().to_string(),
            "sip:+15551234567@203.0.113.10:5060"
        );
        assert_eq!(ack.vias().len(), 1);
        assert_eq!(ack.top_via(), invite.top_via());
        assert_eq!(ack.branch(), Some("z9hG4bKc1a1"));
        assert_eq!(ack.to().tag(), Some("b1"));
        assert_eq!(ack.from(), invite.from());
        assert_eq!(ack.call_id(), "call-1@pbx.example.com");
        assert_eq!(
            *ack.cseq(),
            CSeq {
                seq: 10,
                method: Method::Ack
            }
        );
        assert_eq!(
            ack.header_values(&HeaderName::Route).unwrap(),
            ["<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr>"]
        );
        assert_eq!(ack.max_forwards(), Some(70));
        assert!(ack.body().is_empty());
        assert!(ack.header(&HeaderName::Contact).is_none());
        assert!(sent[0].windows(19).any(|w| w == b"Content-Length: 0\r\n"));

        // The 486 again: our ACK was lost. Same ACK again, nothing for the TU.
        tx.handle_response(at + ms(500), &busy);
        assert_eq!(drain(&mut tx), sent);
        assert_eq!(tx.poll_event(), None);
        // Timer D, then gone.
        assert_eq!(tx.poll_timeout(), Some(at + ms(2000)));
        tx.handle_timeout(at + ms(2000));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), None);
        assert!(drain(&mut tx).is_empty());
    }

    #[test]
    fn invite_2xx_accepted_passes_every_2xx_until_timer_m() {
        let t0 = Instant::now();
        let invite = msg(INVITE);
        let mut tx = ClientTransaction::new(t0, invite.clone(), false, TimerConfig::default());
        drain(&mut tx);
        let progress = invite.response(183, "Session Progress", Some("b1"));
        tx.handle_response(t0 + ms(100), &progress);
        assert_eq!(tx.poll_event(), Some(ClientEvent::Provisional(progress)));
        let ok = invite.response(200, "OK", Some("b1"));
        let other_fork = invite.response(200, "OK", Some("b2"));
        tx.handle_response(t0 + ms(200), &ok);
        assert_eq!(tx.poll_event(), Some(ClientEvent::Final(ok.clone())));
        assert_eq!(tx.state(), ClientState::Accepted);
        // Lingering for timer M, it keeps nothing of the request.
        assert!(tx.request().is_none() && tx.request_bytes.is_empty());
        // No ACK from the transaction: the 2xx ACK is the TU's.
        assert!(drain(&mut tx).is_empty());
        tx.handle_response(t0 + ms(700), &ok);
        tx.handle_response(t0 + ms(800), &other_fork);
        tx.handle_response(t0 + ms(900), &invite.response(180, "Ringing", Some("b3")));
        assert_eq!(tx.poll_event(), Some(ClientEvent::Additional2xx(ok)));
        assert_eq!(
            tx.poll_event(),
            Some(ClientEvent::Additional2xx(other_fork))
        );
        assert_eq!(tx.poll_event(), None);
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(200 + 32_000)));
        tx.handle_timeout(t0 + ms(200 + 32_000));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), None);
    }

    #[test]
    fn transport_error_ends_the_client_transaction() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(t0, msg(INVITE), false, TimerConfig::default());
        tx.handle_transport_error(t0 + ms(1));
        assert_eq!(tx.poll_event(), Some(ClientEvent::TransportError));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_timeout(), None);
        tx.handle_transport_error(t0 + ms(2));
        assert_eq!(tx.poll_event(), None);
    }

    #[test]
    fn cancel_copies_what_section_9_1_says() {
        let invite = msg(INVITE);
        let cancel = msg(std::str::from_utf8(&cancel_for(&invite).to_bytes()).unwrap());
        assert_eq!(*cancel.method(), Method::Cancel);
        assert_eq!(cancel.uri(), invite.uri());
        assert_eq!(cancel.vias(), &invite.vias()[..1]);
        assert_eq!(cancel.from(), invite.from());
        assert_eq!(cancel.to(), invite.to());
        assert_eq!(cancel.to().tag(), None);
        assert_eq!(cancel.call_id(), invite.call_id());
        assert_eq!(cancel.cseq().seq, 10);
        assert_eq!(cancel.cseq().method, Method::Cancel);
        assert_eq!(cancel.header_values(&HeaderName::Route).unwrap().len(), 2);
        assert_eq!(cancel.max_forwards(), Some(70));
        assert!(cancel.body().is_empty());
    }

    // --- server ---

    #[test]
    fn non_invite_server_resends_what_its_state_says_then_timer_j() {
        let t0 = Instant::now();
        let options = msg(OPTIONS);
        let mut tx = ServerTransaction::new(t0, &options, false, TimerConfig::default());
        assert_eq!(tx.state(), ServerState::Trying);
        // Nothing sent yet: a retransmission is absorbed silently.
        assert!(tx.handle_request(t0 + ms(500), &options));
        assert!(drain(&mut tx).is_empty());
        let trying = options.response(100, "Trying", None);
        tx.respond(t0 + ms(600), &trying).unwrap();
        assert_eq!(tx.state(), ServerState::Proceeding);
        assert_eq!(drain(&mut tx), [trying.to_bytes()]);
        assert!(tx.handle_request(t0 + ms(1500), &options));
        assert_eq!(drain(&mut tx), [trying.to_bytes()]);
        let ok = options.response(200, "OK", Some("s1"));
        let at = t0 + ms(2000);
        tx.respond(at, &ok).unwrap();
        assert_eq!(tx.state(), ServerState::Completed);
        assert_eq!(drain(&mut tx), [ok.to_bytes()]);
        assert_eq!(
            tx.respond(at, &options.response(500, "Late", Some("s1"))),
            Err(TransactionError::AlreadyFinal)
        );
        assert!(tx.handle_request(at + ms(3500), &options));
        assert_eq!(drain(&mut tx), [ok.to_bytes()]);
        // Timer J: no retransmission of its own, then gone.
        assert!(run(&mut tx, t0, 2000 + 31_999).is_empty());
        assert!(!tx.is_terminated());
        tx.handle_timeout(at + ms(32_000));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), None);
    }

    #[test]
    fn reliable_non_invite_server_ends_with_its_final_response() {
        let t0 = Instant::now();
        let options = msg(OPTIONS);
        let mut tx = ServerTransaction::new(t0, &options, true, TimerConfig::default());
        tx.respond(t0, &options.response(200, "OK", Some("s1")))
            .unwrap();
        assert_eq!(drain(&mut tx).len(), 1);
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_server_retransmits_failure_on_g_until_ack_then_timer_i() {
        let t0 = Instant::now();
        let invite = msg(INVITE);
        let mut tx = ServerTransaction::new(t0, &invite, false, TimerConfig::default());
        assert_eq!(tx.state(), ServerState::Proceeding);
        let trying = invite.response(100, "Trying", None);
        tx.respond(t0, &trying).unwrap();
        assert!(tx.handle_request(t0 + ms(400), &invite));
        assert_eq!(drain(&mut tx), [trying.to_bytes(), trying.to_bytes()]);

        let not_found = invite.response(404, "Not Found", Some("s1"));
        tx.respond(t0, &not_found).unwrap();
        assert_eq!(tx.state(), ServerState::Completed);
        assert_eq!(drain(&mut tx), [not_found.to_bytes()]);
        let sent = run(&mut tx, t0, 12_000);
        assert_eq!(offsets(&sent), [500, 1500, 3500, 7500, 11500]);
        assert!(sent.iter().all(|(_, b)| *b == not_found.to_bytes()));
        // The INVITE again: the 404 again.
        assert!(tx.handle_request(t0 + ms(12_100), &invite));
        assert_eq!(drain(&mut tx), [not_found.to_bytes()]);

        let ack = ack_for(&invite, &not_found);
        let at = t0 + ms(12_200);
        assert!(tx.handle_request(at, &ack));
        assert_eq!(tx.state(), ServerState::Confirmed);
        assert!(tx.handle_request(at + ms(100), &ack));
        assert!(tx.handle_request(at + ms(200), &invite));
        assert!(drain(&mut tx).is_empty());
        // Timer I = T4, and no more G.
        assert_eq!(tx.poll_timeout(), Some(at + ms(5000)));
        assert!(run(&mut tx, t0, 12_200 + 5000).is_empty());
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), None);
    }

    #[test]
    fn invite_server_timer_h_without_ack() {
        let t0 = Instant::now();
        let invite = msg(INVITE);
        let mut tx = ServerTransaction::new(t0, &invite, false, TimerConfig::default());
        tx.respond(t0, &invite.response(486, "Busy Here", Some("s1")))
            .unwrap();
        drain(&mut tx);
        let sent = run(&mut tx, t0, 60_000);
        assert_eq!(
            offsets(&sent),
            [
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
        );
        assert_eq!(tx.poll_event(), Some(ServerEvent::Timeout));
        assert!(tx.is_terminated());
    }

    #[test]
    fn reliable_invite_server_waits_for_the_ack_without_retransmitting() {
        let t0 = Instant::now();
        let invite = msg(INVITE);
        let mut tx = ServerTransaction::new(t0, &invite, true, TimerConfig::default());
        let busy = invite.response(486, "Busy Here", Some("s1"));
        tx.respond(t0, &busy).unwrap();
        assert_eq!(drain(&mut tx).len(), 1);
        // Only timer H.
        assert_eq!(tx.poll_timeout(), Some(t0 + ms(32_000)));
        // Timer I is zero: the ACK ends it.
        assert!(tx.handle_request(t0 + ms(50), &ack_for(&invite, &busy)));
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_server_accepted_absorbs_invites_and_passes_2xx() {
        let t0 = Instant::now();
        let invite = msg(INVITE);
        let mut tx = ServerTransaction::new(t0, &invite, false, TimerConfig::default());
        tx.respond(t0, &invite.response(180, "Ringing", Some("s1")))
            .unwrap();
        assert_eq!(tx.request(), Some(&invite));
        drain(&mut tx);
        let ok = invite.response(200, "OK", Some("s1"));
        tx.respond(t0, &ok).unwrap();
        assert_eq!(tx.state(), ServerState::Accepted);
        // Lingering for timer L, it keeps neither the request nor the 2xx.
        assert!(tx.request().is_none() && tx.last_response.is_none());
        assert_eq!(drain(&mut tx), [ok.to_bytes()]);
        // The INVITE crossed the 2xx: absorbed, not re-answered, not new.
        assert!(tx.handle_request(t0 + ms(500), &invite));
        assert!(drain(&mut tx).is_empty());
        // The TU retransmits its 2xx through the transaction.
        tx.respond(t0 + ms(500), &ok).unwrap();
        assert_eq!(drain(&mut tx), [ok.to_bytes()]);
        assert_eq!(
            tx.respond(t0, &invite.response(486, "Busy Here", Some("s1"))),
            Err(TransactionError::AlreadyFinal)
        );
        // An ACK reaching it is the 2xx's: not the transaction's.
        assert!(!tx.handle_request(t0 + ms(600), &ack_for(&invite, &ok)));
        // Timer L, with no retransmission of its own.
        assert!(run(&mut tx, t0, 32_000).is_empty());
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), None);
    }

    #[test]
    fn server_transport_error_and_wrong_input() {
        let t0 = Instant::now();
        let invite = msg(INVITE);
        let mut tx = ServerTransaction::new(t0, &invite, false, TimerConfig::default());
        assert_eq!(
            tx.respond(t0, &invite),
            Err(TransactionError::WrongKind("a request is not a response"))
        );
        // A response handed in as a request is not absorbed.
        assert!(!tx.handle_request(t0, &invite.response(100, "Trying", None)));
        tx.handle_transport_error(t0);
        assert_eq!(tx.poll_event(), Some(ServerEvent::TransportError));
        assert!(tx.is_terminated());
        assert_eq!(
            tx.respond(t0, &invite.response(500, "x", None)),
            Err(TransactionError::Terminated)
        );
    }

    #[test]
    fn absurd_durations_do_not_panic() {
        let t0 = Instant::now();
        let cfg = TimerConfig {
            t1: Duration::MAX,
            t2: Duration::MAX,
            t4: Duration::MAX,
            timer_d: Duration::MAX,
        };
        let invite = msg(INVITE);
        let mut tx = ClientTransaction::new(t0, invite.clone(), false, cfg.clone());
        assert_eq!(tx.poll_timeout(), None);
        tx.handle_response(t0, &invite.response(486, "Busy Here", Some("b")));
        assert_eq!(tx.state(), ClientState::Completed);
        let mut tx = ServerTransaction::new(t0, &invite, false, cfg);
        tx.respond(t0, &invite.response(486, "Busy Here", Some("b")))
            .unwrap();
        tx.handle_timeout(t0);
        assert_eq!(tx.state(), ServerState::Completed);
    }
}

#[cfg(test)]
mod lookup_equivalence {
    use super::*;
    use std::hash::BuildHasher;

    fn req(method: &str, host: &str, port: &str, branch: &str) -> Message {
        let text = format!(
            "{method} sip:x@203.0.113.10 SIP/2.0\r\nVia: SIP/2.0/UDP {host}{port};branch={branch}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:a@b.example>;tag=f\r\nTo: <sip:x@y.example>\r\n\
             Call-ID: c1\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(text)).unwrap()
    }

    /// `find_server` (fast path and fallback) finds what a lookup by the owned key finds.
    #[test]
    fn find_server_matches_the_owned_key_lookup() {
        let hosts = [
            "pbx.example.com",
            "PBX.Example.com",
            "PBX.EXAMPLE.COM",
            "198.51.100.7",
            "[2001:db8::1]",
            "[2001:DB8::1]",
            "[::ffff:198.51.100.7]",
        ];
        let ports = ["", ":5060", ":5070"];
        let branches = ["z9hG4bKa1", "z9hG4bKA1", "z9hG4bK", "1234", "z9hg4bka1"];
        let methods = ["INVITE", "ACK", "CANCEL", "OPTIONS", "BYE", "FOO"];
        let mut all = Vec::new();
        for h in hosts {
            for p in ports {
                for b in branches {
                    for m in methods {
                        all.push(req(m, h, p, b));
                    }
                }
            }
        }
        let t0 = Instant::now();
        let mut t: Transactions<u32> = Transactions::new(TimerConfig::default());
        // File every second request (not ACK) so that both hits and misses are probed.
        for (i, r) in all.iter().enumerate() {
            if i % 2 == 0 && *r.method() != Method::Ack {
                t.handle_request(t0, r, 1, false);
            }
        }
        assert!(t.server_keys.len() > 100);
        let (mut hits, mut cancel_hits) = (0, 0);
        for r in &all {
            let old = t.server_keys.get(&ServerKey::of(r, None)).copied();
            assert_eq!(t.find_server(r, None), old, "{r:?}");
            hits += old.is_some() as usize;
            let old_cancel = t.server_keys.get(&ServerKey::of(r, Some(&INVITE))).copied();
            assert_eq!(t.find_server(r, Some(&INVITE)), old_cancel, "{r:?}");
            cancel_hits += old_cancel.is_some() as usize;
        }
        assert!(hits > 100 && cancel_hits > 50, "{hits} {cancel_hits}");
        // Hash agreement of every filed key with its borrowed form.
        let s = t.server_keys.hasher();
        for k in t.server_keys.keys() {
            if let ServerKey::Branch {
                branch,
                host,
                port,
                method,
            } = k
            {
                let r = BranchKeyRef {
                    branch,
                    host,
                    port: *port,
                    method,
                };
                assert_eq!(s.hash_one(k), s.hash_one(r));
                assert!(hashbrown::Equivalent::equivalent(&r, k));
            }
        }
    }
}
