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
    /// Whether the request in flight answered a challenge, and whether that challenge came in
    /// answer to the request before (a reused nonce may be unknown to a restarted server: a new
    /// challenge for it is answered, not taken for a wrong password).
    answered: bool,
    answered_fresh: bool,
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
            answered_fresh: false,
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
                // While a withdrawal is pending (the PBX went down meanwhile) it reads withdrawn.
                self.state = if self.wanted {
                    State::Registered {
                        until: now + Duration::from_secs(granted.into()),
                    }
                } else {
                    State::Withdrawn
                };
                if !was_registered && self.wanted {
                    info!(%server, expires = granted, server_target = %self.targets[self.target], "registered");
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
                if let Err(e) = Credentials::answer(
                    &challenge,
                    "REGISTER",
                    "sip:check",
                    &self.config.username,
                    &self.config.password,
                    "check",
                    1,
                ) {
                    self.refused(now, format!("{status}: cannot answer the challenge: {e}"));
                    return;
                }
                if self.answered && self.answered_fresh && !challenge.stale {
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
                // RFC 3261 §20.33: delta-seconds, then maybe a comment and parameters.
                let retry_after = response
                    .header(&HeaderName::RetryAfter)
                    .and_then(|h| {
                        let v = h.value_str();
                        let digits: String = v
                            .trim_start()
                            .chars()
                            .take_while(char::is_ascii_digit)
                            .collect();
                        digits.parse::<u64>().ok()
                    })
                    .map(Duration::from_secs);
                // RFC 3263 §4.3: the next target is tried after a 503 (and any 5xx here); with
                // none left, the first again (no new DNS lookup for a server that answers).
                self.target = if self.target + 1 < self.targets.len() {
                    self.target + 1
                } else {
                    0
                };
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
            // Withdrawing failed: tried again (the binding would expire on its own, but calls
            // would wait for a delivery timer until then).
            self.state = State::Withdrawn;
            self.phase = Phase::Waiting { at };
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
            self.answered_fresh = *count == 1;
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

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;

    use super::*;
    use crate::sip::digest::{Algorithm, AuthFailure, Authenticator, ha1};
    use crate::sip::transport::Transport;

    const USER: &str = "tg1000";
    const PASSWORD: &str = "s3cret-pw";
    const REALM: &str = "lifeline";
    const CONTACT: &str = "sip:pbx@203.0.113.5:5060";

    fn local() -> SocketAddr {
        "192.0.2.50:5070".parse().unwrap()
    }

    fn server() -> ServerSpec {
        ServerSpec {
            uri: "sip:trunk.example.net".into(),
            host: "trunk.example.net".into(),
            port: None,
            transport: None,
            sips: false,
        }
    }

    fn config() -> RegistrationConfig {
        RegistrationConfig {
            username: USER.into(),
            password: PASSWORD.into(),
            contact: Uri::parse(&ByteString::from(CONTACT)).unwrap(),
            expires: 300,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(8),
            fatal_retry: Duration::from_secs(300),
        }
    }

    fn target(n: u8) -> Target {
        Target {
            addr: SocketAddr::from(([198, 51, 100, n], 5060)),
            transport: Transport::Udp,
        }
    }

    /// A registration that resolved to `targets` at `now`.
    fn resolved(now: Instant, targets: Vec<Target>) -> Registration {
        let mut reg = Registration::new(server(), config(), now);
        assert_eq!(reg.poll(now, local()), Some(Action::Resolve));
        reg.on_resolved(now, Ok(targets));
        reg
    }

    /// The REGISTER due at `now`, as it is on the wire, and its target.
    fn send(reg: &mut Registration, now: Instant) -> (Message, Target) {
        match reg.poll(now, local()) {
            Some(Action::Send(msg, target)) => {
                let wire = Message::parse(msg.to_bytes()).expect("our REGISTER parses");
                assert_eq!(wire.method(), &Method::Register);
                (wire, target)
            }
            other => panic!("expected a REGISTER at {now:?}, got {other:?}"),
        }
    }

    /// A response to `req` with extra headers, as it arrives from the wire.
    fn reply(req: &Message, code: u16, reason: &str, extra: &[(HeaderName, &str)]) -> Message {
        let mut resp = req.response(code, reason, Some("srv-tag"));
        for (name, value) in extra {
            resp.push_header(Header::new(name.clone(), value.to_string()));
        }
        Message::parse(resp.to_bytes()).expect("the response parses")
    }

    fn ok(req: &Message, expires: u32) -> Message {
        let contact = format!("<{CONTACT}>;expires={expires}");
        reply(req, 200, "OK", &[(HeaderName::Contact, &contact)])
    }

    fn header(msg: &Message, name: &HeaderName) -> Option<String> {
        msg.header(name).map(|h| h.value_str().into_owned())
    }

    /// The Contact's `expires` parameter and the Expires header of a REGISTER.
    fn asked_expiry(req: &Message) -> (u32, u32) {
        let contacts = req.name_addrs(&HeaderName::Contact).unwrap();
        assert_eq!(contacts.len(), 1, "one Contact: {contacts:?}");
        assert_eq!(contacts[0].uri.to_string(), CONTACT);
        let param = contacts[0]
            .params
            .value("expires")
            .unwrap()
            .parse()
            .unwrap();
        let header = header(req, &HeaderName::Expires).unwrap().parse().unwrap();
        (param, header)
    }

    fn credentials(req: &Message, name: &HeaderName) -> Credentials {
        Credentials::parse(&header(req, name).expect("credentials sent")).unwrap()
    }

    /// Whether the real server side accepts `creds` for `password`.
    fn verify(
        auth: &Authenticator,
        creds: &Credentials,
        password: &str,
    ) -> Result<(), AuthFailure> {
        auth.verify(SystemTime::now(), creds, "REGISTER", REALM, |user, alg| {
            (user == USER).then(|| ha1(alg, user, REALM, password))
        })
    }

    fn challenge_401(auth: &Authenticator, req: &Message, stale: bool) -> Message {
        let challenge = auth.challenge(SystemTime::now(), REALM, Algorithm::Md5, stale);
        reply(
            req,
            401,
            "Unauthorized",
            &[(HeaderName::WwwAuthenticate, &challenge.to_string())],
        )
    }

    fn assert_wait_between(reg: &Registration, now: Instant, min: Duration, max: Duration) {
        let at = reg.poll_timeout().expect("a retry is scheduled");
        assert!(
            at >= now + min && at <= now + max,
            "retry in {:?}, expected between {min:?} and {max:?}",
            at - now
        );
    }

    /// Registered at `now` through a digest challenge of `auth`.
    fn registered(now: Instant, auth: &Authenticator) -> Registration {
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &challenge_401(auth, &req, false));
        let (req, _) = send(&mut reg, now);
        verify(
            auth,
            &credentials(&req, &HeaderName::Authorization),
            PASSWORD,
        )
        .unwrap();
        reg.on_response(now, &ok(&req, 300));
        assert!(matches!(reg.state(), State::Registered { .. }));
        reg
    }

    #[test]
    fn first_poll_resolves_then_sends_a_well_formed_register() {
        let now = Instant::now();
        let mut reg = Registration::new(server(), config(), now);
        assert_eq!(reg.state(), &State::Unregistered);
        assert_eq!(reg.poll_timeout(), Some(now));
        assert_eq!(reg.poll(now, local()), Some(Action::Resolve));
        // Nothing more while DNS is asked.
        assert_eq!(reg.poll_timeout(), None);
        assert_eq!(reg.poll(now + Duration::from_secs(10), local()), None);
        reg.on_resolved(now, Ok(vec![target(1)]));
        assert_eq!(reg.poll_timeout(), Some(now));

        let (req, to) = send(&mut reg, now);
        assert_eq!(to, target(1));
        assert_eq!(req.uri().unwrap().to_string(), "sip:trunk.example.net");
        assert_eq!(req.to().uri.to_string(), "sip:tg1000@trunk.example.net");
        assert_eq!(req.to().tag(), None);
        assert_eq!(req.from().uri.to_string(), "sip:tg1000@trunk.example.net");
        assert!(req.from().tag().is_some_and(|t| !t.is_empty()));
        assert_eq!(asked_expiry(&req), (300, 300));
        assert_eq!(req.cseq().seq, 1);
        assert_eq!(req.cseq().method, Method::Register);
        assert_eq!(req.max_forwards(), Some(70));
        let via = req.top_via();
        assert_eq!(via.transport.as_ref() as &str, "UDP");
        assert_eq!(via.host.to_string(), "192.0.2.50");
        assert_eq!(via.port, Some(5070));
        assert_eq!(via.rport(), Some(None), "rport asked for");
        assert!(req.branch().is_some(), "an RFC 3261 branch");
        assert!(header(&req, &HeaderName::Authorization).is_none());
        // One request in flight at a time.
        assert_eq!(reg.poll(now, local()), None);
        assert_eq!(reg.poll_timeout(), None);
    }

    #[test]
    fn call_id_and_from_tag_are_stable_cseq_counts_and_each_request_has_its_branch() {
        let now = Instant::now();
        let auth = Authenticator::new(Duration::from_secs(3600));
        let mut reg = resolved(now, vec![target(1)]);
        let (first, _) = send(&mut reg, now);
        reg.on_response(now, &challenge_401(&auth, &first, false));
        let (second, _) = send(&mut reg, now);
        reg.on_response(now, &ok(&second, 120));
        let refresh_at = reg.poll_timeout().unwrap();
        let (third, _) = send(&mut reg, refresh_at);
        let requests = [&first, &second, &third];
        for (i, req) in requests.iter().enumerate() {
            assert_eq!(req.call_id(), first.call_id());
            assert_eq!(req.from().tag(), first.from().tag());
            assert_eq!(req.cseq().seq, i as u32 + 1);
        }
        let branches: std::collections::HashSet<_> = requests
            .iter()
            .map(|r| r.branch().unwrap().to_string())
            .collect();
        assert_eq!(branches.len(), 3, "a new branch per request: {branches:?}");
        // Another registration has another Call-ID.
        let mut other = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut other, now);
        assert_ne!(req.call_id(), first.call_id());
    }

    #[test]
    fn request_uri_keeps_the_server_port_and_via_names_the_target_transport() {
        let now = Instant::now();
        let spec = ServerSpec {
            uri: "sip:192.0.2.10:5080;transport=tcp".into(),
            host: "192.0.2.10".into(),
            port: Some(5080),
            transport: Some(Transport::Tcp),
            sips: false,
        };
        let mut reg = Registration::new(spec, config(), now);
        assert_eq!(reg.poll(now, local()), Some(Action::Resolve));
        let tcp = Target {
            addr: "192.0.2.10:5080".parse().unwrap(),
            transport: Transport::Tcp,
        };
        reg.on_resolved(now, Ok(vec![tcp]));
        let (req, to) = send(&mut reg, now);
        assert_eq!(to, tcp);
        assert_eq!(req.uri().unwrap().to_string(), "sip:192.0.2.10:5080");
        assert_eq!(req.to().uri.to_string(), "sip:tg1000@192.0.2.10");
        assert_eq!(req.top_via().transport.as_ref() as &str, "TCP");
    }

    #[test]
    fn a_401_is_answered_with_an_authorization_the_server_accepts() {
        for algorithm in [Algorithm::Md5, Algorithm::Sha256] {
            let now = Instant::now();
            let auth = Authenticator::new(Duration::from_secs(3600)).with_opaque("op4que");
            let mut reg = resolved(now, vec![target(1)]);
            let (req, _) = send(&mut reg, now);
            let challenge = auth.challenge(SystemTime::now(), REALM, algorithm, false);
            let resp = reply(
                &req,
                401,
                "Unauthorized",
                &[(HeaderName::WwwAuthenticate, &challenge.to_string())],
            );
            reg.on_response(now, &resp);
            assert_eq!(reg.poll_timeout(), Some(now), "answered at once");
            let (req, to) = send(&mut reg, now);
            assert_eq!(to, target(1));
            assert!(header(&req, &HeaderName::ProxyAuthorization).is_none());
            let creds = credentials(&req, &HeaderName::Authorization);
            assert_eq!(creds.username, USER);
            assert_eq!(creds.realm, REALM);
            assert_eq!(creds.nonce, challenge.nonce);
            assert_eq!(creds.algorithm, algorithm);
            assert_eq!(creds.opaque.as_deref(), Some("op4que"));
            assert_eq!(creds.uri, req.uri().unwrap().to_string());
            assert_eq!(creds.nc, Some(1));
            assert_eq!(
                creds.response,
                creds.expected_response(&ha1(algorithm, USER, REALM, PASSWORD), "REGISTER")
            );
            assert_eq!(
                verify(&auth, &creds, "not-the-password"),
                Err(AuthFailure::BadResponse)
            );
            assert_eq!(verify(&auth, &creds, PASSWORD), Ok(()));
            reg.on_response(now, &ok(&req, 300));
            assert!(matches!(reg.state(), State::Registered { .. }));
            assert_eq!(reg.last_error, None);
        }
    }

    #[test]
    fn a_literal_digest_challenge_with_qop_is_answered() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        let resp = Message::parse(Bytes::from(format!(
            "SIP/2.0 401 Unauthorized\r\n\
             Via: {via}\r\n\
             From: {from}\r\n\
             To: <sip:tg1000@trunk.example.net>;tag=as1\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 REGISTER\r\n\
             WWW-Authenticate: Digest realm=\"asterisk\", nonce=\"4a6b3c2d\", qop=\"auth\", algorithm=MD5\r\n\
             Content-Length: 0\r\n\r\n",
            via = req.top_via(),
            from = req.from(),
            call_id = req.call_id(),
        )))
        .unwrap();
        reg.on_response(now, &resp);
        let (req, _) = send(&mut reg, now);
        let creds = credentials(&req, &HeaderName::Authorization);
        assert_eq!(
            (creds.realm.as_str(), creds.nonce.as_str()),
            ("asterisk", "4a6b3c2d")
        );
        assert!(creds.cnonce.as_deref().is_some_and(|c| !c.is_empty()));
        assert_eq!(creds.nc, Some(1));
        let ha1 = ha1(Algorithm::Md5, USER, "asterisk", PASSWORD);
        assert_eq!(creds.response, creds.expected_response(&ha1, "REGISTER"));
    }

    #[test]
    fn a_407_is_answered_with_proxy_authorization() {
        let now = Instant::now();
        let auth = Authenticator::new(Duration::from_secs(3600));
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        let challenge = auth.challenge(SystemTime::now(), REALM, Algorithm::Md5, false);
        let resp = reply(
            &req,
            407,
            "Proxy Authentication Required",
            &[(HeaderName::ProxyAuthenticate, &challenge.to_string())],
        );
        reg.on_response(now, &resp);
        let (req, _) = send(&mut reg, now);
        assert!(header(&req, &HeaderName::Authorization).is_none());
        let creds = credentials(&req, &HeaderName::ProxyAuthorization);
        assert_eq!(creds.nonce, challenge.nonce);
        assert_eq!(verify(&auth, &creds, PASSWORD), Ok(()));
        reg.on_response(now, &ok(&req, 300));
        assert!(matches!(reg.state(), State::Registered { .. }));
    }

    #[test]
    fn a_refresh_reuses_the_nonce_with_a_higher_count_the_server_accepts() {
        let now = Instant::now();
        let auth = Authenticator::new(Duration::from_secs(3600));
        let mut reg = registered(now, &auth);
        let at = reg.poll_timeout().unwrap();
        let (req, _) = send(&mut reg, at);
        let creds = credentials(&req, &HeaderName::Authorization);
        assert_eq!(creds.nc, Some(2));
        assert_eq!(verify(&auth, &creds, PASSWORD), Ok(()));
        reg.on_response(at, &ok(&req, 300));
        assert_eq!(
            reg.state(),
            &State::Registered {
                until: at + Duration::from_secs(300)
            }
        );
    }

    #[test]
    fn a_second_401_for_an_answered_challenge_means_a_wrong_password() {
        let now = Instant::now();
        let auth = Authenticator::new(Duration::from_secs(3600));
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &challenge_401(&auth, &req, false));
        let (req, _) = send(&mut reg, now);
        assert!(header(&req, &HeaderName::Authorization).is_some());
        reg.on_response(now, &challenge_401(&auth, &req, false));
        let error = reg.last_error.clone().expect("an error");
        assert!(error.contains("wrong username or password"), "{error}");
        assert!(error.contains("401"), "{error}");
        assert_eq!(reg.state(), &State::Unregistered);
        assert_eq!(reg.poll_timeout(), Some(now + config().fatal_retry));
        assert_eq!(reg.poll(now + Duration::from_secs(299), local()), None);
        // The slow retry starts over, without the refused challenge.
        let later = now + config().fatal_retry;
        let (req, to) = send(&mut reg, later);
        assert_eq!(to, target(1));
        assert!(header(&req, &HeaderName::Authorization).is_none());
    }

    #[test]
    fn a_stale_401_is_answered_again_at_once() {
        let now = Instant::now();
        let auth = Authenticator::new(Duration::from_secs(3600));
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &challenge_401(&auth, &req, false));
        let (req, _) = send(&mut reg, now);
        let stale = auth.challenge(SystemTime::now(), REALM, Algorithm::Md5, true);
        let resp = reply(
            &req,
            401,
            "Unauthorized",
            &[(HeaderName::WwwAuthenticate, &stale.to_string())],
        );
        reg.on_response(now, &resp);
        assert_eq!(reg.last_error, None);
        assert_eq!(reg.poll_timeout(), Some(now));
        let (req, _) = send(&mut reg, now);
        let creds = credentials(&req, &HeaderName::Authorization);
        assert_eq!(creds.nonce, stale.nonce);
        assert_eq!(creds.nc, Some(1), "a new nonce counts from 1");
        assert_eq!(verify(&auth, &creds, PASSWORD), Ok(()));
    }

    #[test]
    fn a_401_without_a_digest_challenge_is_refused() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        let resp = reply(
            &req,
            401,
            "Unauthorized",
            &[(HeaderName::WwwAuthenticate, "Basic realm=\"x\"")],
        );
        reg.on_response(now, &resp);
        assert!(reg.last_error.as_deref().is_some_and(|e| e.contains("401")));
        assert_eq!(reg.poll_timeout(), Some(now + config().fatal_retry));
    }

    #[test]
    fn a_403_for_an_answered_challenge_means_a_wrong_password() {
        let now = Instant::now();
        let auth = Authenticator::new(Duration::from_secs(3600));
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &challenge_401(&auth, &req, false));
        let (req, _) = send(&mut reg, now);
        // What the carrier's registrar answers for a bad response.
        assert_eq!(
            verify(
                &auth,
                &credentials(&req, &HeaderName::Authorization),
                "other"
            )
            .map_err(AuthFailure::rechallenge),
            Err(None)
        );
        reg.on_response(now, &reply(&req, 403, "Forbidden", &[]));
        let error = reg.last_error.clone().unwrap();
        assert!(
            error.contains("403") && error.contains("wrong username or password"),
            "{error}"
        );
        assert_eq!(reg.poll_timeout(), Some(now + config().fatal_retry));
    }

    #[test]
    fn a_403_without_a_challenge_is_retried_slowly() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &reply(&req, 403, "Forbidden", &[]));
        let error = reg.last_error.clone().unwrap();
        assert!(error.contains("403 Forbidden"), "{error}");
        assert!(!error.contains("wrong username"), "{error}");
        assert_eq!(reg.poll_timeout(), Some(now + config().fatal_retry));
        assert_eq!(reg.state(), &State::Unregistered);
    }

    #[test]
    fn other_refusals_are_retried_slowly() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &reply(&req, 404, "Not Found", &[]));
        assert_eq!(reg.last_error.as_deref(), Some("404 Not Found"));
        assert_eq!(reg.poll_timeout(), Some(now + config().fatal_retry));
    }

    #[test]
    fn a_200_registers_until_the_granted_expiry_and_refreshes_ahead() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &ok(&req, 120));
        let until = now + Duration::from_secs(120);
        assert_eq!(reg.state(), &State::Registered { until });
        assert_eq!(reg.last_error, None);
        let refresh = reg.poll_timeout().unwrap();
        assert!(
            refresh <= until - Duration::from_secs(30),
            "at least 30 s ahead: {:?}",
            refresh - now
        );
        assert!(
            refresh >= now + Duration::from_secs(60),
            "not too early: {:?}",
            refresh - now
        );
        assert_eq!(reg.poll(refresh - Duration::from_millis(1), local()), None);
        let (req, _) = send(&mut reg, refresh);
        // The refresh asks for the configured expiry again.
        assert_eq!(asked_expiry(&req), (300, 300));
        assert_eq!(req.cseq().seq, 2);
        reg.on_response(refresh, &ok(&req, 3600));
        let until = refresh + Duration::from_secs(3600);
        assert_eq!(reg.state(), &State::Registered { until });
        let next = reg.poll_timeout().unwrap();
        assert!(
            next > refresh + Duration::from_secs(1800) && next <= until - Duration::from_secs(30)
        );
    }

    #[test]
    fn a_short_expiry_is_refreshed_at_half_time() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &ok(&req, 40));
        assert_eq!(reg.poll_timeout(), Some(now + Duration::from_secs(20)));
    }

    #[test]
    fn a_200_with_only_an_expires_header_grants_that() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &reply(&req, 200, "OK", &[(HeaderName::Expires, "90")]));
        let until = now + Duration::from_secs(90);
        assert_eq!(reg.state(), &State::Registered { until });
        let refresh = reg.poll_timeout().unwrap();
        assert!(refresh > now && refresh <= until - Duration::from_secs(30));
    }

    #[test]
    fn our_contact_without_expires_takes_the_expires_header_and_matches_loosely() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        // Default port left out and the host spelt otherwise: still our Contact.
        let resp = reply(
            &req,
            200,
            "OK",
            &[
                (HeaderName::Contact, "<sip:other@198.51.100.9>;expires=3600"),
                (HeaderName::Contact, "<sip:pbx@203.0.113.5>"),
                (HeaderName::Expires, "150"),
            ],
        );
        reg.on_response(now, &resp);
        assert_eq!(
            reg.state(),
            &State::Registered {
                until: now + Duration::from_secs(150)
            }
        );
    }

    #[test]
    fn a_200_without_our_contact_is_not_a_registration() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        let resp = reply(
            &req,
            200,
            "OK",
            &[
                (
                    HeaderName::Contact,
                    "<sip:pbx@203.0.113.6:5060>;expires=300",
                ),
                (HeaderName::Expires, "300"),
            ],
        );
        reg.on_response(now, &resp);
        assert_eq!(reg.state(), &State::Unregistered);
        assert!(
            reg.last_error
                .as_deref()
                .is_some_and(|e| e.contains("Contact"))
        );
        assert_wait_between(
            &reg,
            now,
            Duration::from_millis(800),
            Duration::from_millis(1200),
        );
        // The same for our Contact with expires=0.
        let at = reg.poll_timeout().unwrap();
        let (req, _) = send(&mut reg, at);
        reg.on_response(at, &ok(&req, 0));
        assert_eq!(reg.state(), &State::Unregistered);
    }

    #[test]
    fn a_423_retries_at_once_with_the_min_expires() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(
            now,
            &reply(
                &req,
                423,
                "Interval Too Brief",
                &[(HeaderName::MinExpires, "600")],
            ),
        );
        assert_eq!(reg.poll_timeout(), Some(now));
        let (req, _) = send(&mut reg, now);
        assert_eq!(asked_expiry(&req), (600, 600));
        reg.on_response(now, &ok(&req, 600));
        // Refreshes keep asking for it.
        let at = reg.poll_timeout().unwrap();
        let (req, _) = send(&mut reg, at);
        assert_eq!(asked_expiry(&req), (600, 600));
    }

    #[test]
    fn a_423_without_a_higher_min_expires_is_refused() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(
            now,
            &reply(
                &req,
                423,
                "Interval Too Brief",
                &[(HeaderName::MinExpires, "60")],
            ),
        );
        assert_eq!(reg.poll_timeout(), Some(now + config().fatal_retry));
        assert!(reg.last_error.is_some());
    }

    #[test]
    fn a_503_retry_after_delays_the_next_attempt() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(
            now,
            &reply(
                &req,
                503,
                "Service Unavailable",
                &[(HeaderName::RetryAfter, "30")],
            ),
        );
        assert_eq!(reg.poll_timeout(), Some(now + Duration::from_secs(30)));
        assert_eq!(reg.last_error.as_deref(), Some("503 Service Unavailable"));
        assert_eq!(reg.poll(now + Duration::from_secs(29), local()), None);
        send(&mut reg, now + Duration::from_secs(30));
        // With parameters too.
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(
            now,
            &reply(
                &req,
                503,
                "Service Unavailable",
                &[(HeaderName::RetryAfter, "45;duration=60")],
            ),
        );
        assert_eq!(reg.poll_timeout(), Some(now + Duration::from_secs(45)));
    }

    #[test]
    fn a_short_retry_after_does_not_undercut_the_backoff() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let mut at = now;
        for _ in 0..4 {
            let (req, _) = send(&mut reg, at);
            reg.on_response(at, &reply(&req, 500, "Server Error", &[]));
            at = reg.poll_timeout().unwrap();
        }
        // The backoff is now 8 s (±20 %); a Retry-After of 1 s does not shorten it.
        let (req, _) = send(&mut reg, at);
        reg.on_response(
            at,
            &reply(&req, 503, "Busy", &[(HeaderName::RetryAfter, "1")]),
        );
        assert_wait_between(
            &reg,
            at,
            Duration::from_millis(6400),
            Duration::from_millis(9600),
        );
    }

    #[test]
    fn server_errors_back_off_doubling_with_jitter_up_to_retry_max_and_success_resets() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let mut at = now;
        // retry_min 1 s, retry_max 8 s.
        for base in [1000u64, 2000, 4000, 8000, 8000, 8000] {
            let (req, to) = send(&mut reg, at);
            assert_eq!(to, target(1));
            reg.on_response(at, &reply(&req, 500, "Server Internal Error", &[]));
            assert_eq!(reg.last_error.as_deref(), Some("500 Server Internal Error"));
            assert_eq!(reg.state(), &State::Unregistered);
            let base = Duration::from_millis(base);
            assert_wait_between(&reg, at, base.mul_f64(0.8), base.mul_f64(1.2));
            at = reg.poll_timeout().unwrap();
        }
        let (req, _) = send(&mut reg, at);
        reg.on_response(at, &ok(&req, 300));
        assert_eq!(reg.last_error, None);
        let at = reg.poll_timeout().unwrap();
        let (req, _) = send(&mut reg, at);
        reg.on_response(at, &reply(&req, 500, "Server Internal Error", &[]));
        assert_wait_between(
            &reg,
            at,
            Duration::from_millis(800),
            Duration::from_millis(1200),
        );
        // Still registered while the old binding lasts.
        assert!(matches!(reg.state(), State::Registered { .. }));
    }

    #[test]
    fn the_jitter_varies() {
        let now = Instant::now();
        let waits: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                let mut reg = resolved(now, vec![target(1)]);
                let (req, _) = send(&mut reg, now);
                reg.on_response(now, &reply(&req, 500, "Server Internal Error", &[]));
                reg.poll_timeout().unwrap() - now
            })
            .collect();
        assert!(waits.len() > 1, "{waits:?}");
    }

    #[test]
    fn a_timeout_moves_to_the_next_target_and_past_the_last_resolves_again() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1), target(2)]);
        let (_, to) = send(&mut reg, now);
        assert_eq!(to, target(1));
        reg.on_failure(now, "timeout");
        let error = reg.last_error.clone().unwrap();
        assert!(
            error.contains("timeout") && error.contains("198.51.100.1"),
            "{error}"
        );
        assert_wait_between(
            &reg,
            now,
            Duration::from_millis(800),
            Duration::from_millis(1200),
        );
        let at = reg.poll_timeout().unwrap();
        let (req, to) = send(&mut reg, at);
        assert_eq!(to, target(2));
        assert_eq!(req.cseq().seq, 2);
        reg.on_failure(at, "transport error");
        assert_wait_between(
            &reg,
            at,
            Duration::from_millis(1600),
            Duration::from_millis(2400),
        );
        let at = reg.poll_timeout().unwrap();
        assert_eq!(reg.poll(at, local()), Some(Action::Resolve));
        reg.on_resolved(at, Ok(vec![target(3), target(1)]));
        let (_, to) = send(&mut reg, at);
        assert_eq!(to, target(3));
    }

    #[test]
    fn a_failure_report_without_a_request_in_flight_is_ignored() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1), target(2)]);
        reg.on_failure(now, "timeout");
        reg.on_response(now, &Message::parse(Bytes::from_static(b"SIP/2.0 500 X\r\nVia: SIP/2.0/UDP 192.0.2.50:5070;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n")).unwrap());
        assert_eq!(reg.last_error, None);
        let (_, to) = send(&mut reg, now);
        assert_eq!(to, target(1));
    }

    #[test]
    fn a_dns_failure_backs_off_and_resolves_again() {
        let now = Instant::now();
        let mut reg = Registration::new(server(), config(), now);
        assert_eq!(reg.poll(now, local()), Some(Action::Resolve));
        reg.on_resolved(now, Err("NXDOMAIN".into()));
        assert_eq!(reg.last_error.as_deref(), Some("DNS: NXDOMAIN"));
        assert_wait_between(
            &reg,
            now,
            Duration::from_millis(800),
            Duration::from_millis(1200),
        );
        let at = reg.poll_timeout().unwrap();
        assert_eq!(reg.poll(at, local()), Some(Action::Resolve));
        reg.on_resolved(at, Ok(vec![]));
        assert_eq!(reg.last_error.as_deref(), Some("DNS: no target"));
        assert_wait_between(
            &reg,
            at,
            Duration::from_millis(1600),
            Duration::from_millis(2400),
        );
    }

    #[test]
    fn the_binding_lapses_when_refreshes_fail() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &ok(&req, 120));
        let at = reg.poll_timeout().unwrap();
        let (req, _) = send(&mut reg, at);
        reg.on_response(
            at,
            &reply(&req, 503, "Busy", &[(HeaderName::RetryAfter, "60")]),
        );
        let retry = reg.poll_timeout().unwrap();
        assert!(retry > now + Duration::from_secs(120));
        send(&mut reg, retry);
        assert_eq!(reg.state(), &State::Unregistered);
    }

    #[test]
    fn withdrawing_while_registered_sends_expires_zero_then_stays_idle() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (first, _) = send(&mut reg, now);
        reg.on_response(now, &ok(&first, 300));
        let t = now + Duration::from_secs(10);
        reg.set_wanted(t, false);
        assert_eq!(reg.state(), &State::Withdrawn);
        assert_eq!(reg.poll_timeout(), Some(t), "withdrawn at once");
        let (req, to) = send(&mut reg, t);
        assert_eq!(to, target(1));
        assert_eq!(asked_expiry(&req), (0, 0));
        assert_eq!(req.call_id(), first.call_id());
        assert_eq!(req.cseq().seq, 2);
        // The registrar answers with the bindings left: none.
        reg.on_response(t, &reply(&req, 200, "OK", &[]));
        assert_eq!(reg.state(), &State::Withdrawn);
        assert_eq!(reg.poll_timeout(), None);
        assert_eq!(reg.poll(t + Duration::from_secs(3600), local()), None);
        assert_eq!(reg.last_error, None);
        // The PBX is back: the normal expiry again.
        let back = t + Duration::from_secs(60);
        reg.set_wanted(back, true);
        assert_eq!(reg.poll_timeout(), Some(back));
        let (req, _) = send(&mut reg, back);
        assert_eq!(asked_expiry(&req), (300, 300));
        assert_eq!(req.cseq().seq, 3);
        reg.on_response(back, &ok(&req, 300));
        assert_eq!(
            reg.state(),
            &State::Registered {
                until: back + Duration::from_secs(300)
            }
        );
    }

    #[test]
    fn set_wanted_with_the_same_value_changes_nothing() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &ok(&req, 300));
        let refresh = reg.poll_timeout();
        reg.set_wanted(now + Duration::from_secs(1), true);
        assert_eq!(reg.poll_timeout(), refresh);
        assert!(matches!(reg.state(), State::Registered { .. }));
    }

    #[test]
    fn a_withdrawal_asked_for_during_a_register_follows_its_200() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.set_wanted(now, false);
        assert_eq!(
            reg.poll(now, local()),
            None,
            "the REGISTER in flight finishes first"
        );
        assert_eq!(reg.poll_timeout(), None);
        reg.on_response(now, &ok(&req, 300));
        assert_eq!(reg.poll_timeout(), Some(now));
        let (req, _) = send(&mut reg, now);
        assert_eq!(asked_expiry(&req), (0, 0));
        reg.on_response(now, &reply(&req, 200, "OK", &[]));
        assert_eq!(reg.state(), &State::Withdrawn);
        assert_eq!(reg.poll_timeout(), None);
    }

    #[test]
    fn a_withdrawal_asked_for_while_resolving_is_sent_once_resolved() {
        let now = Instant::now();
        let mut reg = Registration::new(server(), config(), now);
        assert_eq!(reg.poll(now, local()), Some(Action::Resolve));
        reg.set_wanted(now, false);
        assert_eq!(reg.poll_timeout(), None);
        reg.on_resolved(now, Ok(vec![target(1)]));
        let (req, _) = send(&mut reg, now);
        assert_eq!(asked_expiry(&req), (0, 0));
    }

    #[test]
    fn a_challenged_withdrawal_is_answered() {
        let now = Instant::now();
        let auth = Authenticator::new(Duration::from_secs(3600));
        let mut reg = registered(now, &auth);
        reg.set_wanted(now, false);
        let (req, _) = send(&mut reg, now);
        assert_eq!(asked_expiry(&req), (0, 0));
        reg.on_response(now, &challenge_401(&auth, &req, false));
        let (req, _) = send(&mut reg, now);
        assert_eq!(asked_expiry(&req), (0, 0));
        let creds = credentials(&req, &HeaderName::Authorization);
        assert_eq!(verify(&auth, &creds, PASSWORD), Ok(()));
        reg.on_response(now, &reply(&req, 200, "OK", &[]));
        assert_eq!(reg.state(), &State::Withdrawn);
        assert_eq!(reg.poll_timeout(), None);
    }

    #[test]
    fn a_failed_withdrawal_is_tried_again_until_the_pbx_is_back() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1), target(2)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &ok(&req, 300));
        reg.set_wanted(now, false);
        send(&mut reg, now);
        reg.on_failure(now, "timeout");
        assert_eq!(reg.state(), &State::Withdrawn);
        // Tried again after the backoff, at the next target, still as a withdrawal.
        let again = reg.poll_timeout().expect("the withdrawal is tried again");
        assert!(again > now);
        let (req, to) = send(&mut reg, again);
        assert_eq!(to, target(2));
        assert_eq!(asked_expiry(&req), (0, 0));
        reg.on_failure(again, "timeout");
        assert!(
            reg.last_error
                .as_deref()
                .is_some_and(|e| e.contains("timeout"))
        );
        let back = now + Duration::from_secs(5);
        reg.set_wanted(back, true);
        // Past the last target: DNS again, then the first target.
        assert_eq!(reg.poll(back, local()), Some(Action::Resolve));
        reg.on_resolved(back, Ok(vec![target(1), target(2)]));
        let (req, to) = send(&mut reg, back);
        assert_eq!(to, target(1));
        assert_eq!(asked_expiry(&req), (300, 300));
        // A failure now brings the withdrawn state back to unregistered.
        reg.on_response(back, &reply(&req, 500, "Server Internal Error", &[]));
        assert_eq!(reg.state(), &State::Unregistered);
    }

    #[test]
    fn the_pbx_back_during_a_withdrawal_registers_again_after_it() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(now, &ok(&req, 300));
        reg.set_wanted(now, false);
        let (req, _) = send(&mut reg, now);
        assert_eq!(asked_expiry(&req), (0, 0));
        reg.set_wanted(now, true);
        assert_eq!(reg.poll(now, local()), None);
        reg.on_response(now, &reply(&req, 200, "OK", &[]));
        assert_eq!(reg.poll_timeout(), Some(now));
        let (req, _) = send(&mut reg, now);
        assert_eq!(asked_expiry(&req), (300, 300));
    }

    // --- found by these tests, fixed ---

    #[test]
    fn a_refresh_challenged_with_a_new_nonce_is_answered() {
        let now = Instant::now();
        let before = Authenticator::new(Duration::from_secs(3600));
        let mut reg = registered(now, &before);
        let at = reg.poll_timeout().unwrap();
        let (req, _) = send(&mut reg, at);
        // The carrier restarted: its new secret does not know the nonce reused.
        let after = Authenticator::new(Duration::from_secs(3600));
        let failure = verify(
            &after,
            &credentials(&req, &HeaderName::Authorization),
            PASSWORD,
        )
        .unwrap_err();
        assert_eq!(failure, AuthFailure::UnknownNonce);
        assert_eq!(
            failure.rechallenge(),
            Some(false),
            "the registrar sends a 401, not stale"
        );
        reg.on_response(at, &challenge_401(&after, &req, false));
        assert_eq!(
            reg.poll_timeout(),
            Some(at),
            "the new nonce is answered at once"
        );
        let (req, _) = send(&mut reg, at);
        let creds = credentials(&req, &HeaderName::Authorization);
        assert_eq!(verify(&after, &creds, PASSWORD), Ok(()));
    }

    #[test]
    fn a_503_moves_to_the_next_target() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1), target(2)]);
        let (req, to) = send(&mut reg, now);
        assert_eq!(to, target(1));
        reg.on_response(now, &reply(&req, 503, "Service Unavailable", &[]));
        let at = reg.poll_timeout().unwrap();
        let (_, to) = send(&mut reg, at);
        assert_eq!(to, target(2));
    }

    #[test]
    fn an_unanswerable_challenge_is_a_refusal_not_a_tight_loop() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let challenge = "Digest realm=\"lifeline\", nonce=\"abc\", qop=\"auth-int\"";
        let (req, _) = send(&mut reg, now);
        reg.on_response(
            now,
            &reply(
                &req,
                401,
                "Unauthorized",
                &[(HeaderName::WwwAuthenticate, challenge)],
            ),
        );
        assert!(
            reg.last_error
                .as_deref()
                .is_some_and(|e| e.contains("cannot answer")),
            "{:?}",
            reg.last_error
        );
        assert_eq!(reg.poll_timeout(), Some(now + Duration::from_secs(300)));
    }

    #[test]
    fn retry_after_with_a_comment_is_honoured() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.on_response(
            now,
            &reply(
                &req,
                503,
                "Service Unavailable",
                &[(HeaderName::RetryAfter, "120 (I'm in a meeting)")],
            ),
        );
        assert_eq!(reg.poll_timeout(), Some(now + Duration::from_secs(120)));
    }

    #[test]
    fn state_is_withdrawn_while_a_withdrawal_follows_an_in_flight_register() {
        let now = Instant::now();
        let mut reg = resolved(now, vec![target(1)]);
        let (req, _) = send(&mut reg, now);
        reg.set_wanted(now, false);
        reg.on_response(now, &ok(&req, 300));
        assert_eq!(reg.state(), &State::Withdrawn);
    }
}
