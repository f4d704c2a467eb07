//! SIP transports: UDP, TCP and TLS listeners and connections.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sip::icmp;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::message::{Frame, FrameScan, MAX_MESSAGE, Message, ParseError, stream_frame_resume};

/// A SIP transport protocol, as named in Via and the `transport` URI parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// The token used in Via (`SIP/2.0/UDP`) and, lower-cased, in the `transport` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// Parses a transport token, case-insensitively.
    pub fn from_token(s: &str) -> Option<Transport> {
        if s.eq_ignore_ascii_case("udp") {
            Some(Transport::Udp)
        } else if s.eq_ignore_ascii_case("tcp") {
            Some(Transport::Tcp)
        } else if s.eq_ignore_ascii_case("tls") {
            Some(Transport::Tls)
        } else {
            None
        }
    }

    /// Whether the transport is a byte stream (framed by Content-Length).
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// The default port: 5061 for TLS, 5060 otherwise.
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 5061,
            _ => 5060,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === Listening and sending ===

/// One address to listen on, written `udp:127.0.0.1:5060`, `tcp:[::1]:5060` or
/// `tls:0.0.0.0:5061` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenSpec {
    pub transport: Transport,
    pub addr: SocketAddr,
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (t, addr) = s.split_once(':').ok_or_else(|| {
            format!("`{s}`: expected transport:address:port, e.g. udp:127.0.0.1:5060")
        })?;
        let transport =
            Transport::from_token(t).ok_or_else(|| format!("`{s}`: unknown transport `{t}`"))?;
        let addr = addr
            .parse()
            .map_err(|_| format!("`{s}`: `{addr}` is not an address:port"))?;
        Ok(ListenSpec { transport, addr })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.transport.as_str().to_ascii_lowercase(),
            self.addr
        )
    }
}

/// Identifies one TCP or TLS connection for as long as it lives.
pub type ConnId = u64;

/// The path a message came in on, and the way back (RFC 3261 §18.2.2: responses go back on
/// the connection the request came in on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The connection, for TCP and TLS.
    pub conn: Option<ConnId>,
}

/// A message that arrived, or a request that could not be parsed.
#[derive(Debug)]
pub struct Received {
    pub message: Result<Message, ParseError>,
    pub flow: Flow,
}

/// What the transports hand to the SIP service.
// Nearly every item is a message: boxing it would cost an allocation per message to save
// space on the rare unreachable report.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Incoming {
    /// A message (or what could not be parsed of one) arrived.
    Message(Received),
    /// A send along this flow failed after it left: an ICMP error for a UDP datagram, or a
    /// TCP connection that could not be opened. Transactions sending there have failed.
    Unreachable(Flow),
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The destination is broadcast, multicast or unspecified: never sent to.
    #[error("refusing to send to {0}")]
    ForbiddenDestination(IpAddr),
    /// No socket of that transport and address family is open.
    #[error("no {0} socket for this address family")]
    NoSocket(Transport),
    /// The connection is gone and a new one cannot be opened (TLS client connections are not
    /// opened by this element).
    #[error("no connection to {0}")]
    NoConnection(SocketAddr),
    /// The operating system refused (for UDP this includes ICMP errors from earlier sends).
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Settings of the transport layer.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// A TCP or TLS connection that carries nothing for this long is closed.
    pub stream_idle_timeout: Duration,
    /// How long an outgoing TCP connect may take.
    pub connect_timeout: Duration,
    /// Queue of TCP and TLS messages waiting for the core (a full queue holds the connections'
    /// readers back); UDP datagrams wait in their sockets' receive buffers.
    pub queue: usize,
    /// A write to a TCP or TLS peer that does not complete in this time closes the connection.
    pub write_timeout: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            stream_idle_timeout: Duration::from_secs(900),
            connect_timeout: Duration::from_secs(2),
            queue: 8192,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// A TLS certificate (chain and key) that can be replaced while listeners run: handshakes
