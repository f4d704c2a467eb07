//! Locating SIP servers with DNS (RFC 3263 §4).
//!
//! Given the host part of a SIP or SIPS URI (plus its optional port and `transport`
//! parameter), [`SipResolver::resolve`] returns the ordered list of `(address, transport)`
//! [`Target`]s a client should try, one after the other, until one answers:
//!
//! * an IP literal is used as is, without any DNS query;
//! * a name with an explicit port is looked up with A/AAAA only;
//! * a name with a `transport` but no port is looked up with SRV for that transport, falling
//!   back to A/AAAA at the transport's default port when there are no SRV records;
//! * a bare name goes through NAPTR → SRV → A/AAAA, falling back to SRV for every transport
//!   and then to A/AAAA over UDP (TLS for `sips:`).
//!
//! SRV records are ordered by priority and, within a priority, by the weighted random
//! selection of RFC 2782, so that load is spread the way the domain owner asked for.
//!
//! Results are cached for the smallest TTL of the records they were built from (capped by
//! [`ResolveOptions::max_ttl`]); "no such server" answers are cached for
//! [`ResolveOptions::negative_ttl`]. The cache uses Tokio's clock. The underlying hickory
//! resolver's own cache is disabled so that this cache is the only one and TTLs behave
//! predictably.
//!
//! Names are always treated as fully qualified: the resolver's search list is never applied,
//! since a SIP URI names a host in the global DNS and search-list guesses would only add
//! queries (and surprises) to call setup.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::rdata::{NAPTR, SRV};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use rand::Rng;
use tokio::time::Instant;
use tracing::debug;

use crate::sip::transport::Transport;

/// Upper bound on the NAPTR records followed for one lookup; a hostile zone cannot make
/// us fan out into more queries than this.
const MAX_NAPTR: usize = 8;
/// Upper bound on the SRV targets resolved per SRV record set (after ordering).
const MAX_SRV_TARGETS: usize = 16;
/// How many lookups of one stage run at the same time.
const CONCURRENCY: usize = 4;
/// No cache entry lives longer than this, whatever the options say (keeps `Instant`
/// arithmetic far away from overflow).
const TTL_HARD_CAP: Duration = Duration::from_secs(7 * 24 * 3600);

/// One place to send a request: an address and the transport to use to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// IP address and port.
    pub addr: SocketAddr,
    /// Transport protocol to use towards `addr`.
    pub transport: Transport,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.transport, self.addr)
    }
}

/// What to resolve: the host part of a SIP URI and the URI details that matter to RFC 3263.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lookup<'a> {
    /// Host name, IPv4 address, or IPv6 address (with or without brackets).
    pub host: &'a str,
    /// Explicit port from the URI, if any.
    pub port: Option<u16>,
    /// `transport` URI parameter, if any.
    pub transport: Option<Transport>,
    /// Whether the URI is a `sips:` URI (TLS is then the only acceptable transport).
    pub secure: bool,
}

impl<'a> Lookup<'a> {
    /// A lookup for a plain `sip:` URI with only a host.
    pub fn host(host: &'a str) -> Self {
        Lookup {
            host,
            ..Lookup::default()
        }
    }
}

/// Why a SIP server could not be located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The lookup itself is malformed: not a host name or IP address, port 0, or a `sips:`
    /// URI with UDP as transport.
    #[error("invalid SIP target {host:?}: {reason}")]
    Invalid {
        /// The host as given.
        host: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// DNS answered, and there is no usable server: NXDOMAIN, no records, or SRV target `.`
    /// ("service decidedly not available"). Cached for [`ResolveOptions::negative_ttl`].
    #[error("no SIP server found for {host}")]
    NotFound {
        /// The host as given.
        host: String,
    },
    /// DNS could not answer: timeout, SERVFAIL/REFUSED, or a network error. This is
    /// transient and never cached; a later attempt may succeed.
    #[error("DNS lookup for {host} failed: {reason}")]
    Unavailable {
        /// The host as given.
        host: String,
        /// The first failure seen, for logs.
        reason: String,
    },
    /// The DNS resolver could not be set up (system configuration unreadable, no name
    /// servers given, ...).
    #[error("DNS resolver configuration: {0}")]
    Config(String),
}

impl ResolveError {
    /// Whether the error is transient (worth retrying later) rather than a definitive answer.
    pub fn is_transient(&self) -> bool {
        matches!(self, ResolveError::Unavailable { .. })
    }
}

