//! The carrier's SIP service: receives from the transports, runs server transactions, and
//! answers what the SIP core answers itself (RFC 3261 §8.2 and §16.3 checks, OPTIONS to the
//! server), hands REGISTER to the registrar, and hands requests for a user part (a DID) and
//! in-dialog requests routed through this server to the delivery proxy ([`super::proxy`]).
//!
//! One task owns the transaction table (a pure state machine): it is fed received messages and
//! timeouts, and what it wants sent is handed to the transports.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::IpAddr;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::api::Reloadable;
use super::bindings::BindingStore;
use super::call_log::CallLog;
use super::config::{CarrierConfig, Settings};
use super::customers::{Customers, StoreHealth, watch_customers};
use super::metrics::CarrierMetrics;
use super::probe::Prober;
use super::proxy::{NewCall, Proxy, ResolveRequest, routed_through_us};
use super::registrar::{Contact, Registrar, unix_ms};
use super::store::{Store, StoreError, TrunkGroupId};
use crate::sip::digest::Authenticator;
use crate::sip::digest::HmacKey;
use crate::sip::message::{Header, HeaderName, Message, Method, ParseError};
use crate::sip::resolve::{Lookup, SipResolver};
use crate::sip::transaction::{Event, RequestDisposition, ServerEvent, ServerId, Transactions};
use crate::sip::transport::{
    Flow, Inbox, Incoming, ListenSpec, Received, ReloadableCert, SipTransport, Transport, log_bound,
};
use crate::sip::uri::Uri;

/// Methods this element handles or passes on, for Allow.
pub const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER, PRACK, UPDATE, INFO";

/// What the Server header says.
pub const SERVER: &str = concat!("Lifeline/", env!("CARGO_PKG_VERSION"));

/// A running carrier; dropping it does not stop it, [`RunningCarrier::stop`] does.
pub struct RunningCarrier {
    bound: Vec<ListenSpec>,
    /// Where the API listens, if it is on.
    api: Option<std::net::SocketAddr>,
    api_task: Option<JoinHandle<()>>,
    /// Where metrics are served (with its real port), if they are.
    metrics: Option<std::net::SocketAddr>,
    metrics_task: Option<JoinHandle<()>>,
    heartbeat: JoinHandle<()>,
    transport: SipTransport,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// The settings in force, and what a reload replaces in the running parts.
    settings: Settings,
    reloads: mpsc::UnboundedSender<Settings>,
    sip_cert: Option<Arc<ReloadableCert>>,
    api_reload: Option<ApiReload>,
}

/// What a reload replaces in the running API.
struct ApiReload {
    cert: Option<Arc<ReloadableCert>>,
    failover_prefixes: Reloadable<Vec<String>>,
    trunk_servers: Reloadable<Vec<String>>,
}

impl RunningCarrier {
    /// The addresses bound, with real ports.
    pub fn bound(&self) -> &[ListenSpec] {
        &self.bound
    }