/// after [`ReloadableCert::reload`] present the new one, connections already open keep theirs.
#[derive(Debug)]
pub struct ReloadableCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ReloadableCert {
    /// Loads the PEM files; errors name the file and the key of the configuration
    /// (`tls_certificate`, `tls_private_key`).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ReloadableCert>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = certified_key(cert, key, &provider)?;
        Ok(Arc::new(ReloadableCert {
            current: std::sync::RwLock::new(Arc::new(current)),
            provider,
        }))
    }

    /// Reads a replacement from the PEM files, without putting it in use.
    pub fn read(&self, cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        certified_key(cert, key, &self.provider).map(Arc::new)
    }

    /// Puts a certificate from [`ReloadableCert::read`] in use.
    pub fn replace(&self, fresh: Arc<rustls::sign::CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    /// A server configuration that presents this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for ReloadableCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Reads a certificate chain and its private key (PEM) and checks that they belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls_certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_certificate {}: no certificate",
            cert.display()
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("tls_private_key {}: {e}", key.display()))?;
    rustls::sign::CertifiedKey::from_der(certs, private, provider)
        .map_err(|e| format!("tls_private_key {}: {e}", key.display()))
}

/// The SIP transport layer: UDP sockets, TCP and TLS listeners, and open connections.
/// Cloning is cheap; all clones share the sockets.
#[derive(Clone)]
pub struct SipTransport {
    inner: Arc<Inner>,
}

struct Inner {
    /// The accept and connection loops, ended by [`SipTransport::shutdown`].
    loops: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set by [`SipTransport::shutdown`]: the [`Inbox`] reads no more datagrams.
    shut: Arc<AtomicBool>,
    /// Each UDP socket with its bound address (asking the socket costs a system call a send).
    udp: Vec<(SocketAddr, Arc<UdpSocket>)>,
    bound: Vec<ListenSpec>,
    conns: Mutex<Conns>,
    next_conn: AtomicU64,
    incoming: mpsc::Sender<Incoming>,
    options: TransportOptions,
}

#[derive(Default)]
struct Conns {
    by_id: HashMap<ConnId, Conn>,
    by_remote: HashMap<(Transport, SocketAddr), ConnId>,
}

struct Conn {
    tx: mpsc::Sender<Bytes>,
    flow: Flow,
    /// Ends the connection's task (see [`SipTransport::close`]).
    closer: Option<oneshot::Sender<()>>,
}

