//! One registration of the PBX with one trunk server: a state machine without I/O, driven by
//! the agent's loop (`run.rs`) with the time, DNS answers and transaction outcomes.
//!
//! It is a third-party registration (RFC 3261 §10.2): To and From name the trunk group's
//! address of record, the Contact is `pbx.contact`, so calls go straight to the PBX. Digest
//! challenges (401 and 407) are answered; a second challenge for an answer that was not stale
//! means the password is wrong. The granted expiry is refreshed ahead of time; 423 is retried
//! with the Min-Expires asked for; timeouts, transport errors and 5xx back off exponentially
//! with jitter (a Retry-After wins when longer) and move to the server's next DNS target;
//! 403, wrong credentials and other refusals are logged loudly and retried slowly.
//!
//! While the PBX is down the registration is *withdrawn*: a REGISTER with `expires=0` for the
//! Contact, so calls fail over at once; when the PBX is back it registers again.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytestring::ByteString;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::config::ServerSpec;
use crate::sip::digest::{Challenge, Credentials};
use crate::sip::message::{Header, HeaderName, Message, Method, Via};
use crate::sip::resolve::Target;
use crate::sip::uri::{Host, NameAddr, SipUri, Uri};

/// What the registration needs from the agent's settings.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    pub username: String,
    pub password: String,
    /// The Contact registered: where the trunk server sends calls.
    pub contact: Uri,
    pub expires: u32,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub fatal_retry: Duration,
}

/// What the loop must do for a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Resolve the server (RFC 3263) and call [`Registration::on_resolved`].
    Resolve,
    /// Send this REGISTER to the target in a client transaction, then report its outcome
    /// with [`Registration::on_response`] or [`Registration::on_failure`].
    Send(Box<Message>, Target),
}

/// Where the registration stands, for status and health reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Nothing sent yet, or waiting to retry.
    Unregistered,
    /// Registered until the instant given.
    Registered { until: Instant },
    /// The binding was withdrawn (or is being withdrawn) because the PBX is down.
    Withdrawn,
}

#[derive(Debug)]
enum Phase {
    /// The next action is due at `at`.
    Waiting { at: Instant },
    /// DNS is being asked.
    Resolving,
    /// A REGISTER is in flight.
    InFlight { withdrawing: bool },
    /// Nothing to do until the PBX comes back.
    Idle,
}

/// One registration with one trunk server.
#[derive(Debug)]
pub struct Registration {
    pub server: ServerSpec,
    config: RegistrationConfig,
    call_id: String,
    from_tag: String,
    cseq: u32,
    /// The server's DNS targets, in order, and the one in use.
    targets: Vec<Target>,
    target: usize,
    phase: Phase,
    /// Whether the PBX is up (register) or down (withdraw).
    wanted: bool,
    state: State,
    /// The expiry to ask for (raised by a 423).
    expires: u32,
    /// The last challenge, its header name and how often it was answered.
    challenge: Option<(Challenge, HeaderName, u32)>,
    /// Whether the request in flight answered a challenge (a new one then means a refusal).
    answered: bool,
    backoff: Duration,
    pub last_error: Option<String>,
}

impl Registration {
    pub fn new(server: ServerSpec, config: RegistrationConfig, now: Instant) -> Registration {
        let expires = config.expires;
        let backoff = config.retry_min;
        Registration {
            server,
            config,
            call_id: format!("{:032x}@lifeline-agent", rand::random::<u128>()),
            from_tag: format!("{:016x}", rand::random::<u64>()),
            cseq: 0,
            targets: Vec::new(),
            target: 0,
            phase: Phase::Waiting { at: now },
            wanted: true,
            state: State::Unregistered,
            expires,
            challenge: None,
            answered: false,
            backoff,
            last_error: None,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// When [`Registration::poll`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Waiting { at } => Some(at),
            _ => None,
        }
    }