/// Tuning knobs for [`SipResolver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOptions {
    /// Time to wait for one DNS answer. Default 2 s.
    pub timeout: Duration,
    /// How many times a query is sent before giving up (at least 1). Default 2.
    pub attempts: usize,
    /// Longest time a positive result is cached, whatever the record TTLs say. Default 1 h.
    pub max_ttl: Duration,
    /// How long "not found" is cached; also the cache time of results that are known to be
    /// incomplete because part of the lookup failed. Default 30 s.
    pub negative_ttl: Duration,
    /// Maximum number of cached results; 0 disables caching. Default 10 000.
    pub cache_capacity: usize,
    /// List a host's IPv6 addresses before its IPv4 ones (default: IPv4 first).
    pub prefer_ipv6: bool,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions {
            timeout: Duration::from_secs(2),
            attempts: 2,
            max_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(30),
            cache_capacity: 10_000,
            prefer_ipv6: false,
        }
    }
}

/// RFC 3263 server locator with a TTL-bounded result cache.
///
/// Cheap to clone: clones share the DNS client and the cache, so one instance serves the
/// whole process.
#[derive(Clone)]
pub struct SipResolver {
    inner: Arc<Inner>,
}

struct Inner {
    dns: TokioResolver,
    opts: ResolveOptions,
    cache: Mutex<Cache>,
}

impl fmt::Debug for SipResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SipResolver")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

impl SipResolver {
    /// Uses the system's DNS configuration (`/etc/resolv.conf` on Unix) with default options.
    /// The hosts file is consulted for addresses.
    ///
    /// # Errors
    ///
    /// [`ResolveError::Config`] if the system configuration cannot be read.
    pub fn from_system() -> Result<Self, ResolveError> {
        Self::from_system_with_options(ResolveOptions::default())
    }

    /// Uses the system's DNS configuration with the given options; timeouts and attempts
    /// from `opts` override those of the system configuration.
    pub fn from_system_with_options(opts: ResolveOptions) -> Result<Self, ResolveError> {
        let mut builder = TokioResolver::builder_tokio()
            .map_err(|e| ResolveError::Config(format!("system DNS configuration: {e}")))?;
        apply_options(builder.options_mut(), &opts);
        let dns = builder
            .build()
            .map_err(|e| ResolveError::Config(e.to_string()))?;
        Ok(Self::from_parts(dns, opts))
    }

    /// Uses only the given name servers (each over UDP, with TCP for truncated answers),
    /// with default options. The hosts file is not consulted.
    ///
    /// # Errors
    ///
    /// [`ResolveError::Config`] if `servers` is empty.
    pub fn with_nameservers(servers: &[SocketAddr]) -> Result<Self, ResolveError> {
        Self::with_nameservers_and_options(servers, ResolveOptions::default())
    }

    /// Uses only the given name servers, with the given options.
    pub fn with_nameservers_and_options(
        servers: &[SocketAddr],
        opts: ResolveOptions,
    ) -> Result<Self, ResolveError> {
        if servers.is_empty() {
            return Err(ResolveError::Config("no name servers given".into()));
        }
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                NameServerConfig::new(server.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        );
        let dns_opts = builder.options_mut();
        apply_options(dns_opts, &opts);
        // Only the servers we were given: no /etc/hosts either.
        dns_opts.use_hosts_file = ResolveHosts::Never;
        let dns = builder
            .build()
            .map_err(|e| ResolveError::Config(e.to_string()))?;
        Ok(Self::from_parts(dns, opts))
    }

    fn from_parts(dns: TokioResolver, opts: ResolveOptions) -> Self {
        let cache = Mutex::new(Cache::new(opts.cache_capacity));
        SipResolver {
            inner: Arc::new(Inner { dns, opts, cache }),
        }
    }

    /// The options this resolver was built with.
    pub fn options(&self) -> &ResolveOptions {
        &self.inner.opts
    }

    /// Forgets every cached result.
    pub fn clear_cache(&self) {
        self.inner.cache().clear();
    }