impl SipTransport {
    /// Binds every listen address and starts receiving. Port 0 binds a free port:
    /// [`SipTransport::bound`] says which.
    pub async fn bind(
        specs: &[ListenSpec],
        tls: Option<Arc<rustls::ServerConfig>>,
        options: TransportOptions,
    ) -> io::Result<(SipTransport, Inbox)> {
        let (tx, rx) = mpsc::channel(options.queue);
        let mut udp = Vec::new();
        let mut bound = Vec::new();
        let mut tcp = Vec::new();
        for spec in specs {
            match spec.transport {
                Transport::Udp => {
                    let sock = UdpSocket::bind(spec.addr)
                        .await
                        .map_err(|e| with_addr(e, spec))?;
                    let addr = sock.local_addr()?;
                    size_buffers(&sock, addr);
                    if let Err(e) = icmp::enable(&sock) {
                        warn!(%addr, error = %e, "ICMP errors not available: unreachable targets wait for their timers");
                    }
                    bound.push(ListenSpec {
                        transport: Transport::Udp,
                        addr,
                    });
                    udp.push((addr, Arc::new(sock)));
                }
                Transport::Tcp | Transport::Tls => {
                    if spec.transport == Transport::Tls && tls.is_none() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "{spec}: a TLS listener needs tls_certificate and tls_private_key"
                            ),
                        ));
                    }
                    let l = TcpListener::bind(spec.addr)
                        .await
                        .map_err(|e| with_addr(e, spec))?;
                    let addr = l.local_addr()?;
                    bound.push(ListenSpec {
                        transport: spec.transport,
                        addr,
                    });
                    tcp.push((spec.transport, l));
                }
            }
        }
        let inner = Arc::new(Inner {
            loops: Mutex::new(Vec::new()),
            shut: Arc::new(AtomicBool::new(false)),
            udp,
            bound,
            conns: Mutex::new(Conns::default()),
            next_conn: AtomicU64::new(1),
            incoming: tx,
            options,
        });
        let transport = SipTransport { inner };
        for (kind, listener) in tcp {
            let acceptor = match kind {
                Transport::Tls => tls.clone().map(tokio_rustls::TlsAcceptor::from),
                _ => None,
            };
            let task = tokio::spawn(accept_loop(transport.clone(), listener, kind, acceptor));
            transport.lock_loops().push(task);
        }
        let inbox = Inbox {
            queue: rx,
            udp: (transport.inner.udp.iter())
                .map(|(local, sock)| UdpIn {
                    local: *local,
                    sock: sock.clone(),
                    wait: None,
                    batch: UDP_MIN_BATCH,
                })
                .collect(),
            shut: transport.inner.shut.clone(),
            ready: VecDeque::new(),
            buf: vec![0; UDP_BATCH * UDP_SLOT],
            next: 0,
        };
        Ok((transport, inbox))
    }

    fn lock_loops(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::JoinHandle<()>>> {
        self.inner.loops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops receiving and closes every connection; the sockets are released once the last
    /// clone of this transport and its [`Inbox`] are dropped.
    pub fn shutdown(&self) {
        self.inner.shut.store(true, Ordering::Relaxed);
        for task in self.lock_loops().drain(..) {
            task.abort();
        }
        let closers: Vec<_> = self
            .lock()
            .by_id
            .values_mut()
            .filter_map(|c| c.closer.take())
            .collect();
        for closer in closers {
            let _ = closer.send(());
        }
    }

    /// What was bound, with the real ports.
    pub fn bound(&self) -> &[ListenSpec] {
        &self.inner.bound
    }

    /// The number of open TCP and TLS connections.
    pub fn connection_count(&self) -> usize {
        self.lock().by_id.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        // A panic while holding this lock cannot leave the maps inconsistent: every critical
        // section is a single insert or remove.
        self.inner.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `bytes` along `flow`: over UDP from the local socket named in the flow, over the
    /// flow's connection for streams, else over any open connection to the remote, else (TCP) a
    /// new connection.
    pub async fn send(&self, flow: &Flow, bytes: Bytes) -> Result<(), SendError> {
        check_destination(flow.remote.ip())?;
        match flow.transport {
            Transport::Udp => {
                let sock = self.udp_socket(flow)?;
                let mut tries = 0;
                loop {
                    match sock.send_to(&bytes, flow.remote).await {
                        Ok(_) => return Ok(()),
                        Err(e) if icmp::is_pending_error(&e) && tries < 3 => {
                            tries += 1;
                            self.report_icmp(sock);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Transport::Tcp | Transport::Tls => {
                let tx = self.conn_sender(flow);
                let tx = match tx {
                    Some(tx) => tx,
                    None if flow.transport == Transport::Tcp => self.connect(flow).await?,
                    None => return Err(SendError::NoConnection(flow.remote)),
                };
                tx.send(bytes)
                    .await
                    .map_err(|_| SendError::NoConnection(flow.remote))
            }
        }
    }

    /// Sends without waiting, keeping the order of messages on each connection: the service
    /// loop calls this. Only a send that must first open a TCP connection, or that meets a
    /// full queue, continues in a task of its own.
    pub fn send_nowait(&self, flow: Flow, bytes: Bytes) -> Result<(), SendError> {
        check_destination(flow.remote.ip())?;
        let pending = match flow.transport {
            Transport::Udp => {
                let sock = self.udp_socket(&flow)?;
                let mut tries = 0;
                loop {
                    match sock.try_send_to(&bytes, flow.remote) {
                        Ok(_) => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break bytes,
                        // An earlier datagram's ICMP error, reported on this send: it is not
                        // about this destination. Hand it to whom it concerns and send again.
                        Err(e) if icmp::is_pending_error(&e) && tries < 3 => {
                            tries += 1;
                            self.report_icmp(sock);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Transport::Tcp | Transport::Tls => {
                let tx = self.conn_sender(&flow);
                match tx {
                    Some(tx) => match tx.try_send(bytes) {
                        Ok(()) => return Ok(()),
                        // A peer that does not read what we send loses its connection:
                        // queueing more for it would grow without bound.
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            warn!(remote = %flow.remote, "peer not reading: connection closed");
                            self.close(&flow);
                            return Err(SendError::NoConnection(flow.remote));
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return Err(SendError::NoConnection(flow.remote));
                        }
                    },
                    None if flow.transport == Transport::Tcp => bytes,
                    None => return Err(SendError::NoConnection(flow.remote)),
                }
            }
        };
        let transport = self.clone();
        tokio::spawn(async move {
            if let Err(e) = transport.send(&flow, pending).await {
                debug!(remote = %flow.remote, error = %e, "send failed");
                // Connection refused or timed out: whoever sends there must hear of it.
                let _ = transport
                    .inner
                    .incoming
                    .send(Incoming::Unreachable(flow))
                    .await;
            }
        });
        Ok(())
    }

    /// Reads the ICMP errors queued on a UDP socket and reports the destinations they name.
    fn report_icmp(&self, sock: &UdpSocket) {
        let Ok(local) = sock.local_addr() else { return };
        report_unreachable(self, sock, local);
    }

    /// The send queue of the flow's connection, else of any open connection to its remote.
    fn conn_sender(&self, flow: &Flow) -> Option<mpsc::Sender<Bytes>> {
        let conns = self.lock();
        let id = flow
            .conn
            .filter(|id| conns.by_id.contains_key(id))
            .or_else(|| conns.by_remote.get(&(flow.transport, flow.remote)).copied())?;
        conns.by_id.get(&id).map(|c| c.tx.clone())
    }

    fn udp_socket(&self, flow: &Flow) -> Result<&Arc<UdpSocket>, SendError> {
        let socks = &self.inner.udp;
        socks
            .iter()
            .find(|(a, _)| *a == flow.local)
            .or_else(|| {
                socks
                    .iter()
                    .find(|(a, _)| a.is_ipv4() == flow.remote.is_ipv4())
            })
            .map(|(_, s)| s)
            .ok_or(SendError::NoSocket(Transport::Udp))
    }

    async fn connect(&self, flow: &Flow) -> Result<mpsc::Sender<Bytes>, SendError> {
        let stream = tokio::time::timeout(
            self.inner.options.connect_timeout,
            TcpStream::connect(flow.remote),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let local = stream.local_addr()?;
        Ok(self.register(stream, Transport::Tcp, local, flow.remote))
    }

    /// Starts the reader and writer of a new connection and returns its send queue.
    fn register<S>(
        &self,
        stream: S,
        transport: Transport,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> mpsc::Sender<Bytes>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let flow = Flow {
            transport,
            local,
            remote,
            conn: Some(id),
        };
        let (tx, rx) = mpsc::channel(256);
        let (closed_tx, closed_rx) = oneshot::channel();
        {
            let mut conns = self.lock();
            conns.by_id.insert(
                id,
                Conn {
                    tx: tx.clone(),
                    flow,
                    closer: Some(closed_tx),
                },
            );
            conns.by_remote.insert((transport, remote), id);
        }
        let (rd, wr) = tokio::io::split(stream);
        let transport = self.clone();
        // One task per connection: when reading, writing or `close` ends it, all of it ends.
        tokio::spawn(async move {
            let why = tokio::select! {
                why = read_loop(transport.clone(), rd, flow) => why,
                why = write_loop(wr, rx, transport.inner.options.write_timeout) => why,
                _ = closed_rx => "closed by this element".to_string(),
            };
            debug!(remote = %flow.remote, transport = %flow.transport, reason = %why, "connection closed");
            transport.forget(&flow);
        });
        tx
    }

    /// Closes the connection of `flow`, if still open.
    fn close(&self, flow: &Flow) {
        let closer = flow
            .conn
            .and_then(|id| self.lock().by_id.get_mut(&id).and_then(|c| c.closer.take()));
        if let Some(closer) = closer {
            let _ = closer.send(());
        }
    }

    fn forget(&self, flow: &Flow) {
        let mut conns = self.lock();
        if let Some(id) = flow.conn {
            conns.by_id.remove(&id);
            if conns.by_remote.get(&(flow.transport, flow.remote)) == Some(&id) {
                conns.by_remote.remove(&(flow.transport, flow.remote));
                // Another connection to the same remote may still be open: point to it.
                if let Some(other) = conns
                    .by_id
                    .values()
                    .find(|c| c.flow.transport == flow.transport && c.flow.remote == flow.remote)
                    .and_then(|c| c.flow.conn)
                {
                    conns.by_remote.insert((flow.transport, flow.remote), other);
                }
            }
        }
    }
}

/// What a UDP socket asks of the kernel for each direction. A burst of datagrams that arrives
/// while the core is busy waits here instead of being dropped: the default (about 208 KiB) holds
/// only some 10 ms of traffic at a few thousand calls per second.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Asks for `UDP_BUFFER_BYTES` each way; the kernel caps it at `net.core.rmem_max` and
/// `wmem_max`, and a smaller grant is logged.
fn size_buffers(sock: &UdpSocket, addr: SocketAddr) {
    let sock = socket2::SockRef::from(sock);
    let _ = sock.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(UDP_BUFFER_BYTES);
    // Linux reports twice the size asked for (it counts its bookkeeping too).
    let granted = sock.recv_buffer_size().unwrap_or(0) / 2;
    if granted < UDP_BUFFER_BYTES {
        info!(%addr, bytes = granted, wanted = UDP_BUFFER_BYTES, "UDP receive buffer smaller than wanted: raise net.core.rmem_max for bursts");
    }
}

fn with_addr(e: io::Error, spec: &ListenSpec) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen on {spec}: {e}"))
}

/// Broadcast, multicast and unspecified addresses are never sent to (RFC 4475 §3.3.10).
fn check_destination(ip: IpAddr) -> Result<(), SendError> {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if broadcast || ip.is_unspecified() || ip.is_multicast() {
        return Err(SendError::ForbiddenDestination(ip));
    }
    Ok(())
}

/// Drains a UDP socket's queued ICMP errors and reports each unreachable destination.
fn report_unreachable(transport: &SipTransport, sock: &UdpSocket, local: SocketAddr) {
    for report in icmp_reports(sock, local) {
        let _ = transport.inner.incoming.try_send(report);
    }
}

/// The unreachable destinations among a UDP socket's queued ICMP errors.
fn icmp_reports(sock: &UdpSocket, local: SocketAddr) -> impl Iterator<Item = Incoming> {
    icmp::drain(sock).into_iter().map(move |remote| {
        debug!(%local, %remote, "ICMP error: destination unreachable");
        Incoming::Unreachable(Flow {
            transport: Transport::Udp,
            local,
            remote,
            conn: None,
        })
    })
}

/// Datagrams read by one `recvmmsg`, at most and at least.
const UDP_BATCH: usize = 32;
const UDP_MIN_BATCH: usize = 4;
/// Room for the largest UDP payload.
const UDP_SLOT: usize = 65_535;

/// What the transports received, for their one consumer (the service loop). The UDP sockets
/// are read here, in batches, by the task that handles what they bring: a datagram is parsed
/// on the thread that handles it, with no queue or thread between (under load the handoff
/// cost more than the parse). TCP and TLS messages and failed sends come through a queue.
pub struct Inbox {
    queue: mpsc::Receiver<Incoming>,
    udp: Vec<UdpIn>,
    shut: Arc<AtomicBool>,
    /// Read but not yet handed out.
    ready: VecDeque<Incoming>,
    /// `UDP_BATCH` slots of `UDP_SLOT` bytes.
    buf: Vec<u8>,
    /// The socket looked at first next time, so that a busy one does not starve the others.
    next: usize,
}

/// One UDP socket as the [`Inbox`] reads it.
struct UdpIn {
    local: SocketAddr,
    sock: Arc<UdpSocket>,
    /// The wait for a datagram or a queued ICMP error (`poll_recv_ready` sees no errors:
    /// tokio's `recv_from` waits for `READABLE | ERROR`).
    wait: Option<UdpWait>,
    /// The next read's size.
    batch: usize,
}

type UdpWait =
    std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<tokio::io::Ready>> + Send>>;

fn udp_wait(sock: &Arc<UdpSocket>) -> UdpWait {
    let sock = sock.clone();
    Box::pin(async move {
        sock.ready(tokio::io::Interest::READABLE | tokio::io::Interest::ERROR)
            .await
    })
}

impl Inbox {
    /// Waits for the next message or report; `None` when no transport can send any more.
    pub async fn recv(&mut self) -> Option<Incoming> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            let readable = std::future::poll_fn(|cx| {
                let Inbox {
                    queue,
                    udp,
                    shut,
                    next,
                    ..
                } = &mut *self;
                if let std::task::Poll::Ready(item) = queue.poll_recv(cx) {
                    return std::task::Poll::Ready(Err(item));
                }
                if shut.load(Ordering::Relaxed) {
                    return std::task::Poll::Pending;
                }
                let n = udp.len();
                for k in 0..n {
                    let i = (*next + k) % n;
                    let u = &mut udp[i];
                    let wait = u.wait.get_or_insert_with(|| udp_wait(&u.sock));
                    if wait.as_mut().poll(cx).is_ready() {
                        u.wait = None;
                        *next = (i + 1) % n;
                        return std::task::Poll::Ready(Ok(i));
                    }
                }
                std::task::Poll::Pending
            })
            .await;
            match readable {
                Ok(i) => self.read_udp(i),
                Err(item) => return item,
            }
        }
    }

    /// What has arrived already, without waiting.
    pub fn try_recv(&mut self) -> Option<Incoming> {
        if let Some(item) = self.ready.pop_front() {
            return Some(item);
        }
        if let Ok(item) = self.queue.try_recv() {
            return Some(item);
        }
        if !self.shut.load(Ordering::Relaxed) {
            for i in 0..self.udp.len() {
                self.read_udp(i);
            }
        }
        self.ready.pop_front()
    }

    /// Reads what socket `i` holds, up to a batch, into `ready`.
    fn read_udp(&mut self, i: usize) {
        use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
        use std::os::fd::AsRawFd;
        let UdpIn {
            local, sock, batch, ..
        } = &mut self.udp[i];
        let batch_now = *batch;
        let mut received = Vec::new();
        let read = {
            let mut slots: Vec<[io::IoSliceMut<'_>; 1]> = self
                .buf
                .chunks_mut(UDP_SLOT)
                .take(batch_now)
                .map(|slot| [io::IoSliceMut::new(slot)])
                .collect();
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(batch_now, None);
            sock.try_io(tokio::io::Interest::READABLE, || {
                let msgs = recvmmsg(
                    sock.as_raw_fd(),
                    &mut headers,
                    slots.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                )?;
                received.extend(
                    msgs.map(|m| (m.bytes, m.address.as_ref().and_then(icmp::socket_addr))),
                );
                // A short read emptied the socket: said as WouldBlock, tokio forgets the
                // readiness, so the next look waits for new data instead of costing a system
                // call to find none (a datagram arriving meanwhile sets it again).
                if received.len() < batch_now {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            })
        };
        // Batches grow while reads fill them and shrink when traffic is light: each read
        // prepares (and clears) room for a whole batch.
        *batch = (received.len() * 2).clamp(UDP_MIN_BATCH, UDP_BATCH);
        // A queued ICMP error sets ERROR readiness only (no EPOLLIN): drain it here, and clear
        // that readiness (tokio's try_io with a combined interest never runs its closure).
        let ready = &mut self.ready;
        let _ = sock.try_io(tokio::io::Interest::ERROR, || {
            ready.extend(icmp_reports(sock, *local));
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        match read {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // ICMP errors for earlier sends surface here (IP_RECVERR): each names the
            // destination that could not be reached.
            Err(e) => {
                debug!(%local, error = %e, "UDP receive error");
                self.ready.extend(icmp_reports(sock, *local));
                return;
            }
        }
        for ((n, remote), slot) in received.into_iter().zip(self.buf.chunks(UDP_SLOT)) {
            let (Some(remote), data) = (remote, &slot[..n]) else {
                continue;
            };
            if data.iter().all(|&b| matches!(b, b'\r' | b'\n')) {
                continue; // CRLF keep-alive
            }
            let flow = Flow {
                transport: Transport::Udp,
                local: *local,
                remote,
                conn: None,
            };
            let message = Message::parse(Bytes::copy_from_slice(data));
            self.ready
                .push_back(Incoming::Message(Received { message, flow }));
        }
    }
}

async fn accept_loop(
    transport: SipTransport,
    listener: TcpListener,
    kind: Transport,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        match &tls {
            None => {
                transport.register(stream, kind, local, remote);
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let transport = transport.clone();
                let handshake_timeout = transport.inner.options.connect_timeout * 5;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            transport.register(tls, Transport::Tls, local, remote);
                        }
                        Ok(Err(e)) => debug!(%remote, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%remote, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Bytes>,
    timeout: Duration,
) -> String {
    while let Some(bytes) = rx.recv().await {
        match tokio::time::timeout(timeout, wr.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return format!("write error: {e}"),
            Err(_) => return "peer not reading: write timed out".to_string(),
        }
    }
    let _ = wr.shutdown().await;
    "no more to send".to_string()
}

/// Reads a stream, cutting it into messages by Content-Length (STYLE.md: mini-redis framing).
/// Anything that cannot be framed or parsed closes this connection and no other.
async fn read_loop<R: AsyncRead + Unpin>(transport: SipTransport, mut rd: R, flow: Flow) -> String {
    let mut buf = BytesMut::with_capacity(8192);
    let idle = transport.inner.options.stream_idle_timeout;
    // Framing resumes where it stopped, so a peer that trickles bytes costs linear time.
    let mut scan = FrameScan::default();
    'conn: loop {
        loop {
            match stream_frame_resume(&buf, &mut scan) {
                Ok(Frame::Incomplete) => break,
                Ok(Frame::KeepAlive { len, ping }) => {
                    scan = FrameScan::default();
                    let _ = buf.split_to(len);
                    if ping {
                        // RFC 5626 §3.5.1: a double CRLF ping gets a single CRLF pong.
                        let _ = transport.send_nowait(flow, Bytes::from_static(b"\r\n"));
                    }
                }
                Ok(Frame::Message { len }) => {
                    scan = FrameScan::default();
                    let frame = buf.split_to(len).freeze();
                    let message = Message::parse(frame);
                    if let Err(e) = &message
                        && e.request.is_none()
                    {
                        break 'conn format!("unparseable message: {}", e.reason);
                    }
                    if transport
                        .inner
                        .incoming
                        .send(Incoming::Message(Received { message, flow }))
                        .await
                        .is_err()
                    {
                        break 'conn "shutting down".to_string();
                    }
                }
                Err(reason) => break 'conn format!("cannot frame: {reason}"),
            }
        }
        if buf.len() > MAX_MESSAGE {
            break 'conn "message too large".to_string();
        }
        buf.reserve(4096);
        match tokio::time::timeout(idle, rd.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break 'conn "closed by peer".to_string(),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break 'conn format!("read error: {e}"),
            Err(_) => break 'conn "idle".to_string(),
        }
    }
}

/// Logs what was bound, one line per address, in a fixed format tests and operators can read:
/// `listening transport=udp addr=127.0.0.1:5060`.
pub fn log_bound(bound: &[ListenSpec]) {
    for b in bound {
        info!(transport = %b.transport.as_str().to_ascii_lowercase(), addr = %b.addr, "listening");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With IP_RECVERR, an ICMP error for one destination is reported by the next send to any
    /// destination. That send must still reach its own destination, and the error must be
    /// reported against the address it concerns.
    #[tokio::test]
    async fn an_icmp_error_for_one_peer_does_not_fail_a_send_to_another() {
        let spec: ListenSpec = "udp:127.0.0.1:0".parse().unwrap();
        let (transport, mut incoming) =
            SipTransport::bind(&[spec], None, TransportOptions::default())
                .await
                .unwrap();
        let local = transport.bound()[0].addr;
        let dead = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let live = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let flow = |remote| Flow {
            transport: Transport::Udp,
            local,
            remote,
            conn: None,
        };
        // Several rounds: the ICMP error arrives at its own pace.
        for round in 0..5 {
            transport
                .send_nowait(flow(dead), Bytes::from_static(b"OPTIONS dead"))
                .unwrap();
            // Block this (only) runtime thread so the receive loop cannot take the error
            // first: the service loop and the receive loop race like this in production.
            std::thread::sleep(Duration::from_millis(20));
            transport
                .send_nowait(
                    flow(live.local_addr().unwrap()),
                    Bytes::from(format!("live {round}")),
                )
                .expect("the send to the live peer is not blamed for the dead one");
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), live.recv(&mut buf))
                .await
                .expect("the live peer got its datagram")
                .unwrap();
            assert_eq!(&buf[..n], format!("live {round}").as_bytes());
        }
        let report = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match incoming.recv().await {
                    Some(Incoming::Unreachable(f)) => break f,
                    Some(_) => continue,
                    None => panic!("transport closed"),
                }
            }
        })
        .await
        .expect("the dead peer is reported unreachable");
        assert_eq!(report.remote, dead);
        transport.shutdown();
    }

    fn opts() -> TransportOptions {
        TransportOptions::default()
    }

    const OPT: &str = "OPTIONS sip:a@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK{N}\r\nFrom: <sip:b@c>;tag=1\r\nTo: <sip:a@d>\r\nCall-ID: c{N}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";

    /// Datagrams queued before the first read come out in order, keep-alives skipped, in
    /// reads that grow while they come back full.
    #[tokio::test]
    async fn one_read_takes_a_batch_of_datagrams_in_order() {
        let spec: ListenSpec = "udp:127.0.0.1:0".parse().unwrap();
        let (transport, mut inbox) = SipTransport::bind(&[spec], None, opts()).await.unwrap();
        let to = transport.bound()[0].addr;
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for n in 0..60 {
            if n == 2 {
                peer.send_to(b"\r\n\r\n", to).unwrap();
            }
            peer.send_to(OPT.replace("{N}", &n.to_string()).as_bytes(), to)
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut ids = Vec::new();
        let first = tokio::time::timeout(Duration::from_secs(2), inbox.recv())
            .await
            .unwrap()
            .unwrap();
        // The first read took the smallest batch (less the keep-alive), the next ones more.
        let left_after_first = inbox.ready.len();
        let mut push = |i: Incoming| match i {
            Incoming::Message(r) => ids.push(r.message.unwrap().call_id().to_string()),
            Incoming::Unreachable(_) => panic!("unreachable"),
        };
        push(first);
        let mut largest = 0;
        while let Some(i) = inbox.try_recv() {
            largest = largest.max(inbox.ready.len() + 1);
            push(i);
        }
        assert_eq!(left_after_first, UDP_MIN_BATCH - 2);
        assert_eq!(largest, UDP_BATCH, "the batch grew while reads filled it");
        let want: Vec<_> = (0..60).map(|n| format!("c{n}")).collect();
        assert_eq!(ids, want);
        // Emptied: the socket is not read again until a datagram comes.
        assert!(inbox.try_recv().is_none());
        assert_eq!(inbox.udp[0].batch, UDP_MIN_BATCH);
        transport.shutdown();
    }

    /// An ICMP port unreachable comes out of the Inbox itself when no later send picks it up.
    #[tokio::test]
    async fn an_icmp_error_alone_wakes_the_inbox() {
        let spec: ListenSpec = "udp:127.0.0.1:0".parse().unwrap();
        let (transport, mut inbox) = SipTransport::bind(&[spec], None, opts()).await.unwrap();
        let local = transport.bound()[0].addr;
        let dead = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        transport
            .send_nowait(
                Flow {
                    transport: Transport::Udp,
                    local,
                    remote: dead,
                    conn: None,
                },
                Bytes::from_static(b"OPTIONS dead"),
            )
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), inbox.recv())
            .await
            .expect("reported")
            .unwrap();
        match got {
            Incoming::Unreachable(f) => assert_eq!(f.remote, dead),
            Incoming::Message(_) => panic!("message"),
        }
        // The socket is still usable after the error.
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(OPT.replace("{N}", "9").as_bytes(), local)
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), inbox.recv())
            .await
            .expect("msg")
            .unwrap();
        assert!(matches!(got, Incoming::Message(_)));
        transport.shutdown();
    }

    /// With two UDP sockets and only `recv` (the agent's way of reading), a socket that never
    /// runs dry keeps the second from being read at all.
    #[tokio::test]
    async fn a_busy_socket_does_not_starve_another() {
        let specs: Vec<ListenSpec> = vec![
            "udp:127.0.0.1:0".parse().unwrap(),
            "udp:127.0.0.1:0".parse().unwrap(),
        ];
        let (transport, mut inbox) = SipTransport::bind(&specs, None, opts()).await.unwrap();
        let a = transport.bound()[0].addr;
        let b = transport.bound()[1].addr;
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let msg = OPT.replace("{N}", "a");
                // Bounded in count as well as by the test's stop.
                for _ in 0..500_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = peer.send_to(msg.as_bytes(), a);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        other
            .send_to(OPT.replace("{N}", "b").as_bytes(), b)
            .unwrap();
        let mut seen_b = None;
        let started = std::time::Instant::now();
        let mut n = 0u64;
        while started.elapsed() < Duration::from_secs(2) {
            let Ok(Some(Incoming::Message(r))) =
                tokio::time::timeout(Duration::from_millis(500), inbox.recv()).await
            else {
                break;
            };
            n += 1;
            if r.flow.local == b {
                seen_b = Some(n);
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        flood.join().unwrap();
        assert!(
            seen_b.is_some(),
            "second socket starved: {n} datagrams of the first handled, none of the second"
        );
        transport.shutdown();
    }
}