    /// Where the API listens (with its real port), if it is on.
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api
    }

    /// Where metrics are served (with its real port), if they are.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics
    }

    /// Puts a new configuration in force without dropping calls or bindings: peers,
    /// upstream, timers, the delivery rule's settings, probing, registrar limits, the API's
    /// failover prefixes, and the TLS certificates (read again from their files even when
    /// the paths are unchanged). Calls in progress finish under the settings they started with.
    ///
    /// Keys that need a restart keep their running values; their names are returned. A
    /// certificate that cannot be loaded refuses the whole reload (nothing changes).
    pub fn reload(
        &mut self,
        fresh: Settings,
        path: &std::path::Path,
    ) -> Result<Vec<&'static str>, String> {
        let old = &self.settings;
        // Merge first, then check: every derived setting and cross-key check (this server
        // among its peers, say) must see the running name, listeners and realm.
        let mut raw = fresh.raw;
        let mut pending = keep_restart_only(&mut raw, &old.raw);
        // A listener's TLS is set at start; its certificate can be replaced.
        if self.sip_cert.is_some() != raw.tls_certificate.is_some()
            || raw.tls_certificate.is_some() != raw.tls_private_key.is_some()
        {
            raw.tls_certificate = old.raw.tls_certificate.clone();
            raw.tls_private_key = old.raw.tls_private_key.clone();
            pending.push("tls_certificate");
        }
        let api_cert = self.api_reload.as_ref().and_then(|a| a.cert.as_ref());
        if api_cert.is_some() != raw.api_tls_certificate.is_some() {
            raw.api_tls_certificate = old.raw.api_tls_certificate.clone();
            raw.api_tls_private_key = old.raw.api_tls_private_key.clone();
            pending.push("api_tls_certificate");
        }
        let applied = raw.check(path).map_err(|e| e.to_string())?;
        // Both certificates are read before either is put in use.
        let mut certs = Vec::new();
        if let (Some(cert), Some(c), Some(k)) = (
            &self.sip_cert,
            &applied.raw.tls_certificate,
            &applied.raw.tls_private_key,
        ) {
            certs.push((cert, cert.read(c, k)?));
        }
        if let (Some(cert), Some((c, k))) =
            (api_cert, applied.api.as_ref().and_then(|a| a.tls.as_ref()))
        {
            certs.push((cert, cert.read(c, k).map_err(|e| format!("api_{e}"))?));
        }
        self.reloads
            .send(applied.clone())
            .map_err(|_| "the SIP service has stopped".to_string())?;
        for (cert, fresh) in certs {
            cert.replace(fresh);
        }
        if let Some(api) = &self.api_reload {
            api.failover_prefixes
                .set(applied.raw.failover_number_prefixes.clone());
            api.trunk_servers.set(trunk_servers(&applied));
        }
        self.settings = applied;
        Ok(pending)
    }

    /// Stops receiving, ends the service (writing pending bindings) and closes every
    /// connection; the listen addresses are free again once this returns and the last send in
    /// flight has finished.
    pub async fn stop(self) {
        for task in [&self.api_task, &self.metrics_task].into_iter().flatten() {
            task.abort();
        }
        self.heartbeat.abort();
        self.transport.shutdown();
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state folder could not be created.
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: io::Error,
    },
    /// TLS certificate or key unusable.
    #[error("{0}")]
    Tls(String),
    /// A listen address could not be bound.
    #[error("{0}")]
    Bind(io::Error),
    /// The customer configuration store could not be opened or read.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// This server's call records file could not be opened.
    #[error("{0}")]
    CallLog(#[from] super::call_log::CallLogError),
    /// This server's bindings file could not be opened.
    #[error("{0}")]
    Bindings(#[from] super::bindings::BindingStoreError),
}

/// Creates the state folder, binds the listeners and starts the service.
pub async fn start(settings: Settings) -> Result<RunningCarrier, StartError> {
    let dir = &settings.raw.data_dir;
    fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let sip_cert = match (&settings.raw.tls_certificate, &settings.raw.tls_private_key) {
        (Some(c), Some(k)) => Some(ReloadableCert::load(c, k).map_err(StartError::Tls)?),
        _ => None,
    };
    let tls = match &sip_cert {
        Some(cert) => Some(cert.server_config().map_err(StartError::Tls)?),
        None => None,
    };
    let dialog_key =
        load_or_create_key(&dir.join(DIALOG_KEY_FILE)).map_err(|source| StartError::DataDir {
            path: dir.join(DIALOG_KEY_FILE),
            source,
        })?;
    let store = Store::connect(&settings.store_location()).await?;
    info!(store = %store.location(), "configuration store open");
    let store_for_api = store.clone();
    let (customers, store_health) =
        watch_customers(store, Duration::from_millis(settings.raw.config_poll_ms)).await?;
    let (bindings, loaded) = BindingStore::open(
        dir,
        Duration::from_millis(settings.raw.bindings_flush_ms),
        unix_ms(SystemTime::now()),
    )
    .await?;
    info!(bindings = loaded.len(), "bindings loaded");
    let call_log = CallLog::open(
        dir,
        Duration::from_secs(u64::from(settings.raw.call_record_days) * 86_400),
    )
    .await?;
    let auth = Authenticator::new(Duration::from_secs(settings.raw.nonce_lifetime_s));
    let registrar = Registrar::new(settings.registrar.clone(), auth, bindings, loaded);
    let now_ms = unix_ms(SystemTime::now());
    let presence = presence_writer(
        store_for_api.clone(),
        settings.raw.name.clone(),
        registrar.presence(now_ms),
    );
    let (transport, incoming) =
        SipTransport::bind(&settings.listen, tls, settings.transport.clone())
            .await
            .map_err(StartError::Bind)?;
    let bound = transport.bound().to_vec();
    log_bound(&bound);
    let heartbeat = tokio::spawn(heartbeat(store_for_api.clone(), settings.raw.name.clone()));
    let server_view = super::api::ServerView {
        customers: customers.clone(),
        store_health: store_health.clone(),
    };
    let (api, api_task, api_reload) =
        match start_api(&settings, store_for_api, server_view, call_log.clone()).await {
            Ok(Some((addr, task, reload))) => (Some(addr), Some(task), Some(reload)),
            Ok(None) => (None, None, None),
            Err(e) => {
                transport.shutdown();
                return Err(e);
            }
        };
    let (metrics, metrics_task) = match settings.metrics {
        None => (None, None),
        Some(addr) => match crate::metrics::serve(addr).await {
            Ok((addr, task)) => (Some(addr), Some(task)),
            Err(e) => {
                transport.shutdown();
                if let Some(api) = api_task {
                    api.abort();
                }
                return Err(StartError::Bind(e));
            }
        },
    };
    info!(name = %settings.raw.name, data_dir = %dir.display(), "carrier started");
    let shutdown_handle = transport.clone();
    let service = Service {
        transport,
        transactions: {
            let mut t = Transactions::new(settings.timers.clone());
            t.report_ended();
            t
        },
        registrar,
        customers,
        proxy: Proxy::new(
            settings.proxy.clone(),
            HmacKey::new(&dialog_key),
            bound.clone(),
        ),
        prober: Prober::new(settings.probe),
        presence,
        call_log,
        metrics: metrics
            .is_some()
            .then(|| CarrierMetrics::new(&settings.raw.name)),
        store_health,
        resolver: dns_resolver(&settings.proxy.dns_servers),
        resolved: mpsc::unbounded_channel(),
    };
    let (stop, stopped) = oneshot::channel();
    let (reloads, reloaded) = mpsc::unbounded_channel();
    let task = tokio::spawn(service.run(incoming, reloaded, stopped));
    Ok(RunningCarrier {
        bound,
        api,
        api_task,
        metrics,
        metrics_task,
        heartbeat,
        transport: shutdown_handle,
        stop,
        task,
        settings,
        reloads,
        sip_cert,
        api_reload,
    })
}

/// The task that writes this server's presence rows (which trunk groups hold live bindings
/// here) to the store, off the SIP service loop. It starts by replacing the server's rows with
/// `initial`; a failed write is kept and retried every [`PRESENCE_RETRY`] (newer counts
/// replace older ones), so the rows catch up when the store is back.
fn presence_writer(
    store: Store,
    server: String,
    initial: Vec<(TrunkGroupId, usize)>,
) -> mpsc::UnboundedSender<Vec<(TrunkGroupId, usize)>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<(TrunkGroupId, usize)>>();
    tokio::spawn(async move {
        let mut reset = Some(initial);
        let mut pending: BTreeMap<TrunkGroupId, usize> = BTreeMap::new();
        let mut failing = false;
        loop {
            if let Some(groups) = &reset {
                let now_ms = unix_ms(SystemTime::now());
                match store.reset_presence(&server, groups, now_ms).await {
                    Ok(()) => reset = None,
                    Err(e) => failing = log_presence_failure(failing, &e),
                }
            }
            while reset.is_none() {
                let Some((&group, &contacts)) = pending.first_key_value() else {
                    break;
                };
                let now_ms = unix_ms(SystemTime::now());
                match store.set_presence(&server, group, contacts, now_ms).await {
                    Ok(()) => {
                        pending.remove(&group);
                    }
                    Err(e) => {
                        failing = log_presence_failure(failing, &e);
                        break;
                    }
                }
            }
            if reset.is_none() && pending.is_empty() && std::mem::take(&mut failing) {
                info!("presence written again");
            }
            let changes = if reset.is_none() && pending.is_empty() {
                rx.recv().await
            } else {
                match tokio::time::timeout(PRESENCE_RETRY, rx.recv()).await {
                    Ok(changes) => changes,
                    Err(_) => continue,
                }
            };
            let Some(changes) = changes else {
                return;
            };
            pending.extend(changes);
        }
    });
    tx
}