    /// RFC 3263 §4: the ordered, duplicate-free list of targets to try for a SIP URI's host.
    ///
    /// Never returns an empty list. Lookups that run into partial DNS failures return what
    /// was found and cache it only briefly. The NAPTR, SRV and address stages each take at
    /// most about `timeout × attempts` when the DNS server does not answer.
    ///
    /// # Errors
    ///
    /// [`ResolveError::Invalid`] for a malformed request, [`ResolveError::NotFound`] when DNS
    /// says there is no server, [`ResolveError::Unavailable`] when DNS could not be asked.
    pub async fn resolve(&self, req: &Lookup<'_>) -> Result<Vec<Target>, ResolveError> {
        let invalid = |reason| ResolveError::Invalid {
            host: req.host.to_owned(),
            reason,
        };
        if req.port == Some(0) {
            return Err(invalid("port 0"));
        }
        // RFC 3261 §26.2: a SIPS URI means TLS end to end; `transport=tcp` means TLS over TCP.
        let transport = match (req.secure, req.transport) {
            (true, Some(Transport::Udp)) => return Err(invalid("sips: URI with UDP transport")),
            (true, Some(_)) => Some(Transport::Tls),
            (_, t) => t,
        };
        let default_transport = if req.secure {
            Transport::Tls
        } else {
            Transport::Udp
        };

        let (name, key) = match parse_host(req.host).map_err(invalid)? {
            // §4.1/§4.2: a numeric host needs no DNS at all.
            Host::Ip(ip) => {
                let transport = transport.unwrap_or(default_transport);
                let port = req.port.unwrap_or(transport.default_port());
                return Ok(vec![Target {
                    addr: SocketAddr::new(ip, port),
                    transport,
                }]);
            }
            Host::Name(name) => {
                let key = CacheKey {
                    host: name.to_ascii().to_ascii_lowercase(),
                    port: req.port,
                    transport,
                    secure: req.secure,
                };
                (name, key)
            }
        };

        if let Some(hit) = self.inner.cache().get(&key, Instant::now()) {
            debug!(host = req.host, "SIP target lookup answered from cache");
            return match hit {
                Cached::Targets(targets) => Ok(targets),
                Cached::NotFound => Err(ResolveError::NotFound {
                    host: req.host.to_owned(),
                }),
            };
        }

        let found = self
            .inner
            .locate(&name, req.port, transport, default_transport, req.secure)
            .await;
        let opts = &self.inner.opts;
        let now = Instant::now();
        if !found.targets.is_empty() {
            let targets = dedup(found.targets);
            let mut ttl = Duration::from_secs(found.ttl.unwrap_or(0).into()).min(opts.max_ttl);
            if found.failure.is_some() {
                // Part of the lookup failed: use what we have, but ask again soon.
                ttl = ttl.min(opts.negative_ttl);
            }
            debug!(host = req.host, ?targets, ?ttl, "SIP targets resolved");
            self.inner
                .cache()
                .insert(key, Cached::Targets(targets.clone()), ttl, now);
            Ok(targets)
        } else if let Some(reason) = found.failure {
            debug!(host = req.host, %reason, "SIP target lookup failed");
            Err(ResolveError::Unavailable {
                host: req.host.to_owned(),
                reason,
            })
        } else {
            debug!(host = req.host, "no SIP target found");
            self.inner
                .cache()
                .insert(key, Cached::NotFound, opts.negative_ttl, now);
            Err(ResolveError::NotFound {
                host: req.host.to_owned(),
            })
        }
    }
}

fn apply_options(dns: &mut ResolverOpts, opts: &ResolveOptions) {
    dns.timeout = opts.timeout.max(Duration::from_millis(1));
    // hickory counts retries after the first try.
    dns.attempts = opts.attempts.max(1) - 1;
    // Our cache is keyed by the whole RFC 3263 lookup and follows Tokio's clock; a second
    // cache underneath (on the std clock) would serve records past the TTLs we computed.
    dns.cache_size = 0;
    // SRV answers can be large; fall back to TCP on truncation and on UDP trouble.
    dns.try_tcp_on_error = true;
}

/// What one query returned.
enum Answer {
    /// Records of the asked type, with the smallest TTL in the answer.
    Records(Vec<RData>, u32),
    /// NXDOMAIN or no records of that type: a definitive "no".
    Absent,
    /// No usable answer (timeout, SERVFAIL, ...).
    Failed(String),
}

/// Targets found by one branch of the search, plus what the cache needs to know about them.
#[derive(Debug, Default)]
struct Found {
    targets: Vec<Target>,
    /// Smallest TTL of the records the targets were built from.
    ttl: Option<u32>,
    /// First transient failure seen: the targets may be incomplete.
    failure: Option<String>,
}

impl Found {
    fn note_ttl(&mut self, ttl: u32) {
        self.ttl = Some(self.ttl.map_or(ttl, |t| t.min(ttl)));
    }

    fn note_failure(&mut self, reason: String) {
        self.failure.get_or_insert(reason);
    }

    fn merge(&mut self, other: Found) {
        self.targets.extend(other.targets);
        if let Some(ttl) = other.ttl {
            self.note_ttl(ttl);
        }
        if let Some(reason) = other.failure {
            self.note_failure(reason);
        }
    }
}

/// Result of one SRV record set lookup.
struct SrvFound {
    found: Found,
    /// Whether an SRV record set exists at all (even if it only says "not available"); RFC
    /// 3263 falls back to A/AAAA only when there is none.
    exists: bool,
}