    /// The action due at `now`, if any.
    pub fn poll(&mut self, now: Instant, local: SocketAddr) -> Option<Action> {
        match self.phase {
            Phase::Waiting { at } if at <= now => {}
            _ => return None,
        }
        if self.is_expired(now) {
            self.state = State::Unregistered;
        }
        if self.targets.is_empty() || self.target >= self.targets.len() {
            self.phase = Phase::Resolving;
            return Some(Action::Resolve);
        }
        let target = self.targets[self.target];
        let withdrawing = !self.wanted;
        self.phase = Phase::InFlight { withdrawing };
        Some(Action::Send(Box::new(self.request(target, local)), target))
    }

    fn is_expired(&self, now: Instant) -> bool {
        matches!(self.state, State::Registered { until } if until <= now)
    }

    /// The PBX went down (`false`: withdraw the binding) or came back (`true`: register).
    pub fn set_wanted(&mut self, now: Instant, wanted: bool) {
        if self.wanted == wanted {
            return;
        }
        self.wanted = wanted;
        self.backoff = self.config.retry_min;
        self.challenge = None;
        if !wanted {
            self.state = State::Withdrawn;
        }
        // A request in flight finishes first; its outcome schedules what comes next.
        if !matches!(self.phase, Phase::InFlight { .. } | Phase::Resolving) {
            self.phase = Phase::Waiting { at: now };
        }
    }

    /// The server's DNS targets (or why there are none).
    pub fn on_resolved(&mut self, now: Instant, result: Result<Vec<Target>, String>) {
        match result {
            Ok(targets) if !targets.is_empty() => {
                self.targets = targets;
                self.target = 0;
                self.phase = Phase::Waiting { at: now };
            }
            Ok(_) => self.retry(now, "DNS: no target".into(), None),
            Err(e) => self.retry(now, format!("DNS: {e}"), None),
        }
    }