/// How often a server writes its heartbeat; the API trusts a server's presence rows for
/// three times this after its last one.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Writes this server's heartbeat every [`HEARTBEAT_INTERVAL`] while it runs.
async fn heartbeat(store: Store, server: String) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut failing = false;
    loop {
        tick.tick().await;
        match store.heartbeat(&server, unix_ms(SystemTime::now())).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "heartbeat not written");
            }
            Err(_) => {}
        }
    }
}

/// Received messages handled in one turn of the service loop, at most.
const RECEIVE_BATCH: usize = 64;

/// How often presence rows the store refused are written again.
const PRESENCE_RETRY: Duration = Duration::from_secs(1);

/// Logs the first of a run of failed presence writes; returns that writes are failing.
fn log_presence_failure(failing: bool, e: &StoreError) -> bool {
    if !failing {
        warn!(error = %e, "presence not written; retrying");
    }
    true
}

/// Binds and starts the provisioning API when the configuration has one.
async fn start_api(
    settings: &Settings,
    store: Store,
    server_view: super::api::ServerView,
    call_log: CallLog,
) -> Result<Option<(std::net::SocketAddr, JoinHandle<()>, ApiReload)>, StartError> {
    let Some(api) = &settings.api else {
        return Ok(None);
    };
    let state = super::api::ApiState {
        store,
        server_name: settings.raw.name.clone(),
        server: server_view,
        call_log,
        realm: settings.raw.realm.clone(),
        failover_prefixes: Reloadable::new(settings.raw.failover_number_prefixes.clone()),
        trunk_servers: Reloadable::new(trunk_servers(settings)),
    };
    let mut reload = ApiReload {
        cert: None,
        failover_prefixes: state.failover_prefixes.clone(),
        trunk_servers: state.trunk_servers.clone(),
    };
    let bind_error = |e: io::Error| {
        StartError::Bind(io::Error::new(
            e.kind(),
            format!("api_listen {}: {e}", api.addr),
        ))
    };
    match &api.tls {
        None => {
            let listener = tokio::net::TcpListener::bind(api.addr)
                .await
                .map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            super::api::log_listening(addr, false);
            Ok(Some((
                addr,
                tokio::spawn(super::api::serve_plain(listener, state)),
                reload,
            )))
        }
        Some((cert, key)) => {
            let cert =
                ReloadableCert::load(cert, key).map_err(|e| StartError::Tls(format!("api_{e}")))?;
            let tls = cert
                .server_config()
                .map_err(|e| StartError::Tls(format!("api_{e}")))?;
            reload.cert = Some(cert);
            let mut tls = Arc::unwrap_or_clone(tls);
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let listener = std::net::TcpListener::bind(api.addr).map_err(bind_error)?;
            listener.set_nonblocking(true).map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            super::api::log_listening(addr, true);
            Ok(Some((
                addr,
                tokio::spawn(super::api::serve_tls(listener, Arc::new(tls), state)),
                reload,
            )))
        }
    }
}