impl Inner {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        // The cache holds no invariant a panic elsewhere could break; keep going.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// RFC 3263 §4.1–4.2 for a host name.
    async fn locate(
        &self,
        name: &Name,
        port: Option<u16>,
        transport: Option<Transport>,
        default_transport: Transport,
        secure: bool,
    ) -> Found {
        match (port, transport) {
            // An explicit port rules out NAPTR and SRV.
            (Some(port), t) => {
                self.resolve_host(name, port, t.unwrap_or(default_transport))
                    .await
            }
            (None, Some(t)) => {
                let srv = self.resolve_srv(name, t).await;
                if srv.exists || !srv.found.targets.is_empty() || srv.found.failure.is_some() {
                    return srv.found;
                }
                self.resolve_host(name, t.default_port(), t).await
            }
            (None, None) => {
                let naptr = self.resolve_naptr(name, secure).await;
                if !naptr.targets.is_empty() {
                    return naptr;
                }
                // Keep NAPTR trouble on record: a "nothing found" would not be definitive.
                let mut found = Found {
                    failure: naptr.failure,
                    ..Found::default()
                };
                // §4.1: no usable NAPTR → SRV for every acceptable transport, in order of
                // preference; all that exist are listed.
                let transports: &[Transport] = if secure {
                    &[Transport::Tls]
                } else {
                    &[Transport::Udp, Transport::Tcp, Transport::Tls]
                };
                let results = join_limited(
                    transports
                        .iter()
                        .map(|&t| self.resolve_srv(name, t))
                        .collect(),
                )
                .await;
                let mut any_srv = false;
                let mut srv_failed = false;
                for srv in results {
                    any_srv |= srv.exists;
                    srv_failed |= srv.found.failure.is_some();
                    found.merge(srv.found);
                }
                // Fall back to A/AAAA only on a definitive "no SRV at all": a timed-out SRV
                // query may hide the real servers, and the domain's plain address record is
                // often not a SIP server at all.
                if found.targets.is_empty() && !any_srv && !srv_failed {
                    let t = default_transport;
                    found.merge(self.resolve_host(name, t.default_port(), t).await);
                }
                found
            }
        }
    }

    /// NAPTR lookup (§4.1) and the SRV lookups of the usable records, in order.
    async fn resolve_naptr(&self, name: &Name, secure: bool) -> Found {
        let (records, ttl) = match self.query(name, RecordType::NAPTR).await {
            Answer::Records(records, ttl) => (records, ttl),
            Answer::Absent => return Found::default(),
            Answer::Failed(reason) => {
                return Found {
                    failure: Some(reason),
                    ..Found::default()
                };
            }
        };
        let mut usable: Vec<(&NAPTR, Transport)> = records
            .iter()
            .filter_map(|rdata| match rdata {
                RData::NAPTR(naptr) => naptr_transport(naptr, secure).map(|t| (naptr, t)),
                _ => None,
            })
            .collect();
        usable.sort_by_key(|(n, _)| (n.order, n.preference));
        usable.dedup_by(|a, b| a.0.replacement == b.0.replacement && a.1 == b.1);
        usable.truncate(MAX_NAPTR);
        if usable.is_empty() {
            return Found::default();
        }

        let lookups = usable
            .iter()
            .map(|&(naptr, t)| self.resolve_srv_at(naptr.replacement.clone(), t))
            .collect();
        let mut found = Found::default();
        for srv in join_limited(lookups).await {
            found.merge(srv.found);
        }
        if !found.targets.is_empty() {
            found.note_ttl(ttl);
        }
        found
    }

    /// SRV lookup of `_sip._udp.<name>` & co for one transport.
    async fn resolve_srv(&self, name: &Name, transport: Transport) -> SrvFound {
        match srv_name(name, transport) {
            Some(srv) => self.resolve_srv_at(srv, transport).await,
            // Too long to prefix: there cannot be such a record.
            None => SrvFound {
                found: Found::default(),
                exists: false,
            },
        }
    }

    /// SRV lookup of an owner name, then A/AAAA for each target in RFC 2782 order.
    async fn resolve_srv_at(&self, srv_name: Name, transport: Transport) -> SrvFound {
        let (records, ttl) = match self.query(&srv_name, RecordType::SRV).await {
            Answer::Records(records, ttl) => (records, ttl),
            Answer::Absent => {
                return SrvFound {
                    found: Found::default(),
                    exists: false,
                };
            }
            Answer::Failed(reason) => {
                return SrvFound {
                    found: Found {
                        failure: Some(reason),
                        ..Found::default()
                    },
                    exists: false,
                };
            }
        };
        let srvs: Vec<&SRV> = records
            .iter()
            .filter_map(|rdata| match rdata {
                RData::SRV(srv) => Some(srv),
                _ => None,
            })
            .collect();
        let keys: Vec<(u16, u16)> = srvs.iter().map(|s| (s.priority, s.weight)).collect();
        let order = srv_order(&keys, &mut rand::rng());
        let lookups: Vec<_> = order
            .into_iter()
            .filter_map(|i| srvs.get(i).copied())
            // Target "." means "service decidedly not available" (RFC 2782); port 0 is
            // unreachable anyway.
            .filter(|srv| !srv.target.is_root() && srv.port != 0)
            .take(MAX_SRV_TARGETS)
            .map(|srv| self.resolve_host(&srv.target, srv.port, transport))
            .collect();

        let mut found = Found::default();
        for host in join_limited(lookups).await {
            found.merge(host);
        }
        if !found.targets.is_empty() {
            found.note_ttl(ttl);
        }
        SrvFound {
            found,
            exists: true,
        }
    }