    /// A final response to the REGISTER in flight.
    pub fn on_response(&mut self, now: Instant, response: &Message) {
        let Phase::InFlight { withdrawing } = self.phase else {
            return;
        };
        let status = response.status().unwrap_or(0);
        let server = self.server.uri.clone();
        match status {
            200..=299 if withdrawing => {
                self.reset_after_success();
                info!(%server, "registration withdrawn (PBX down)");
                self.after_withdrawal(now);
            }
            200..=299 => {
                let granted = self.granted_expiry(response).unwrap_or(self.expires);
                if granted == 0 {
                    self.retry(now, "200 OK without our Contact".into(), None);
                    return;
                }
                let was_registered = matches!(self.state, State::Registered { .. });
                self.reset_after_success();
                self.state = State::Registered {
                    until: now + Duration::from_secs(granted.into()),
                };
                if !was_registered {
                    info!(%server, expires = granted, target = %self.targets[self.target], "registered");
                }
                if !self.wanted {
                    // The PBX went down meanwhile: withdraw now.
                    self.phase = Phase::Waiting { at: now };
                } else {
                    self.phase = Phase::Waiting {
                        at: now + refresh_after(granted),
                    };
                }
            }
            401 | 407 => {
                let name = if status == 401 {
                    HeaderName::WwwAuthenticate
                } else {
                    HeaderName::ProxyAuthenticate
                };
                // One challenge per header line: its parameters are comma-separated too.
                let challenge = response
                    .headers()
                    .iter()
                    .filter(|h| h.name == name)
                    .find_map(|h| Challenge::parse(&h.value_str()).ok());
                let Some(challenge) = challenge else {
                    self.refused(
                        now,
                        format!("{status} without a digest challenge we can answer"),
                    );
                    return;
                };
                if self.answered && !challenge.stale {
                    self.refused(
                        now,
                        format!(
                            "{status}: wrong username or password for realm {}",
                            challenge.realm
                        ),
                    );
                    return;
                }
                self.challenge = Some((challenge, name, 0));
                self.phase = Phase::Waiting { at: now };
            }
            423 => {
                let min = response
                    .header(&HeaderName::MinExpires)
                    .and_then(|h| h.value_str().trim().parse::<u32>().ok());
                match min {
                    Some(min) if min > self.expires => {
                        info!(%server, min_expires = min, "423: registering with the Min-Expires asked for");
                        self.expires = min;
                        self.phase = Phase::Waiting { at: now };
                    }
                    _ => self.refused(now, "423 without a usable Min-Expires".into()),
                }
            }
            500..=599 => {
                let retry_after = response
                    .header(&HeaderName::RetryAfter)
                    .and_then(|h| h.value_str().split(';').next()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                self.retry(now, format!("{status} {}", reason(response)), retry_after);
            }
            // A 403 for an answered challenge: the credentials were refused.
            403 if self.answered => self.refused(
                now,
                format!("{status} {}: wrong username or password", reason(response)),
            ),
            _ => self.refused(now, format!("{status} {}", reason(response))),
        }
    }

    /// The REGISTER in flight got no answer (`timeout`) or could not be delivered.
    pub fn on_failure(&mut self, now: Instant, why: &str) {
        if !matches!(self.phase, Phase::InFlight { .. }) {
            return;
        }
        // The next attempt goes to the server's next target; past the last, DNS is asked again.
        self.target += 1;
        self.challenge = None;
        self.retry(
            now,
            format!(
                "{why} ({})",
                self.targets
                    .get(self.target - 1)
                    .map_or(String::new(), |t| t.to_string())
            ),
            None,
        );
    }

    fn reset_after_success(&mut self) {
        self.backoff = self.config.retry_min;
        self.last_error = None;
        self.answered = false;
    }

    fn after_withdrawal(&mut self, now: Instant) {
        self.state = State::Withdrawn;
        self.phase = if self.wanted {
            Phase::Waiting { at: now }
        } else {
            Phase::Idle
        };
    }

    /// A failure worth retrying soon: backoff with jitter, or the server's Retry-After.
    fn retry(&mut self, now: Instant, why: String, retry_after: Option<Duration>) {
        let jitter = rand::random_range(0.8..1.2);
        let mut wait = self.backoff.mul_f64(jitter);
        if let Some(ra) = retry_after {
            wait = wait.max(ra);
        }
        self.backoff = (self.backoff * 2).min(self.config.retry_max);
        if self.last_error.as_deref() != Some(why.as_str()) {
            warn!(server = %self.server.uri, error = %why, retry_in_ms = wait.as_millis() as u64, "registration failed; retrying");
        }
        self.failed(now + wait, why);
    }

    /// A refusal retrying soon cannot fix: loud, and slow to retry.
    fn refused(&mut self, now: Instant, why: String) {
        let wait = self.config.fatal_retry;
        error!(server = %self.server.uri, error = %why, retry_in_ms = wait.as_millis() as u64, "registration refused; check the trunk group's credentials and the server");
        self.failed(now + wait, why);
    }

    fn failed(&mut self, at: Instant, why: String) {
        self.answered = false;
        self.challenge = None;
        self.last_error = Some(why);
        if !self.wanted {
            // Withdrawing failed: the binding expires on its own; nothing more to do.
            self.after_withdrawal(at);
            self.phase = Phase::Idle;
            return;
        }
        if matches!(self.state, State::Withdrawn) {
            self.state = State::Unregistered;
        }
        self.phase = Phase::Waiting { at };
    }

    /// What the server granted for our Contact: its `expires` parameter, else the Expires
    /// header.
    fn granted_expiry(&self, response: &Message) -> Option<u32> {
        let ours = contact_key(&self.config.contact);
        let contacts = response.name_addrs(&HeaderName::Contact).ok()?;
        let mine = contacts.iter().find(|c| contact_key(&c.uri) == ours);
        match mine {
            Some(c) => c
                .params
                .value("expires")
                .and_then(|v| v.parse().ok())
                .or_else(|| expires_header(response)),
            // Some registrars answer without the bindings; trust the Expires header then.
            None if contacts.is_empty() => expires_header(response),
            None => Some(0),
        }
    }

    /// The REGISTER to send now.
    fn request(&mut self, target: Target, local: SocketAddr) -> Message {
        self.cseq += 1;
        let host = host_of_server(&self.server);
        let mut registrar = SipUri::new(host, self.server.port);
        registrar.secure = self.server.sips;
        let aor = format!("sip:{}@{}", self.config.username, registrar.host);
        let from = NameAddr::parse(&ByteString::from(format!("<{aor}>;tag={}", self.from_tag)))
            .expect("our own From parses");
        let to = NameAddr::parse(&ByteString::from(format!("<{aor}>"))).expect("our own To parses");
        let sent_by = SocketAddr::new(source_ip(local.ip(), target.addr), local.port());
        let via = Via::parse(&ByteString::from(format!(
            "SIP/2.0/{} {sent_by};branch=z9hG4bK{:016x};rport",
            target.transport.as_str(),
            rand::random::<u64>()
        )))
        .expect("our own Via parses");
        let uri = Uri::Sip(registrar);
        let mut req = Message::request(
            Method::Register,
            uri.clone(),
            via,
            from,
            to,
            &self.call_id,
            self.cseq,
            70,
        );
        let expires = if self.wanted { self.expires } else { 0 };
        req.push_header(Header::new(
            HeaderName::Contact,
            format!("<{}>;expires={expires}", self.config.contact),
        ));
        req.push_header(Header::new(HeaderName::Expires, expires.to_string()));
        req.push_header(Header::new(
            HeaderName::UserAgent,
            concat!("lifeline-agent/", env!("CARGO_PKG_VERSION")),
        ));
        self.answered = false;
        if let Some((challenge, name, count)) = &mut self.challenge {
            *count += 1;
            let cnonce = format!("{:016x}", rand::random::<u64>());
            match Credentials::answer(
                challenge,
                "REGISTER",
                &uri.to_string(),
                &self.config.username,
                &self.config.password,
                &cnonce,
                *count,
            ) {
                Ok(credentials) => {
                    let header = if *name == HeaderName::WwwAuthenticate {
                        HeaderName::Authorization
                    } else {
                        HeaderName::ProxyAuthorization
                    };
                    req.push_header(Header::new(header, credentials.to_string()));
                    self.answered = true;
                }
                Err(e) => {
                    warn!(server = %self.server.uri, error = %e, "cannot answer the challenge")
                }
            }
        }
        req
    }
}

/// Refresh well ahead of expiry: at half the granted time for short registrations, else 80 %
/// but at least 30 s early.
fn refresh_after(granted: u32) -> Duration {
    let granted = Duration::from_secs(granted.into());
    if granted <= Duration::from_secs(60) {
        granted / 2
    } else {
        (granted.mul_f64(0.8)).min(granted - Duration::from_secs(30))
    }
}

fn expires_header(response: &Message) -> Option<u32> {
    response
        .header(&HeaderName::Expires)
        .and_then(|h| h.value_str().trim().parse().ok())
}

fn reason(response: &Message) -> String {
    match response.start() {
        crate::sip::message::StartLine::Response { reason, .. } => {
            String::from_utf8_lossy(reason).into_owned()
        }
        _ => String::new(),
    }
}

/// A Contact compared without parameters and case in the host: what the server echoes.
fn contact_key(uri: &Uri) -> String {
    match uri {
        Uri::Sip(u) => format!(
            "{}:{}@{}:{}",
            if u.secure { "sips" } else { "sip" },
            u.user.as_deref().unwrap_or(""),
            u.host.to_string().to_ascii_lowercase(),
            u.port.unwrap_or(if u.secure { 5061 } else { 5060 })
        ),
        other => other.to_string(),
    }
}

fn host_of_server(server: &ServerSpec) -> Host {
    Host::parse(&server.host).unwrap_or_else(|_| Host::Name(ByteString::from(server.host.as_str())))
}

/// The address the agent's datagrams to `dest` leave from: the bound address, or, when bound
/// to every address, the one the kernel would pick for that route.
pub fn source_ip(bound: IpAddr, dest: SocketAddr) -> IpAddr {
    if !bound.is_unspecified() {
        return bound;
    }
    let any: SocketAddr = match dest {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| {
            s.connect(dest)?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(bound)
}