struct Service {
    transport: SipTransport,
    transactions: Transactions<Flow>,
    registrar: Registrar,
    customers: watch::Receiver<Arc<Customers>>,
    proxy: Proxy,
    prober: Prober,
    /// Where changes of this server's registrations per trunk group go (the store's presence).
    presence: mpsc::UnboundedSender<Vec<(TrunkGroupId, usize)>>,
    /// Where the record of every call goes.
    call_log: CallLog,
    /// `None` when metrics are not served: nothing is counted, nothing built for it.
    metrics: Option<CarrierMetrics>,
    store_health: Arc<StoreHealth>,
    /// RFC 3263 lookups of failover PBXs given by name; `None` when no DNS is configured.
    resolver: Option<SipResolver>,
    /// Lookups finished by their tasks, back to the service loop.
    resolved: (
        mpsc::UnboundedSender<Resolved>,
        mpsc::UnboundedReceiver<Resolved>,
    ),
}

/// A finished lookup of a call's failover PBX.
struct Resolved {
    request: ResolveRequest,
    targets: Vec<(std::net::SocketAddr, Transport)>,
}

/// The resolver for failover PBXs given by name: the configured servers, else the system's.
fn dns_resolver(servers: &[std::net::SocketAddr]) -> Option<SipResolver> {
    let resolver = if servers.is_empty() {
        SipResolver::from_system()
    } else {
        SipResolver::with_nameservers(servers)
    };
    match resolver {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(error = %e, "no DNS: failover PBXs given by name cannot be resolved");
            None
        }
    }
}