    /// A and AAAA lookups of one host; all its addresses, in the preferred family order.
    async fn resolve_host(&self, name: &Name, port: u16, transport: Transport) -> Found {
        let (v4, v6) = tokio::join!(
            self.query(name, RecordType::A),
            self.query(name, RecordType::AAAA)
        );
        let answers = if self.opts.prefer_ipv6 {
            [v6, v4]
        } else {
            [v4, v6]
        };
        let mut found = Found::default();
        for answer in answers {
            match answer {
                Answer::Records(records, ttl) => {
                    found.note_ttl(ttl);
                    found.targets.extend(records.iter().filter_map(|rdata| {
                        let ip = match rdata {
                            RData::A(a) => IpAddr::V4(a.0),
                            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                            _ => return None,
                        };
                        Some(Target {
                            addr: SocketAddr::new(ip, port),
                            transport,
                        })
                    }));
                }
                Answer::Absent => {}
                Answer::Failed(reason) => found.note_failure(reason),
            }
        }
        found
    }

    /// One DNS query, reduced to what RFC 3263 cares about.
    async fn query(&self, name: &Name, rtype: RecordType) -> Answer {
        match self.dns.lookup(name.clone(), rtype).await {
            Ok(lookup) => {
                let records: Vec<RData> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .map(|r| r.data.clone())
                    .collect();
                if records.is_empty() {
                    return Answer::Absent;
                }
                // CNAMEs on the way count too: the answer is only as fresh as its weakest link.
                let ttl = lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(0);
                Answer::Records(records, ttl)
            }
            Err(e) if e.is_no_records_found() => Answer::Absent,
            Err(e) => {
                debug!(%name, %rtype, error = %e, "DNS query failed");
                Answer::Failed(format!("{rtype} {name}: {e}"))
            }
        }
    }
}

/// The transport a NAPTR record offers, if it is one RFC 3263 §4.1 lets us use.
fn naptr_transport(naptr: &NAPTR, secure: bool) -> Option<Transport> {
    // Only terminal "s" records lead to SRV; other flags belong to other applications.
    if !naptr.flags.eq_ignore_ascii_case(b"s") || naptr.replacement.is_root() {
        return None;
    }
    let services = &naptr.services;
    let transport = if services.eq_ignore_ascii_case(b"SIP+D2U") {
        Transport::Udp
    } else if services.eq_ignore_ascii_case(b"SIP+D2T") {
        Transport::Tcp
    } else if services.eq_ignore_ascii_case(b"SIPS+D2T") {
        Transport::Tls
    } else {
        return None;
    };
    (!secure || transport == Transport::Tls).then_some(transport)
}

/// `_sip._udp.<name>`, `_sip._tcp.<name>` or `_sips._tcp.<name>`.
fn srv_name(name: &Name, transport: Transport) -> Option<Name> {
    let (service, proto) = match transport {
        Transport::Udp => ("_sip", "_udp"),
        Transport::Tcp => ("_sip", "_tcp"),
        Transport::Tls => ("_sips", "_tcp"),
    };
    name.prepend_label(proto).ok()?.prepend_label(service).ok()
}

/// RFC 2782 ordering of SRV records given as `(priority, weight)`: returns indexes into
/// `keys`, priorities ascending, and within a priority the weighted random selection.
fn srv_order<R: Rng + ?Sized>(keys: &[(u16, u16)], rng: &mut R) -> Vec<usize> {
    let mut sorted: Vec<usize> = (0..keys.len()).collect();
    // Within a priority, weight-0 records go first, as RFC 2782 requires: they are then
    // picked only when the random number is 0 (or when nothing else is left).
    sorted.sort_by_key(|&i| (keys[i].0, keys[i].1 != 0));

    let mut order = Vec::with_capacity(keys.len());
    for group in sorted.chunk_by(|&a, &b| keys[a].0 == keys[b].0) {
        let mut pool = group.to_vec();
        while !pool.is_empty() {
            let total: u64 = pool.iter().map(|&i| u64::from(keys[i].1)).sum();
            let pick = rng.random_range(0..=total);
            let mut running = 0;
            let chosen = pool
                .iter()
                .position(|&i| {
                    running += u64::from(keys[i].1);
                    running >= pick
                })
                .unwrap_or(0);
            // `remove` keeps the rest in place, so weight-0 records stay at the front.
            order.push(pool.remove(chosen));
        }
    }
    order
}

/// Drops repeated `(address, transport)` pairs, keeping the first occurrence.
fn dedup(targets: Vec<Target>) -> Vec<Target> {
    let mut seen = std::collections::HashSet::with_capacity(targets.len());
    targets.into_iter().filter(|t| seen.insert(*t)).collect()
}

