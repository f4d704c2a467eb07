//! Is the PBX alive? SIP OPTIONS to its local address at an interval: any SIP response, of any
//! status (Asterisk may answer 401 or 404), means alive; only a missing answer (no final
//! response within the check timeout, a transaction timeout or a transport error) is a miss.
//! Down after `down_after` misses in a row, up again after `up_after` answers in a row. A state
//! machine without I/O, driven by the agent's loop.

use std::net::SocketAddr;
use std::time::Duration;

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{info, warn};

use super::registration::source_ip;
use crate::sip::message::{Message, Method, Via};
use crate::sip::uri::{NameAddr, SipUri, Uri};

/// What the agent believes of the PBX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PbxState {
    /// No verdict yet (the agent just started): registrations are kept up.
    #[default]
    Unknown,
    Up,
    Down,
}

impl PbxState {
    pub fn as_str(self) -> &'static str {
        match self {
            PbxState::Unknown => "unknown",
            PbxState::Up => "up",
            PbxState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    pub address: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
    pub down_after: u32,
    pub up_after: u32,
}

/// The PBX's health check.
#[derive(Debug)]
pub struct PbxHealth {
    config: HealthConfig,
    state: PbxState,
    misses: u32,
    answers: u32,
    next_at: Instant,
    /// The check in flight: its number and when it counts as missed.
    in_flight: Option<(u64, Instant)>,
    sent: u64,
    /// When the PBX last answered.
    pub last_answer: Option<Instant>,
}

impl PbxHealth {
    pub fn new(config: HealthConfig, now: Instant) -> PbxHealth {
        PbxHealth {
            config,
            state: PbxState::Unknown,
            misses: 0,
            answers: 0,
            next_at: now,
            in_flight: None,
            sent: 0,
            last_answer: None,
        }
    }

    pub fn state(&self) -> PbxState {
        self.state
    }

    pub fn poll_timeout(&self) -> Instant {
        match self.in_flight {
            Some((_, miss_at)) => miss_at.min(self.next_at),
            None => self.next_at,
        }
    }

    /// Counts a check that ran out of time, and returns the OPTIONS to send now, if one is due
    /// (with its number, to report its outcome). The state may change: see [`Self::state`].
    pub fn poll(&mut self, now: Instant, local: SocketAddr) -> Option<(u64, Message)> {
        if let Some((_, miss_at)) = self.in_flight
            && miss_at <= now
        {
            self.in_flight = None;
            self.missed("no answer");
        }
        if self.next_at > now || self.in_flight.is_some() {
            return None;
        }
        self.next_at = now + self.config.interval;
        self.sent += 1;
        self.in_flight = Some((self.sent, now + self.config.timeout));
        Some((self.sent, self.request(local)))
    }

    /// Check `id` got a response (any status).
    pub fn on_answer(&mut self, now: Instant, id: u64) {
        self.last_answer = Some(now);
        if self.in_flight.is_some_and(|(current, _)| current == id) {
            self.in_flight = None;
        }
        self.misses = 0;
        self.answers = self.answers.saturating_add(1);
        if self.state != PbxState::Up
            && (self.state == PbxState::Unknown || self.answers >= self.config.up_after)
        {
            info!(pbx = %self.config.address, "PBX up");
            self.state = PbxState::Up;
        }
    }

    /// Check `id` failed at once (transport error, transaction timeout).
    pub fn on_failure(&mut self, id: u64, why: &str) {
        if self.in_flight.is_some_and(|(current, _)| current == id) {
            self.in_flight = None;
            self.missed(why);
        }
    }

    fn missed(&mut self, why: &str) {
        self.answers = 0;
        self.misses = self.misses.saturating_add(1);
        if self.state != PbxState::Down && self.misses >= self.config.down_after {
            warn!(pbx = %self.config.address, misses = self.misses, why, "PBX down: withdrawing its registrations");
            self.state = PbxState::Down;
        }
    }

    fn request(&self, local: SocketAddr) -> Message {
        let dest = self.config.address;
        let sent_by = SocketAddr::new(source_ip(local.ip(), dest), local.port());
        let host = match dest.ip() {
            std::net::IpAddr::V4(ip) => crate::sip::uri::Host::V4(ip),
            std::net::IpAddr::V6(ip) => crate::sip::uri::Host::V6(ip),
        };
        let uri = Uri::Sip(SipUri::new(host, Some(dest.port())));
        let from = NameAddr::parse(&ByteString::from(format!(
            "<sip:lifeline-agent@{sent_by}>;tag={:016x}",
            rand::random::<u64>()
        )))
        .expect("our own From parses");
        let to = NameAddr::parse(&ByteString::from(format!("<{uri}>"))).expect("a URI parses");
        let via = Via::parse(&ByteString::from(format!(
            "SIP/2.0/UDP {sent_by};branch=z9hG4bK{:016x};rport",
            rand::random::<u64>()
        )))
        .expect("our own Via parses");
        let call_id = format!("{:016x}@lifeline-agent", rand::random::<u64>());
        Message::request(Method::Options, uri, via, from, to, &call_id, 1, 70)
    }
}