impl Service {
    async fn run(
        mut self,
        mut incoming: Inbox,
        mut reloads: mpsc::UnboundedReceiver<Settings>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut expiry = tokio::time::interval(Duration::from_secs(1));
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.transactions.poll_timeout();
            let delivery_deadline = self.proxy.poll_timeout();
            let probe_deadline = self.prober.poll_timeout();
            tokio::select! {
                _ = &mut stop => break,
                received = incoming.recv() => match received {
                    Some(first) => {
                        self.on_incoming(first);
                        // What else has arrived is handled before the next wait: under load
                        // the loop's timers are then set up once per batch. Each message's
                        // sends go out before the next is handled, so that an ACK relayed
                        // statelessly still leaves before the BYE that followed it.
                        for _ in 1..RECEIVE_BATCH {
                            let Some(next) = incoming.try_recv() else { break };
                            self.flush();
                            self.on_incoming(next);
                        }
                    }
                    None => break,
                },
                _ = sleep_until(deadline) => self.transactions.handle_timeout(Instant::now()),
                _ = sleep_until(delivery_deadline) => {
                    self.proxy.handle_timeout(Instant::now(), &mut self.transactions)
                }
                _ = expiry.tick() => {
                    self.registrar.expire(unix_ms(SystemTime::now()));
                    if let Some(m) = &self.metrics {
                        m.set_state(
                            self.registrar.len(),
                            self.registrar.trunk_groups(),
                            self.store_health.unreachable_since_ms().is_none(),
                        );
                    }
                    // New bindings enter the probe schedule.
                    self.probe(Instant::now());
                }
                _ = sleep_until(probe_deadline) => self.probe(Instant::now()),
                Some(settings) = reloads.recv() => self.apply(settings),
                Some(done) = self.resolved.1.recv() => self.proxy.on_resolved(
                    Instant::now(),
                    &mut self.transactions,
                    done.request.call,
                    &done.request.uri,
                    done.targets,
                ),
            }
            self.flush();
        }
        // Bindings changed since the last write-behind tick must not be lost on shutdown, nor
        // the records of the last calls.
        self.registrar.flush().await;
        if let Err(e) = self.call_log.flush().await {
            warn!(error = %e, "call records not written");
        }
    }

    fn on_incoming(&mut self, incoming: Incoming) {
        match incoming {
            Incoming::Message(r) => self.on_received(r),
            Incoming::Unreachable(flow) => {
                let failed = self.transactions.handle_unreachable(Instant::now(), &flow);
                debug!(remote = %flow.remote, transport = %flow.transport, transactions = failed, "destination unreachable");
            }
        }
    }

    /// Puts reloaded settings in force for what starts from now on: transactions, REGISTERs,
    /// calls and probes already running keep their own.
    fn apply(&mut self, settings: Settings) {
        if settings.proxy.dns_servers != self.proxy.config().dns_servers {
            self.resolver = dns_resolver(&settings.proxy.dns_servers);
        }
        self.transactions.set_config(settings.timers);
        self.registrar.set_config(settings.registrar);
        self.proxy.set_config(settings.proxy);
        self.prober.set_config(settings.probe);
    }

    /// Hands everything the transactions want sent to the transports.
    fn flush(&mut self) {
        // Timeouts and transport errors of the proxy's client transactions drive its calls,
        // which may start transactions of their own, whose sends may fail at once: loop until
        // quiet (bounded: each round either ends transactions or sends).
        for _ in 0..16 {
            while let Some(event) = self.transactions.poll_event() {
                match event {
                    Event::Client(id, ev) => {
                        if !self.prober.on_client_event(Instant::now(), id, &ev) {
                            self.proxy.on_client_event(
                                Instant::now(),
                                &mut self.transactions,
                                id,
                                ev,
                            );
                        }
                    }
                    // The caller cannot be reached any more: its call's branches are cancelled,
                    // as if it had sent CANCEL.
                    Event::Server(id, ServerEvent::TransportError) if self.proxy.has_call(id) => {
                        self.proxy
                            .cancel(Instant::now(), &mut self.transactions, id);
                    }
                    Event::Server(..) => {}
                }
            }
            // After the events: a transaction's last event is handled before it is forgotten.
            while let Some(id) = self.transactions.poll_ended() {
                self.prober.client_ended(id);
                self.proxy.client_ended(id);
            }
            let mut failed = Vec::new();
            while let Some((flow, bytes)) = self.transactions.poll_transmit() {
                if !self.send(flow, bytes) {
                    failed.push(flow);
                }
            }
            while let Some((flow, bytes)) = self.proxy.poll_transmit() {
                self.send(flow, bytes);
            }
            while let Some(request) = self.proxy.poll_resolve() {
                self.resolve(request);
            }
            while let Some(record) = self.proxy.poll_record() {
                if let Some(m) = &self.metrics {
                    m.call_ended(&record);
                }
                self.call_log.record(record);
            }
            if self.registrar.presence_changed() {
                let changes = self
                    .registrar
                    .take_presence_changes(unix_ms(SystemTime::now()));
                let _ = self.presence.send(changes);
            }
            if failed.is_empty() {
                break;
            }
            for flow in failed {
                self.transactions.handle_unreachable(Instant::now(), &flow);
            }
        }
    }

    /// Runs the prober: due probes sent, missed ones counted.
    fn probe(&mut self, now: Instant) {
        self.prober
            .tick(now, &self.registrar, &mut self.transactions, 70);
    }

    /// The usable contacts of a trunk group: live, and not failing their probes.
    fn usable_contacts(&self, trunk_group: TrunkGroupId, now_ms: i64) -> Vec<Contact> {
        let mut contacts = self.registrar.contacts(trunk_group, now_ms);
        contacts.retain(|c| !self.prober.is_failing(trunk_group, &c.binding.contact));
        contacts
    }

    /// Looks a failover PBX up in a task of its own; the answer comes back to the loop.
    fn resolve(&self, request: ResolveRequest) {
        let done = self.resolved.0.clone();
        let Some(resolver) = self.resolver.clone() else {
            let _ = done.send(Resolved {
                request,
                targets: Vec::new(),
            });
            return;
        };
        tokio::spawn(async move {
            let uri = &request.uri;
            let host = uri.host.to_string();
            let transport = uri
                .params
                .value("transport")
                .and_then(Transport::from_token);
            let lookup = Lookup {
                host: &host,
                port: uri.port,
                transport,
                secure: uri.secure,
            };
            let targets = match resolver.resolve(&lookup).await {
                Ok(targets) => targets
                    .into_iter()
                    // Outbound TLS is not supported yet: such a target could never answer.
                    .filter(|t| t.transport != Transport::Tls)
                    .map(|t| (t.addr, t.transport))
                    .collect(),
                Err(e) => {
                    info!(failover_pbx = %uri, error = %e, "failover PBX not resolved");
                    Vec::new()
                }
            };
            let _ = done.send(Resolved { request, targets });
        });
    }

    /// Sends; false when the transport refused at once (no connection, forbidden address).
    fn send(&self, flow: Flow, bytes: Bytes) -> bool {
        match self.transport.send_nowait(flow, bytes) {
            Ok(()) => true,
            Err(e) => {
                debug!(remote = %flow.remote, error = %e, "send failed");
                false
            }
        }
    }

    fn on_received(&mut self, received: Received) {
        let flow = received.flow;
        match received.message {
            Ok(msg) if msg.is_request() => self.on_request(msg, flow),
            Ok(msg) => {
                let now = Instant::now();
                match self.transactions.handle_response(now, msg) {
                    Ok((id, Some(event))) => {
                        if !self.prober.on_client_event(now, id, &event) {
                            self.proxy
                                .on_client_event(now, &mut self.transactions, id, event);
                        }
                    }
                    Ok((_, None)) => {}
                    // RFC 3261 §18.1.2: a response matching no transaction is dropped.
                    Err(msg) => {
                        debug!(call_id = %msg.call_id(), status = ?msg.status(), "stray response dropped")
                    }
                }
            }
            Err(e) => self.on_unparseable(e, flow),
        }
    }

    /// A request that could not be parsed gets its 400 (or 505, 501) statelessly when it can
    /// be answered; anything else is dropped. Logged at debug: malformed traffic is routine.
    fn on_unparseable(&mut self, e: ParseError, flow: Flow) {
        let Some(req) = e.request else {
            debug!(remote = %flow.remote, reason = e.reason, "unparseable message dropped");
            return;
        };
        debug!(remote = %flow.remote, reason = e.reason, status = e.status, "malformed request");
        if &req.method[..] == "ACK" {
            return;
        }
        let reason = match e.status {
            505 => "Version Not Supported",
            501 => "Not Implemented",
            _ => e.reason,
        };
        let bytes = req.error_response(e.status, reason, &new_tag());
        let to = match (flow.transport, req.top_via()) {
            (Transport::Udp, Some(mut via)) => {
                via.params
                    .set("received", Some(&flow.remote.ip().to_string()));
                if via.rport().is_some() {
                    via.params
                        .set("rport", Some(&flow.remote.port().to_string()));
                }
                response_flow(&via, flow)
            }
            _ => flow,
        };
        self.send(to, bytes);
    }

    fn on_request(&mut self, mut msg: Message, flow: Flow) {
        msg.set_received(flow.remote.ip(), flow.remote.port());
        let now = Instant::now();
        let reliable = flow.transport.is_stream();
        let dest = response_flow(msg.top_via(), flow);
        let in_dialog = msg.to().tag().is_some()
            && routed_through_us(&msg, self.transport.bound(), self.proxy.dialog_key());
        let id = match self.transactions.handle_request(now, &msg, dest, reliable) {
            RequestDisposition::New(id) => id,
            // Retransmissions and ACKs for our own non-2xx answers end in the transaction layer.
            RequestDisposition::Absorbed => return,
            RequestDisposition::Ack => {
                if in_dialog {
                    // The ACK of a 2xx is end to end: forwarded statelessly (RFC 3261 §16.11).
                    let bound = self.transport.bound().to_vec();
                    self.proxy.forward_in_dialog(
                        now,
                        &mut self.transactions,
                        None,
                        &msg,
                        flow,
                        &bound,
                    );
                } else {
                    debug!(call_id = %msg.call_id(), "ACK outside any transaction dropped");
                }
                return;
            }
        };
        if in_dialog && *msg.method() != Method::Cancel {
            let bound = self.transport.bound().to_vec();
            if let Some(answer) = self.proxy.forward_in_dialog(
                now,
                &mut self.transactions,
                Some(id),
                &msg,
                flow,
                &bound,
            ) && let Err(e) = self.transactions.respond(id, now, answer)
            {
                debug!(call_id = %msg.call_id(), error = %e, "answer not sent");
            }
            return;
        }
        let Some(answer) = self.answer(&msg, &flow, id) else {
            // The proxy took the request and answers through its transaction.
            return;
        };
        if let Err(e) = self.transactions.respond(id, now, answer) {
            debug!(call_id = %msg.call_id(), error = %e, "answer not sent");
        }
    }

    /// The SIP core's own answer to a new request; `None` when the proxy took it.
    fn answer(&mut self, req: &Message, flow: &Flow, id: ServerId) -> Option<Message> {
        let reply = |code: u16, reason: &str| {
            let mut r = req.response(code, reason, Some(&new_tag()));
            r.push_header(Header::new(HeaderName::Server, SERVER));
            r
        };
        let Some(uri) = req.uri() else {
            return Some(reply(400, "Bad Request"));
        };
        // RFC 3261 §8.2.2.1 / §16.3 step 1: only URIs this element can route.
        // A URI without a user part addresses the server itself: it never relays to other
        // hosts, only delivers users (DIDs).
        let local = match uri {
            // Some PBXs put their own user in a REGISTER's Request-URI: still for us.
            Uri::Sip(u) => u.user.is_none() || *req.method() == Method::Register,
            Uri::Tel(_) => false,
            Uri::Other { .. } => return Some(reply(416, "Unsupported URI Scheme")),
        };
        if *req.method() == Method::Cancel {
            return Some(match self.transactions.find_invite_for_cancel(req) {
                Some(invite) if self.proxy.has_call(invite) => {
                    // RFC 3261 §16.10: the CANCEL gets its 200 (first), the branch its CANCEL
                    // and the caller 487 (the delivery decides both).
                    let now = Instant::now();
                    if let Err(e) = self.transactions.respond(id, now, reply(200, "OK")) {
                        debug!(call_id = %req.call_id(), error = %e, "answer not sent");
                    }
                    self.proxy.cancel(now, &mut self.transactions, invite);
                    return None;
                }
                Some(invite) => {
                    if let Some(invite_req) = self.transactions.server_request(invite) {
                        let terminated =
                            invite_req.response(487, "Request Terminated", Some(&new_tag()));
                        // Already answered finally: the CANCEL still gets its 200 (§9.2).
                        let _ = self
                            .transactions
                            .respond(invite, Instant::now(), terminated);
                    }
                    reply(200, "OK")
                }
                None => reply(481, "Call/Transaction Does Not Exist"),
            });
        }
        if local {
            Some(self.answer_local(req, flow, reply))
        } else {
            self.answer_routed(req, flow, id, reply)
        }
    }

    /// The request is for this server itself (the UAS role).
    fn answer_local(
        &mut self,
        req: &Message,
        flow: &Flow,
        reply: impl Fn(u16, &str) -> Message,
    ) -> Message {
        let require = req.header_tokens(&HeaderName::Require);
        if !require.is_empty() {
            let mut r = reply(420, "Bad Extension");
            r.push_header(Header::new(HeaderName::Unsupported, require.join(", ")));
            return r;
        }
        match req.method() {
            Method::Register => {
                let customers = self.customers.borrow().clone();
                let mut r = self.registrar.register(
                    req,
                    flow,
                    &customers,
                    SystemTime::now(),
                    Instant::now(),
                    &new_tag(),
                );
                r.push_header(Header::new(HeaderName::Server, SERVER));
                if let (Some(m), Some(status)) = (&mut self.metrics, r.status()) {
                    m.register_answered(status);
                }
                r
            }
            Method::Options => {
                let mut r = reply(200, "OK");
                r.push_header(Header::new(HeaderName::Allow, ALLOW));
                r.push_header(Header::new(HeaderName::Supported, ""));
                r.push_header(Header::new(
                    HeaderName::Other("Accept".into()),
                    "application/sdp",
                ));
                r
            }
            Method::Other(_) => {
                let mut r = reply(501, "Not Implemented");
                r.push_header(Header::new(HeaderName::Allow, ALLOW));
                r
            }
            Method::Bye | Method::Prack | Method::Update | Method::Info => {
                reply(481, "Call/Transaction Does Not Exist")
            }
            _ => {
                let mut r = reply(405, "Method Not Allowed");
                r.push_header(Header::new(HeaderName::Allow, ALLOW));
                r
            }
        }
    }

    /// The request is for a user: the proxy role (RFC 3261 §16.3). An initial INVITE from the
    /// upstream for a known DID goes to the proxy (`None`: it answers).
    fn answer_routed(
        &mut self,
        req: &Message,
        flow: &Flow,
        id: ServerId,
        reply: impl Fn(u16, &str) -> Message,
    ) -> Option<Message> {
        if req.max_forwards() == Some(0) {
            return Some(reply(483, "Too Many Hops"));
        }
        let proxy_require = req.header_tokens(&HeaderName::ProxyRequire);
        if !proxy_require.is_empty() {
            let mut r = reply(420, "Bad Extension");
            r.push_header(Header::new(
                HeaderName::Unsupported,
                proxy_require.join(", "),
            ));
            return Some(r);
        }
        let call_id = req.call_id();
        if req.to().tag().is_some() {
            // In a dialog, but not routed through this server: no dialog of ours.
            return Some(reply(481, "Call/Transaction Does Not Exist"));
        }
        // The DID: the user part of a SIP URI, or the number of a tel: URI.
        let user = match req.uri() {
            Some(Uri::Sip(u)) => u
                .user_unescaped()
                .map(|u| String::from_utf8_lossy(&u).into_owned())
                .unwrap_or_default(),
            Some(Uri::Tel(t)) => t.number.to_string(),
            _ => String::new(),
        };
        if !self.proxy.config().accepts_calls_from(flow.remote.ip()) {
            info!(
                call_id = %call_id,
                did = %user,
                source = %flow.remote,
                method = %req.method(),
                outcome = "forbidden: neither upstream nor a peer",
                status = 403,
                "initial request refused"
            );
            return Some(reply(403, "Forbidden"));
        }
        let customers = self.customers.borrow().clone();
        let Some(did) = customers.did(&user) else {
            info!(
                call_id = %call_id,
                did = %user,
                source = %flow.remote,
                method = %req.method(),
                outcome = "unknown DID",
                status = 404,
                "initial request refused"
            );
            return Some(reply(404, "Not Found"));
        };
        if *req.method() != Method::Invite {
            info!(
                call_id = %call_id,
                did = %did.number,
                method = %req.method(),
                outcome = "method not delivered",
                status = 405,
                "initial request refused"
            );
            let mut r = reply(405, "Method Not Allowed");
            r.push_header(Header::new(HeaderName::Allow, "INVITE, ACK, CANCEL"));
            return Some(r);
        }
        let now_ms = unix_ms(SystemTime::now());
        let contacts = self.usable_contacts(did.trunk_group_id, now_ms);
        let failover = customers.failover(did);
        let failover_contacts = customers
            .failover_trunk_group(did)
            .map(|other| self.usable_contacts(other, now_ms))
            .unwrap_or_default();
        self.proxy.start_call(
            Instant::now(),
            &mut self.transactions,
            NewCall {
                server: id,
                request: req,
                flow: *flow,
                did: &did.number,
                trunk_group: did.trunk_group_id,
                contacts,
                failover,
                failover_contacts,
            },
        );
        None
    }
}