/// Runs futures with at most `limit` of them in progress, returning outputs in input order.
///
/// Futures only start when first polled, so the unstarted ones simply wait their turn.
async fn join_limited<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let limit = CONCURRENCY;
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut started = 0;
    std::future::poll_fn(|cx| {
        let mut active = 0;
        for (i, (future, output)) in futures.iter_mut().zip(outputs.iter_mut()).enumerate() {
            if output.is_some() {
                continue;
            }
            if i >= started {
                if active >= limit {
                    break;
                }
                started = i + 1;
            }
            match future.as_mut().poll(cx) {
                Poll::Ready(value) => *output = Some(value),
                Poll::Pending => active += 1,
            }
        }
        if outputs.iter().all(Option::is_some) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// A host as written in a URI.
enum Host {
    Ip(IpAddr),
    Name(Name),
}

/// Tells IP literals from names, and checks names enough that garbage never reaches DNS.
fn parse_host(host: &str) -> Result<Host, &'static str> {
    if let Some(inner) = host.strip_prefix('[') {
        return inner
            .strip_suffix(']')
            .and_then(|v6| v6.parse::<Ipv6Addr>().ok())
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .ok_or("malformed IPv6 reference");
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let bare = host.strip_suffix('.').unwrap_or(host);
    if bare.is_empty() {
        return Err("empty host");
    }
    if bare.len() > 253 {
        return Err("host name too long");
    }
    for label in bare.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("malformed host name");
        }
        // RFC 3261 hostname characters, plus '_' seen in the wild and non-ASCII for IDNs.
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
        {
            return Err("invalid character in host name");
        }
    }
    let parsed = if bare.is_ascii() {
        Name::from_ascii(bare)
    } else {
        Name::from_utf8(bare)
    };
    let mut name = parsed.map_err(|_| "malformed host name")?;
    name.set_fqdn(true);
    Ok(Host::Name(name))
}

/// One RFC 3263 lookup, as cached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    /// Lower-cased ASCII (punycode) form of the name.
    host: String,
    port: Option<u16>,
    transport: Option<Transport>,
    secure: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cached {
    Targets(Vec<Target>),
    NotFound,
}

#[derive(Debug)]
struct CacheEntry {
    value: Cached,
    stored: Instant,
    expires: Instant,
}

/// A bounded map of lookup results with expiry times.
#[derive(Debug)]
struct Cache {
    entries: std::collections::HashMap<CacheKey, CacheEntry>,
    capacity: usize,
}

impl Cache {
    fn new(capacity: usize) -> Self {
        Cache {
            entries: std::collections::HashMap::new(),
            capacity,
        }
    }

    fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Cached> {
        let entry = self.entries.get(key)?;
        if now < entry.expires {
            return Some(entry.value.clone());
        }
        self.entries.remove(key);
        None
    }

