//! The agent's SIP loop: one UDP socket, one transaction table, a registration per trunk
//! server and the PBX's health check, all driven from one task. When the PBX goes down every
//! registration is withdrawn at once; when it comes back they register again. What the loop
//! knows is published as an [`AgentStatus`] for `lifeline-agent status` and health reports.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::config::Settings;
use super::health::{HealthConfig, PbxHealth, PbxState};
use super::registration::{Action, Registration, RegistrationConfig, State};
use crate::sip::resolve::{Lookup, SipResolver};
use crate::sip::transaction::{ClientEvent, ClientId, Event, TimerConfig, Transactions};
use crate::sip::transport::{Flow, Inbox, Incoming, SipTransport, Transport, TransportOptions};

/// One trunk server's registration, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerStatus {
    /// The server as configured.
    pub server: String,
    pub registered: bool,
    /// Seconds until the binding expires, while registered.
    pub expires_in: Option<u32>,
    /// Withdrawn because the PBX is down.
    pub withdrawn: bool,
    pub last_error: Option<String>,
}

/// What the running agent knows.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct AgentStatus {
    pub pbx: PbxState,
    /// Unix milliseconds of the PBX's last answer to a health check.
    pub pbx_last_answer_ms: Option<i64>,
    pub servers: Vec<ServerStatus>,
}

/// Whose client transaction it is.
#[derive(Debug, Clone, Copy)]
enum Owner {
    Registration(usize),
    Health(u64),
}

/// A DNS answer for registration `.0`.
type Resolved = (usize, Result<Vec<crate::sip::resolve::Target>, String>);

/// The running SIP side of the agent.
pub struct SipAgent {
    transport: SipTransport,
    local: std::net::SocketAddr,
    transactions: Transactions<Flow>,
    registrations: Vec<Registration>,
    health: PbxHealth,
    /// Where the health checks go.
    pbx: std::net::SocketAddr,
    /// Whether the registrations are wanted (the PBX is not down).
    wanted: bool,
    owners: HashMap<ClientId, Owner>,
    resolver: Arc<SipResolver>,
    resolved: (
        mpsc::UnboundedSender<Resolved>,
        mpsc::UnboundedReceiver<Resolved>,
    ),
    status: watch::Sender<AgentStatus>,
    /// Instant ↔ wall clock, for the status.
    epoch: (Instant, SystemTime),
}