/// Where responses to a request go: back on its connection for streams (else to the sent-by
/// port); over UDP to the received address and the rport or sent-by port (RFC 3261 §18.2.2,
/// RFC 3581).
pub(crate) fn response_flow(via: &crate::sip::message::Via, flow: Flow) -> Flow {
    if flow.transport.is_stream() {
        // Back on the request's connection; if that is gone, a new connection goes to the
        // source address and the sent-by port, not the old ephemeral port (§18.2.2).
        let port = via.port.unwrap_or(flow.transport.default_port());
        return Flow {
            remote: (flow.remote.ip(), port).into(),
            ..flow
        };
    }
    let (host, port) = via.response_host_port(flow.transport.default_port());
    let ip: IpAddr = host.ip().unwrap_or(flow.remote.ip());
    Flow {
        remote: (ip, port).into(),
        ..flow
    }
}

/// The file holding the key of this server's dialog tokens, kept so that calls set up before
/// a restart can still be hung up after it.
pub const DIALOG_KEY_FILE: &str = "dialog.key";

/// Reads a 32-byte key, or creates one (readable by the owner only).
fn load_or_create_key(path: &std::path::Path) -> io::Result<[u8; 32]> {
    match fs::read(path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            Ok(key)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a 32-byte key: remove it to have a new one made",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            let mut options = fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            std::io::Write::write_all(&mut options.open(path)?, &key)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// A fresh random tag for To headers.
pub fn new_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Puts back into `applied` the running value of every key that needs a restart to change
/// (listeners, store, names, log filter, …); returns the keys that were changed in the file.
fn keep_restart_only(applied: &mut CarrierConfig, old: &CarrierConfig) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($key:ident),*) => {$(
            if applied.$key != old.$key {
                applied.$key = old.$key.clone();
                kept.push(stringify!($key));
            }
        )*};
    }
    keep!(
        name,
        realm,
        sip_listen,
        data_dir,
        store_url,
        log_level,
        api_listen,
        metrics_listen,
        config_poll_ms,
        bindings_flush_ms,
        worker_threads,
        nonce_lifetime_s,
        call_record_days,
        stream_idle_timeout_ms
    );
    kept
}

/// The trunk servers by name, this one first unless the peers list it.
fn trunk_servers(settings: &Settings) -> Vec<String> {
    let mut names: Vec<String> = settings
        .proxy
        .peers
        .iter()
        .map(|p| p.name.clone())
        .collect();
    if !names.contains(&settings.raw.name) {
        names.insert(0, settings.raw.name.clone());
    }
    names
}
