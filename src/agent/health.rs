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
        // No new check while one is in flight: its miss comes first.
        match self.in_flight {
            Some((_, miss_at)) => miss_at,
            None => self.next_at,
        }
    }

    /// Starts from what an earlier check knew (a restarted loop keeps a down PBX down).
    pub fn assume(&mut self, state: PbxState) {
        self.state = state;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::HeaderName;

    fn local() -> SocketAddr {
        "127.0.0.1:5070".parse().unwrap()
    }

    fn config() -> HealthConfig {
        HealthConfig {
            address: "127.0.0.1:5060".parse().unwrap(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            down_after: 3,
            up_after: 2,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Sends the check due at `at` and returns its number.
    fn check(health: &mut PbxHealth, at: Instant) -> u64 {
        let (id, _) = health.poll(at, local()).expect("a check is due");
        id
    }

    /// One check at `at` that gets no answer within the timeout (counted by poll); returns
    /// when the next one is due.
    fn miss(health: &mut PbxHealth, at: Instant) -> Instant {
        check(health, at);
        let miss_at = at + config().timeout;
        assert_eq!(health.poll_timeout(), miss_at);
        assert!(health.poll(miss_at, local()).is_none());
        at + config().interval
    }

    /// One check at `at` answered at once; returns when the next one is due.
    fn answer(health: &mut PbxHealth, at: Instant) -> Instant {
        let id = check(health, at);
        health.on_answer(at + Duration::from_millis(20), id);
        at + config().interval
    }

    #[test]
    fn unknown_at_start_and_up_after_one_answer() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        assert_eq!(health.state(), PbxState::Unknown);
        assert_eq!(health.last_answer, None);
        assert_eq!(health.poll_timeout(), now);
        let id = check(&mut health, now);
        assert_eq!(health.state(), PbxState::Unknown);
        let answered = now + Duration::from_millis(3);
        health.on_answer(answered, id);
        assert_eq!(health.state(), PbxState::Up);
        assert_eq!(health.last_answer, Some(answered));
    }

    #[test]
    fn down_after_misses_in_a_row_by_timeout() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let mut at = answer(&mut health, now);
        assert_eq!(health.state(), PbxState::Up);
        for _ in 0..2 {
            at = miss(&mut health, at);
            assert_eq!(health.state(), PbxState::Up);
        }
        miss(&mut health, at);
        assert_eq!(health.state(), PbxState::Down);
    }

    #[test]
    fn down_after_misses_in_a_row_by_failure_reports() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let mut at = answer(&mut health, now);
        for n in 1..=3 {
            let id = check(&mut health, at);
            health.on_failure(id, "transport error");
            assert_eq!(
                health.state(),
                if n < 3 { PbxState::Up } else { PbxState::Down }
            );
            // The failure ends the check: nothing more before the interval.
            assert_eq!(health.poll_timeout(), at + config().interval);
            assert!(health.poll(at + secs(4), local()).is_none());
            at += config().interval;
        }
    }

    #[test]
    fn misses_from_the_start_make_it_down() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let mut at = now;
        for _ in 0..2 {
            at = miss(&mut health, at);
            assert_eq!(health.state(), PbxState::Unknown);
        }
        miss(&mut health, at);
        assert_eq!(health.state(), PbxState::Down);
    }

    #[test]
    fn an_answer_resets_the_miss_count() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let mut at = answer(&mut health, now);
        for _ in 0..5 {
            at = miss(&mut health, at);
            at = miss(&mut health, at);
            at = answer(&mut health, at);
            assert_eq!(health.state(), PbxState::Up);
        }
        for _ in 0..3 {
            at = miss(&mut health, at);
        }
        assert_eq!(health.state(), PbxState::Down);
    }

    #[test]
    fn up_again_only_after_up_after_answers_in_a_row() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let mut at = now;
        for _ in 0..3 {
            at = miss(&mut health, at);
        }
        assert_eq!(health.state(), PbxState::Down);
        // Answers not in a row do not count.
        for _ in 0..3 {
            at = answer(&mut health, at);
            assert_eq!(health.state(), PbxState::Down);
            at = miss(&mut health, at);
            assert_eq!(health.state(), PbxState::Down);
        }
        at = answer(&mut health, at);
        assert_eq!(health.state(), PbxState::Down);
        at = answer(&mut health, at);
        assert_eq!(health.state(), PbxState::Up);
        // And down again after down_after misses.
        for _ in 0..3 {
            at = miss(&mut health, at);
        }
        assert_eq!(health.state(), PbxState::Down);
    }

    #[test]
    fn up_after_one_is_up_at_the_first_answer() {
        let now = Instant::now();
        let mut health = PbxHealth::new(
            HealthConfig {
                up_after: 1,
                down_after: 1,
                ..config()
            },
            now,
        );
        let at = miss(&mut health, now);
        assert_eq!(health.state(), PbxState::Down);
        answer(&mut health, at);
        assert_eq!(health.state(), PbxState::Up);
    }

    #[test]
    fn a_late_answer_of_an_old_check_leaves_the_check_in_flight() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let first = check(&mut health, now);
        assert!(
            health.poll(now + secs(2), local()).is_none(),
            "first check missed"
        );
        let second_at = now + secs(5);
        let second = check(&mut health, second_at);
        assert_ne!(first, second);
        // The first check's answer arrives late.
        health.on_answer(second_at + secs(1), first);
        assert_eq!(health.last_answer, Some(second_at + secs(1)));
        // The second is still awaited: it can still miss.
        assert_eq!(health.poll_timeout(), second_at + config().timeout);
        // Neither does a late failure of the first check count, nor clear the second.
        health.on_failure(first, "timeout");
        assert_eq!(health.poll_timeout(), second_at + config().timeout);
        health.on_failure(second, "timeout");
        assert_eq!(health.poll_timeout(), second_at + config().interval);
    }

    #[test]
    fn a_late_failure_of_an_old_check_is_not_another_miss() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let mut at = answer(&mut health, now);
        let mut ids = Vec::new();
        for _ in 0..2 {
            ids.push(check(&mut health, at));
            assert!(health.poll(at + config().timeout, local()).is_none());
            at += config().interval;
        }
        // The transactions of the two missed checks time out later: already counted.
        for id in ids {
            health.on_failure(id, "timeout");
        }
        assert_eq!(health.state(), PbxState::Up);
    }

    #[test]
    fn checks_go_out_only_at_the_interval_and_one_at_a_time() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let id = check(&mut health, now);
        assert_eq!(id, 1);
        assert!(health.poll(now, local()).is_none(), "one check in flight");
        assert_eq!(health.poll_timeout(), now + secs(2));
        health.on_answer(now + Duration::from_millis(10), id);
        assert_eq!(health.poll_timeout(), now + secs(5));
        assert!(
            health
                .poll(now + Duration::from_millis(4999), local())
                .is_none()
        );
        assert_eq!(check(&mut health, now + secs(5)), 2);
        // A late poll sends one check, and the interval counts from then.
        health.on_answer(now + secs(5), 2);
        assert_eq!(check(&mut health, now + secs(17)), 3);
        health.on_answer(now + secs(17), 3);
        assert!(health.poll(now + secs(21), local()).is_none());
        assert_eq!(health.poll_timeout(), now + secs(22));
    }

    #[test]
    fn no_second_check_while_one_is_in_flight_past_the_interval() {
        let now = Instant::now();
        let config = HealthConfig {
            interval: secs(1),
            timeout: secs(3),
            ..config()
        };
        let mut health = PbxHealth::new(config, now);
        check(&mut health, now);
        assert!(
            health
                .poll(now + Duration::from_millis(1500), local())
                .is_none()
        );
        assert!(
            health
                .poll(now + Duration::from_millis(2999), local())
                .is_none()
        );
        // At the timeout the check misses and the next, overdue, goes out at once.
        assert_eq!(check(&mut health, now + secs(3)), 2);
    }

    #[test]
    fn the_options_request_goes_to_the_configured_address() {
        let now = Instant::now();
        let mut health = PbxHealth::new(config(), now);
        let (_, first) = health.poll(now, local()).unwrap();
        let first = Message::parse(first.to_bytes()).expect("the OPTIONS parses");
        assert_eq!(first.method(), &Method::Options);
        assert_eq!(first.uri().unwrap().to_string(), "sip:127.0.0.1:5060");
        assert_eq!(first.to().uri.to_string(), "sip:127.0.0.1:5060");
        assert_eq!(first.to().tag(), None);
        assert!(first.from().tag().is_some());
        assert_eq!(first.cseq().seq, 1);
        assert_eq!(first.max_forwards(), Some(70));
        let via = first.top_via();
        assert_eq!(via.transport.as_ref() as &str, "UDP");
        assert_eq!(via.host.to_string(), "127.0.0.1");
        assert_eq!(via.port, Some(5070));
        assert_eq!(via.rport(), Some(None));
        assert!(first.branch().is_some());
        assert!(first.header(&HeaderName::CallId).is_some());
        health.on_answer(now, 1);
        let (_, second) = health.poll(now + secs(5), local()).unwrap();
        assert_ne!(second.call_id(), first.call_id());
        assert_ne!(second.branch(), first.branch());
    }

    #[test]
    fn an_ipv6_pbx_address_is_bracketed() {
        let now = Instant::now();
        let mut health = PbxHealth::new(
            HealthConfig {
                address: "[::1]:5062".parse().unwrap(),
                ..config()
            },
            now,
        );
        let (_, msg) = health.poll(now, "[::1]:5070".parse().unwrap()).unwrap();
        let msg = Message::parse(msg.to_bytes()).unwrap();
        assert_eq!(msg.uri().unwrap().to_string(), "sip:[::1]:5062");
        assert_eq!(msg.top_via().host.to_string(), "[::1]");
    }

    #[test]
    fn the_state_names() {
        assert_eq!(PbxState::Unknown.as_str(), "unknown");
        assert_eq!(PbxState::Up.as_str(), "up");
        assert_eq!(PbxState::Down.as_str(), "down");
        assert_eq!(serde_json::to_string(&PbxState::Down).unwrap(), "\"down\"");
    }

    #[test]
    fn poll_timeout_is_not_in_the_past_while_a_check_outlives_the_interval() {
        let now = Instant::now();
        let mut health = PbxHealth::new(
            HealthConfig {
                interval: secs(1),
                timeout: secs(3),
                ..config()
            },
            now,
        );
        check(&mut health, now);
        let later = now + Duration::from_millis(1500);
        assert!(health.poll(later, local()).is_none());
        assert!(
            health.poll_timeout() > later,
            "poll_timeout {:?} after start, polled at 1.5 s",
            health.poll_timeout() - now
        );
    }
}