    fn insert(&mut self, key: CacheKey, value: Cached, ttl: Duration, now: Instant) {
        if self.capacity == 0 || ttl.is_zero() {
            return;
        }
        let Some(expires) = now.checked_add(ttl.min(TTL_HARD_CAP)) else {
            return;
        };
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, e| now < e.expires);
            if self.entries.len() >= self.capacity {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.stored)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(
            key,
            CacheEntry {
                value,
                stored: now,
                expires,
            },
        );
    }

    fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn v4(s: &str, port: u16, transport: Transport) -> Target {
        Target {
            addr: SocketAddr::new(s.parse().unwrap(), port),
            transport,
        }
    }

    #[test]
    fn srv_order_sorts_by_priority() {
        let keys = [(30, 5), (10, 5), (20, 5), (10, 0)];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let order = srv_order(&keys, &mut rng);
            let prios: Vec<u16> = order.iter().map(|&i| keys[i].0).collect();
            assert_eq!(prios, [10, 10, 20, 30]);
        }
    }

    #[test]
    fn srv_order_weights_90_10() {
        let keys = [(10, 90), (10, 10), (20, 0)];
        let mut rng = StdRng::seed_from_u64(7);
        let samples = 20_000;
        let mut heavy_first = 0;
        for _ in 0..samples {
            let order = srv_order(&keys, &mut rng);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], 2, "lower priority always last");
            if order[0] == 0 {
                heavy_first += 1;
            }
        }
        // Expected 91/101 ≈ 0.901 (the pick is uniform over 0..=100).
        let share = f64::from(heavy_first) / f64::from(samples);
        assert!((0.88..0.92).contains(&share), "share {share}");
    }

    #[test]
    fn srv_order_weight_zero_rarely_first() {
        // RFC 2782: a weight-0 record is picked first only when the random number is 0.
        let keys = [(1, 0), (1, 99)];
        let mut rng = StdRng::seed_from_u64(3);
        let zero_first = (0..10_000)
            .filter(|_| srv_order(&keys, &mut rng)[0] == 0)
            .count();
        assert!((50..=200).contains(&zero_first), "{zero_first}");
    }

    #[test]
    fn srv_order_all_zero_weights_keep_listed_order() {
        let keys = [(5, 0), (5, 0), (5, 0)];
        let mut rng = StdRng::seed_from_u64(9);
        assert_eq!(srv_order(&keys, &mut rng), [0, 1, 2]);
    }

    #[test]
    fn srv_order_handles_edge_cases() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(srv_order(&[], &mut rng).is_empty());
        let keys = vec![(u16::MAX, u16::MAX); 300];
        let mut order = srv_order(&keys, &mut rng);
        order.sort_unstable();
        assert_eq!(order, (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn parse_host_kinds() {
        assert!(matches!(
            parse_host("192.0.2.1"),
            Ok(Host::Ip(IpAddr::V4(_)))
        ));
        assert!(matches!(parse_host("::1"), Ok(Host::Ip(IpAddr::V6(_)))));
        assert!(matches!(
            parse_host("[2001:db8::1]"),
            Ok(Host::Ip(IpAddr::V6(_)))
        ));
        assert!(matches!(parse_host("example.com"), Ok(Host::Name(_))));
        assert!(matches!(parse_host("Example.COM."), Ok(Host::Name(n)) if n.is_fqdn()));
        assert!(matches!(parse_host("bücher.example"), Ok(Host::Name(_))));
        for bad in [
            "",
            ".",
            "[::1",
            "[192.0.2.1]",
            "a..b",
            ".a",
            "a b",
            "a/b",
            "user@host",
            "host:5060",
            "fe80::1%eth0",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            assert!(parse_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn srv_names() {
        let name = Name::from_ascii("example.com.").unwrap();
        let got: Vec<String> = [Transport::Udp, Transport::Tcp, Transport::Tls]
            .into_iter()
            .map(|t| srv_name(&name, t).unwrap().to_ascii())
            .collect();
        assert_eq!(
            got,
            [
                "_sip._udp.example.com.",
                "_sip._tcp.example.com.",
                "_sips._tcp.example.com."
            ]
        );
    }

    #[test]
    fn naptr_filtering() {
        let naptr = |flags: &str, services: &str, replacement: &str| {
            NAPTR::new(
                10,
                10,
                flags.as_bytes().into(),
                services.as_bytes().into(),
                Box::default(),
                Name::from_ascii(replacement).unwrap(),
            )
        };
        let t = |flags, services, secure| {
            naptr_transport(&naptr(flags, services, "_sip._udp.x."), secure)
        };
        assert_eq!(t("s", "SIP+D2U", false), Some(Transport::Udp));
        assert_eq!(t("S", "sip+d2t", false), Some(Transport::Tcp));
        assert_eq!(t("s", "SIPS+D2T", false), Some(Transport::Tls));
        assert_eq!(t("s", "SIPS+D2T", true), Some(Transport::Tls));
        assert_eq!(t("s", "SIP+D2U", true), None);
        assert_eq!(t("s", "SIP+D2S", false), None);
        assert_eq!(t("u", "SIP+D2U", false), None);
        assert_eq!(t("", "SIP+D2U", false), None);
        assert_eq!(t("s", "E2U+sip", false), None);
        assert_eq!(naptr_transport(&naptr("s", "SIP+D2U", "."), false), None);
    }

    #[test]
    fn dedup_keeps_first() {
        let a = v4("127.0.0.1", 5060, Transport::Udp);
        let b = v4("127.0.0.1", 5060, Transport::Tcp);
        let c = v4("127.0.0.2", 5060, Transport::Udp);
        assert_eq!(dedup(vec![a, b, a, c, b, c]), [a, b, c]);
    }

    fn key(host: &str) -> CacheKey {
        CacheKey {
            host: host.into(),
            port: None,
            transport: None,
            secure: false,
        }
    }

    #[test]
    fn cache_expires_by_ttl() {
        let mut cache = Cache::new(10);
        let t0 = Instant::now();
        let value = Cached::Targets(vec![v4("127.0.0.1", 5060, Transport::Udp)]);
        cache.insert(key("a"), value.clone(), Duration::from_secs(2), t0);
        cache.insert(key("b"), Cached::NotFound, Duration::from_secs(30), t0);
        assert_eq!(
            cache.get(&key("a"), t0 + Duration::from_secs(1)),
            Some(value)
        );
        assert_eq!(cache.get(&key("a"), t0 + Duration::from_secs(2)), None);
        assert_eq!(
            cache.get(&key("b"), t0 + Duration::from_secs(29)),
            Some(Cached::NotFound)
        );
        assert_eq!(cache.get(&key("b"), t0 + Duration::from_secs(31)), None);
        assert!(cache.entries.is_empty());
    }

    #[test]
    fn cache_zero_ttl_or_capacity_stores_nothing() {
        let t0 = Instant::now();
        let mut cache = Cache::new(10);
        cache.insert(key("a"), Cached::NotFound, Duration::ZERO, t0);
        assert_eq!(cache.get(&key("a"), t0), None);
        let mut disabled = Cache::new(0);
        disabled.insert(key("a"), Cached::NotFound, Duration::from_secs(9), t0);
        assert_eq!(disabled.get(&key("a"), t0), None);
        // An absurd TTL is capped rather than overflowing the clock.
        cache.insert(key("b"), Cached::NotFound, Duration::MAX, t0);
        assert_eq!(
            cache.get(&key("b"), t0 + Duration::from_secs(3600)),
            Some(Cached::NotFound)
        );
    }

    #[test]
    fn cache_is_bounded() {
        let t0 = Instant::now();
        let mut cache = Cache::new(3);
        let s = Duration::from_secs;
        cache.insert(key("a"), Cached::NotFound, s(100), t0);
        cache.insert(key("b"), Cached::NotFound, s(1), t0 + s(1));
        cache.insert(key("c"), Cached::NotFound, s(100), t0 + s(2));
        // Full: the expired "b" goes first.
        cache.insert(key("d"), Cached::NotFound, s(100), t0 + s(3));
        assert_eq!(cache.entries.len(), 3);
        assert!(cache.get(&key("a"), t0 + s(3)).is_some());
        // Full, nothing expired: the oldest ("a") goes.
        cache.insert(key("e"), Cached::NotFound, s(100), t0 + s(4));
        assert_eq!(cache.entries.len(), 3);
        assert!(cache.get(&key("a"), t0 + s(4)).is_none());
        for k in ["c", "d", "e"] {
            assert!(cache.get(&key(k), t0 + s(4)).is_some(), "{k}");
        }
        // Replacing an existing key evicts nothing.
        cache.insert(key("c"), Cached::NotFound, s(100), t0 + s(5));
        assert_eq!(cache.entries.len(), 3);
    }

    #[tokio::test]
    async fn join_limited_keeps_order_and_limits_concurrency() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let active = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let futures: Vec<_> = (0..20u64)
            .map(|i| {
                let (active, peak) = (&active, &peak);
                async move {
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20 - i)).await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    i
                }
            })
            .collect();
        let out = join_limited(futures).await;
        assert_eq!(out, (0..20).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= CONCURRENCY);
        assert!(
            join_limited(Vec::<std::future::Ready<()>>::new())
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn invalid_lookups_are_rejected_without_dns() {
        // 192.0.2.1 is TEST-NET-1: nothing is ever sent there, the checks fail first.
        let resolver = SipResolver::with_nameservers(&["192.0.2.1:53".parse().unwrap()]).unwrap();
        for req in [
            Lookup {
                port: Some(0),
                ..Lookup::host("example.com")
            },
            Lookup {
                secure: true,
                transport: Some(Transport::Udp),
                ..Lookup::host("example.com")
            },
            Lookup::host("not a host"),
            Lookup::host(""),
        ] {
            let err = resolver.resolve(&req).await.unwrap_err();
            assert!(matches!(err, ResolveError::Invalid { .. }), "{err:?}");
        }
    }

    #[tokio::test]
    async fn ip_literals_follow_uri_defaults() {
        let resolver = SipResolver::with_nameservers(&["192.0.2.1:53".parse().unwrap()]).unwrap();
        let one = |req: Lookup<'static>| {
            let resolver = resolver.clone();
            async move { resolver.resolve(&req).await.unwrap() }
        };
        assert_eq!(
            one(Lookup::host("192.0.2.7")).await,
            [v4("192.0.2.7", 5060, Transport::Udp)]
        );
        assert_eq!(
            one(Lookup {
                secure: true,
                ..Lookup::host("192.0.2.7")
            })
            .await,
            [v4("192.0.2.7", 5061, Transport::Tls)]
        );
        assert_eq!(
            one(Lookup {
                secure: true,
                transport: Some(Transport::Tcp),
                port: Some(6000),
                ..Lookup::host("[::1]")
            })
            .await,
            [Target {
                addr: "[::1]:6000".parse().unwrap(),
                transport: Transport::Tls
            }]
        );
    }

    #[test]
    fn resolve_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let resolver = SipResolver::with_nameservers(&["192.0.2.1:53".parse().unwrap()]).unwrap();
        let req = Lookup::host("example.com");
        assert_send(&resolver.resolve(&req));
    }

    #[tokio::test]
    async fn system_configuration_loads_or_reports_an_error() {
        // Reads resolv.conf only; the lookup below is an IP literal, so nothing is sent.
        match SipResolver::from_system() {
            Ok(resolver) => assert_eq!(
                resolver.resolve(&Lookup::host("192.0.2.5")).await,
                Ok(vec![v4("192.0.2.5", 5060, Transport::Udp)])
            ),
            Err(e) => assert!(matches!(e, ResolveError::Config(_)), "{e:?}"),
        }
    }

    #[test]
    fn empty_nameserver_list_is_a_config_error() {
        assert!(matches!(
            SipResolver::with_nameservers(&[]),
            Err(ResolveError::Config(_))
        ));
    }
}