/// A started agent: its status, and how to stop it.
pub struct RunningAgent {
    pub status: watch::Receiver<AgentStatus>,
    pub local: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    /// Stops the loop. Bindings are left in place (they expire on their own): restarting or
    /// upgrading the agent must not cause a failover.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Binds the agent's socket and starts the loop, which publishes its state on `status`. `pbx`
/// is what is known of the PBX already (a restarted loop keeps a down PBX withdrawn).
pub async fn start(
    settings: &Settings,
    status: watch::Sender<AgentStatus>,
    pbx: PbxState,
) -> std::io::Result<RunningAgent> {
    let (transport, incoming) =
        SipTransport::bind(&[settings.listen], None, TransportOptions::default()).await?;
    let local = transport.bound()[0].addr;
    info!(%local, "agent SIP socket bound");
    let now = Instant::now();
    let registration = RegistrationConfig {
        username: settings.raw.username.clone(),
        password: settings.raw.password.clone(),
        contact: settings.contact.clone(),
        expires: settings.raw.register_expires_s,
        retry_min: settings.retry_min(),
        retry_max: settings.retry_max(),
        fatal_retry: settings.fatal_retry(),
    };
    let registrations: Vec<Registration> = settings
        .servers
        .iter()
        .map(|s| Registration::new(s.clone(), registration.clone(), now))
        .collect();
    let mut health = PbxHealth::new(
        HealthConfig {
            address: settings.pbx_address,
            interval: settings.check_interval(),
            timeout: settings.check_timeout(),
            down_after: settings.raw.pbx.down_after,
            up_after: settings.raw.pbx.up_after,
        },
        now,
    );
    health.assume(pbx);
    let mut registrations = registrations;
    if pbx == PbxState::Down {
        for r in &mut registrations {
            r.set_wanted(now, false);
        }
    }
    let resolver = if settings.dns_servers.is_empty() {
        // Without /etc/resolv.conf only IP addresses are reachable, as configured.
        SipResolver::from_system().or_else(|_| SipResolver::with_nameservers(&[]))
    } else {
        SipResolver::with_nameservers(&settings.dns_servers)
    }
    .map_err(|e| std::io::Error::other(format!("DNS resolver: {e}")))?;
    let timers = TimerConfig {
        t1: Duration::from_millis(settings.raw.t1_ms),
        ..TimerConfig::default()
    };
    let status_rx = status.subscribe();
    let agent = SipAgent {
        transport,
        local,
        transactions: Transactions::new(timers),
        registrations,
        health,
        pbx: settings.pbx_address,
        wanted: pbx != PbxState::Down,
        owners: HashMap::new(),
        resolver: Arc::new(resolver),
        resolved: mpsc::unbounded_channel(),
        status,
        epoch: (now, SystemTime::now()),
    };
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(agent.run(incoming, stopped));
    Ok(RunningAgent {
        status: status_rx,
        local,
        stop,
        task,
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl SipAgent {
    async fn run(mut self, mut incoming: Inbox, mut stop: oneshot::Receiver<()>) {
        self.tick(Instant::now());
        loop {
            let tx_deadline = self.transactions.poll_timeout();
            let deadline = self
                .registrations
                .iter()
                .filter_map(Registration::poll_timeout)
                .chain(std::iter::once(self.health.poll_timeout()))
                .min();
            tokio::select! {
                _ = &mut stop => break,
                received = incoming.recv() => match received {
                    Some(Incoming::Message(r)) => match r.message {
                        Ok(msg) if !msg.is_request() => {
                            let now = Instant::now();
                            if let Ok((id, Some(event))) = self.transactions.handle_response(now, msg) {
                                self.on_client_event(now, id, event);
                            }
                        }
                        // The agent serves no requests; its socket is only for answers.
                        Ok(msg) => debug!(method = %msg.method().as_str(), from = %r.flow.remote, "request to the agent ignored"),
                        Err(e) => debug!(error = %e, from = %r.flow.remote, "unparsable message ignored"),
                    },
                    Some(Incoming::Unreachable(flow)) => {
                        self.transactions.handle_unreachable(Instant::now(), &flow);
                    }
                    None => break,
                },
                _ = sleep_until(tx_deadline) => self.transactions.handle_timeout(Instant::now()),
                _ = sleep_until(deadline) => {}
                Some((i, result)) = self.resolved.1.recv() => {
                    self.registrations[i].on_resolved(Instant::now(), result);
                }
            }
            self.tick(Instant::now());
        }
        self.transport.shutdown();
    }

    /// Runs what is due, sends what the transactions want sent, and publishes the status.
    fn tick(&mut self, now: Instant) {
        for _ in 0..16 {
            while let Some(event) = self.transactions.poll_event() {
                if let Event::Client(id, ev) = event {
                    self.on_client_event(now, id, ev);
                }
            }
            if let Some((check, request)) = self.health.poll(now, self.local) {
                let dest = self.flow(Transport::Udp, self.pbx);
                match self.transactions.new_client(now, request, dest, false) {
                    Ok(id) => {
                        self.owners.insert(id, Owner::Health(check));
                    }
                    Err(e) => warn!(error = %e, "health check not sent"),
                }
            }
            // The state moves here (a check ran out of time) or on an answer.
            let wanted = self.health.state() != PbxState::Down;
            if wanted != self.wanted {
                self.wanted = wanted;
                for r in &mut self.registrations {
                    r.set_wanted(now, wanted);
                }
            }
            for i in 0..self.registrations.len() {
                match self.registrations[i].poll(now, self.local) {
                    None => {}
                    Some(Action::Resolve) => self.resolve(i),
                    Some(Action::Send(request, target)) => {
                        debug!(server = %self.registrations[i].server.uri, server_target = %target, "sending REGISTER");
                        let dest = self.flow(target.transport, target.addr);
                        let reliable = target.transport.is_stream();
                        match self.transactions.new_client(now, *request, dest, reliable) {
                            Ok(id) => {
                                self.owners.insert(id, Owner::Registration(i));
                            }
                            Err(e) => self.registrations[i].on_failure(now, &e.to_string()),
                        }
                    }
                }
            }
            let mut failed = Vec::new();
            while let Some((flow, bytes)) = self.transactions.poll_transmit() {
                if !self.send(flow, bytes) {
                    failed.push(flow);
                }
            }
            if failed.is_empty() {
                break;
            }
            for flow in failed {
                self.transactions.handle_unreachable(now, &flow);
            }
        }
        self.owners
            .retain(|id, _| self.transactions.client(*id).is_some());
        self.publish(now);
    }

    fn on_client_event(&mut self, now: Instant, id: ClientId, event: ClientEvent) {
        let Some(owner) = self.owners.get(&id).copied() else {
            return;
        };
        match (owner, &event) {
            (_, ClientEvent::Provisional(_)) => return,
            (Owner::Health(check), ClientEvent::Final(_) | ClientEvent::Additional2xx(_)) => {
                self.health.on_answer(now, check)
            }
            (Owner::Health(check), ClientEvent::Timeout) => {
                self.health.on_failure(check, "timeout")
            }
            (Owner::Health(check), ClientEvent::TransportError) => {
                self.health.on_failure(check, "transport error")
            }
            (Owner::Registration(i), ClientEvent::Final(m) | ClientEvent::Additional2xx(m)) => {
                self.registrations[i].on_response(now, m)
            }
            (Owner::Registration(i), ClientEvent::Timeout) => {
                self.registrations[i].on_failure(now, "timeout")
            }
            (Owner::Registration(i), ClientEvent::TransportError) => {
                self.registrations[i].on_failure(now, "transport error")
            }
        }
        self.owners.remove(&id);
    }

    fn flow(&self, transport: Transport, remote: std::net::SocketAddr) -> Flow {
        Flow {
            transport,
            local: self.local,
            remote,
            conn: None,
        }
    }

    fn send(&self, flow: Flow, bytes: Bytes) -> bool {
        match self.transport.send_nowait(flow, bytes) {
            Ok(()) => true,
            Err(e) => {
                debug!(remote = %flow.remote, error = %e, "send failed");
                false
            }
        }
    }

    /// Looks up trunk server `i` in a task of its own; the answer comes back to the loop.
    fn resolve(&self, i: usize) {
        let server = self.registrations[i].server.clone();
        let resolver = self.resolver.clone();
        let done = self.resolved.0.clone();
        tokio::spawn(async move {
            let lookup = Lookup {
                host: &server.host,
                port: server.port,
                // UDP: over a connection of the agent's, the carrier would send the PBX's
                // calls down that connection instead of to pbx.contact.
                transport: Some(server.transport.unwrap_or(Transport::Udp)),
                secure: server.sips,
            };
            let result = resolver.resolve(&lookup).await.map_err(|e| e.to_string());
            let _ = done.send((i, result));
        });
    }

    fn publish(&self, now: Instant) {
        let to_unix_ms = |at: Instant| -> i64 {
            let wall = if at >= self.epoch.0 {
                self.epoch.1 + (at - self.epoch.0)
            } else {
                self.epoch.1 - (self.epoch.0 - at)
            };
            crate::carrier::registrar::unix_ms(wall)
        };
        let status = AgentStatus {
            pbx: self.health.state(),
            pbx_last_answer_ms: self.health.last_answer.map(to_unix_ms),
            servers: self
                .registrations
                .iter()
                .map(|r| {
                    let (registered, expires_in) = match r.state() {
                        State::Registered { until } if *until > now => {
                            (true, Some((*until - now).as_secs() as u32))
                        }
                        _ => (false, None),
                    };
                    ServerStatus {
                        server: r.server.uri.clone(),
                        registered,
                        expires_in,
                        withdrawn: *r.state() == State::Withdrawn,
                        last_error: r.last_error.clone(),
                    }
                })
                .collect(),
        };
        // Expiry seconds tick down: publish only what a reader would see as a change.
        self.status.send_if_modified(|old| {
            let changed = old.pbx != status.pbx
                || old.servers.len() != status.servers.len()
                || old.servers.iter().zip(&status.servers).any(|(a, b)| {
                    a.registered != b.registered
                        || a.withdrawn != b.withdrawn
                        || a.last_error != b.last_error
                        || a.expires_in
                            .is_some_and(|x| b.expires_in.is_some_and(|y| y > x))
                });
            if changed {
                *old = status.clone();
            }
            changed
        });
    }
}
