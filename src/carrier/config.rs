//! The carrier's configuration: the `[carrier]` table of its TOML file.
//!
//! Reading the file is kept apart from parsing the text, so tests parse strings. Every key has
//! a named default and is documented in `config.example.toml`; a misspelt key is an error that
//! names it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::delivery_rule::{DeliveryConfig, FailoverSet};
use super::probe::ProbeConfig;
use super::proxy::{Cidr, Hop, Peer, ProxyConfig};
use super::registrar::RegistrarConfig;
use super::store::StoreLocation;
use crate::sip::digest::Algorithm;
use crate::sip::transaction::TimerConfig;
use crate::sip::transport::{ListenSpec, TransportOptions};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown or a value has the wrong type; the message
    /// names the key and the line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or inconsistent with another.
    #[error("{path}: carrier.{key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// The whole file: each program reads its own table; the agent's is not the carrier's concern.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    carrier: Option<CarrierConfig>,
    #[serde(rename = "agent")]
    _agent: Option<toml::Table>,
}

/// The `[carrier]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CarrierConfig {
    /// This trunk server's name, as its peers and the logs know it.
    pub name: String,
    /// The digest realm of every trunk group, the same on every trunk server: the stored HA1
    /// values depend on it.
    pub realm: String,
    /// SIP listen addresses: `udp:ADDR:PORT`, `tcp:ADDR:PORT`, `tls:ADDR:PORT`.
    pub sip_listen: Vec<String>,
    /// PEM certificate chain for TLS listeners.
    pub tls_certificate: Option<PathBuf>,
    /// PEM private key for TLS listeners.
    pub tls_private_key: Option<PathBuf>,
    /// Where this server keeps its state (bindings, call records, the embedded store).
    pub data_dir: PathBuf,
    /// A PostgreSQL URL (`postgres://user:password@host:port/database`) for a configuration
    /// shared by several trunk servers; empty: the embedded store in `data_dir`.
    pub store_url: String,
    /// Log filter (`info`, `debug`, `lifeline=debug,info`); `RUST_LOG` wins when set.
    pub log_level: String,
    /// RFC 3261 T1: round-trip estimate, first retransmission interval.
    pub t1_ms: u64,
    /// RFC 3261 T2: the longest retransmission interval.
    pub t2_ms: u64,
    /// RFC 3261 T4: how long a message may stay in the network.
    pub t4_ms: u64,
    /// RFC 3261 Timer D: how long an INVITE client transaction absorbs final-response
    /// retransmissions over UDP.
    pub timer_d_ms: u64,
    /// A TCP or TLS connection idle this long is closed.
    pub stream_idle_timeout_ms: u64,
    /// Threads that run the server (SIP receive loops, the SIP service, the API); 0: one per
    /// CPU core.
    pub worker_threads: usize,
    /// Registration expiry granted when a REGISTER names none, in seconds.
    pub default_expires_s: u32,
    /// Shorter registrations get 423 Interval Too Brief with this Min-Expires.
    pub min_expires_s: u32,
    /// Longer registrations are granted this.
    pub max_expires_s: u32,
    /// Contacts one trunk group may bind on this server.
    pub max_contacts: usize,
    /// Digest algorithms offered in challenges, most preferred first: "SHA-256", "MD5".
    pub digest_algorithms: Vec<String>,
    /// How long a digest nonce is good for before the answer is `stale`.
    pub nonce_lifetime_s: u64,
    /// Wrong digest answers from one source address, within `auth_failure_window_ms`, before
    /// that source is throttled.
    pub auth_failures_allowed: u32,
    pub auth_failure_window_ms: u64,
    /// How long a throttled source has its digest answers refused unchecked.
    pub auth_throttle_ms: u64,
    /// How often the customer configuration store is checked for changes.
    pub config_poll_ms: u64,
    /// Bindings reach this server's bindings file at most this long after they change.
    pub bindings_flush_ms: u64,
    /// Addresses or CIDR blocks (`"192.0.2.7"`, `"192.0.2.0/24"`, `"2001:db8::/32"`) from which
    /// initial requests (new calls) are accepted: the PSTN side. Others get 403.
    pub upstream: Vec<String>,
    /// A delivery target that answers nothing at all within this has failed.
    pub delivery_timer_ms: u64,
    /// A target that sent only 100 Trying, then neither ringing nor a final answer within this,
    /// has failed.
    pub setup_timer_ms: u64,
    /// RFC 3261 Timer C: how long a ringing target may go without a further answer.
    pub timer_c_ms: u64,
    /// Final statuses from a target that mean "not delivered, try the next one".
    pub failover_responses: Vec<u16>,
    /// The PSTN gateway failover numbers are sent to: a SIP URI with an IP address, e.g.
    /// `"sip:192.0.2.50:5060"`. Without one a failover number cannot be tried.
    pub pstn_gateway: Option<String>,
    /// The trunk servers in order (this one may be listed too: it is skipped by name), so
    /// every server can share one list. A call whose DID has no failover is passed to the
    /// next one that has not tried it.
    pub peers: Vec<PeerConfig>,
    /// How often each registered contact is sent an OPTIONS probe; 0: never.
    pub probe_interval_ms: u64,
    /// A probe with no final answer within this has missed.
    pub probe_timeout_ms: u64,
    /// Misses in a row before a contact is skipped for calls (until it answers again).
    pub probe_failures: u32,
    /// Where the provisioning API listens (`ADDR:PORT`); empty: no API. Plain HTTP only on a
    /// loopback address; anywhere else it needs `api_tls_certificate` and `api_tls_private_key`.
    pub api_listen: String,
    /// PEM certificate chain for the API's HTTPS.
    pub api_tls_certificate: Option<PathBuf>,
    /// PEM private key for the API's HTTPS.
    pub api_tls_private_key: Option<PathBuf>,
    /// Where Prometheus metrics are served (`ADDR:PORT`, `GET /metrics`, no token: keep it on
    /// loopback or a management network); empty: not served.
    pub metrics_listen: String,
    /// E.164 prefixes (`"+1"`, `"+4420"`) failover numbers set through the API must start
    /// with: a stolen token must not forward DIDs to premium numbers. Empty: the API accepts
    /// no failover number at all.
    pub failover_number_prefixes: Vec<String>,
    /// Call records (`lifeline-carrier calls`) older than this many days are deleted.
    pub call_record_days: u32,
    /// DNS servers (`"IP"` or `"IP:PORT"`) for RFC 3263 lookups of failover PBXs given by
    /// name; empty: the system's (`/etc/resolv.conf`).
    pub dns_servers: Vec<String>,
}

/// One `[[carrier.peers]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's `name`, as its own configuration says.
    pub name: String,
    /// Where calls passed to it go: a SIP URI with an IP address (`sip:192.0.2.20:5060`,
    /// `;transport=tcp` for TCP).
    pub uri: String,
    /// Addresses or CIDR blocks its requests come from, trusted as this peer (new calls and
    /// the mark of which servers tried a call); default: the address of `uri`.
    #[serde(default)]
    pub addresses: Vec<String>,
}

impl Default for CarrierConfig {
    fn default() -> Self {
        CarrierConfig {
            name: "trunk1".into(),
            realm: "lifeline".into(),
            sip_listen: vec!["udp:127.0.0.1:5060".into(), "tcp:127.0.0.1:5060".into()],
            tls_certificate: None,
            tls_private_key: None,
            data_dir: PathBuf::from("./lifeline-data"),
            store_url: String::new(),
            log_level: "info".into(),
            t1_ms: 500,
            t2_ms: 4000,
            t4_ms: 5000,
            timer_d_ms: 32_000,
            stream_idle_timeout_ms: 900_000,
            worker_threads: 0,
            default_expires_s: 3600,
            min_expires_s: 60,
            max_expires_s: 7200,
            max_contacts: 10,
            digest_algorithms: vec!["MD5".into()],
            nonce_lifetime_s: 300,
            auth_failures_allowed: 5,
            auth_failure_window_ms: 60_000,
            auth_throttle_ms: 60_000,
            config_poll_ms: 500,
            bindings_flush_ms: 200,
            upstream: Vec::new(),
            delivery_timer_ms: 2000,
            setup_timer_ms: 10_000,
            timer_c_ms: 180_000,
            failover_responses: FailoverSet::DEFAULT_CODES.to_vec(),
            pstn_gateway: None,
            peers: Vec::new(),
            probe_interval_ms: 30_000,
            probe_timeout_ms: 2000,
            probe_failures: 2,
            call_record_days: 30,
            api_listen: "127.0.0.1:8080".into(),
            api_tls_certificate: None,
            api_tls_private_key: None,
            metrics_listen: String::new(),
            failover_number_prefixes: Vec::new(),
            dns_servers: Vec::new(),
        }
    }
}

/// A checked configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub raw: CarrierConfig,
    pub listen: Vec<ListenSpec>,
    pub timers: TimerConfig,
    pub transport: TransportOptions,
    pub registrar: RegistrarConfig,
    pub proxy: ProxyConfig,
    pub probe: ProbeConfig,
    /// The provisioning API, if it is on.
    pub api: Option<ApiListen>,
    /// Where metrics are served, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

impl Settings {
    /// Where the configuration store is: `store_url`, or the embedded one in `data_dir`.
    pub fn store_location(&self) -> StoreLocation {
        if self.raw.store_url.is_empty() {
            StoreLocation::Embedded(self.raw.data_dir.clone())
        } else {
            StoreLocation::Postgres(self.raw.store_url.clone())
        }
    }
}

/// Where and how the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiListen {
    pub addr: std::net::SocketAddr,
    /// Certificate chain and private key (PEM) for HTTPS; `None`: plain HTTP on loopback.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl CarrierConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        file.carrier.unwrap_or_default().check(path)
    }

    /// Checks values and derives the typed settings.
    pub fn check(self, path: &Path) -> Result<Settings, ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        if self.name.trim().is_empty() || self.name.contains([',', ' ', '\t']) {
            return Err(invalid(
                "name",
                "must be non-empty, without commas or spaces (servers mark calls with it)".into(),
            ));
        }
        if self.realm.is_empty() || self.realm.contains(['"', '\\', '\r', '\n']) {
            return Err(invalid(
                "realm",
                "must be non-empty, without quotes or backslashes".into(),
            ));
        }
        if self.sip_listen.is_empty() {
            return Err(invalid("sip_listen", "needs at least one address".into()));
        }
        let listen = self
            .sip_listen
            .iter()
            .map(|s| s.parse::<ListenSpec>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("sip_listen", e))?;
        if let Some(l) = listen.iter().find(|l| l.addr.ip().is_unspecified()) {
            // The address goes into Via and Record-Route: peers must be able to reach it.
            return Err(invalid(
                "sip_listen",
                format!("`{l}`: name the address to listen on, not a wildcard"),
            ));
        }
        let has_tls = listen
            .iter()
            .any(|l| l.transport == crate::sip::transport::Transport::Tls);
        if has_tls && (self.tls_certificate.is_none() || self.tls_private_key.is_none()) {
            return Err(invalid(
                "tls_certificate",
                "a tls: listener needs tls_certificate and tls_private_key".into(),
            ));
        }
        for (key, v) in [
            ("t1_ms", self.t1_ms),
            ("t2_ms", self.t2_ms),
            ("t4_ms", self.t4_ms),
            ("stream_idle_timeout_ms", self.stream_idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        if self.t2_ms < self.t1_ms {
            return Err(invalid("t2_ms", "must not be less than t1_ms".into()));
        }
        for (key, v) in [
            ("nonce_lifetime_s", self.nonce_lifetime_s),
            ("config_poll_ms", self.config_poll_ms),
            ("bindings_flush_ms", self.bindings_flush_ms),
            ("auth_failure_window_ms", self.auth_failure_window_ms),
            ("max_contacts", self.max_contacts as u64),
            (
                "auth_failures_allowed",
                u64::from(self.auth_failures_allowed),
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        if self.min_expires_s > self.max_expires_s {
            return Err(invalid(
                "min_expires_s",
                "must not exceed max_expires_s".into(),
            ));
        }
        if !(self.min_expires_s..=self.max_expires_s).contains(&self.default_expires_s) {
            return Err(invalid(
                "default_expires_s",
                "must lie between min_expires_s and max_expires_s".into(),
            ));
        }
        let algorithms = self
            .digest_algorithms
            .iter()
            .map(|a| match a.parse::<Algorithm>() {
                Ok(alg) => Ok(alg),
                Err(_) => Err(invalid(
                    "digest_algorithms",
                    format!("`{a}`: use \"SHA-256\" or \"MD5\""),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(invalid("digest_algorithms", "needs at least one".into()));
        }
        let registrar = RegistrarConfig {
            realm: self.realm.clone(),
            default_expires: self.default_expires_s,
            min_expires: self.min_expires_s,
            max_expires: self.max_expires_s,
            max_contacts: self.max_contacts,
            algorithms,
            auth_failures_allowed: self.auth_failures_allowed,
            auth_failure_window: Duration::from_millis(self.auth_failure_window_ms),
            auth_throttle: Duration::from_millis(self.auth_throttle_ms),
        };
        let timers = TimerConfig {
            t1: Duration::from_millis(self.t1_ms),
            t2: Duration::from_millis(self.t2_ms),
            t4: Duration::from_millis(self.t4_ms),
            timer_d: Duration::from_millis(self.timer_d_ms),
        };
        for (key, v) in [
            ("delivery_timer_ms", self.delivery_timer_ms),
            ("setup_timer_ms", self.setup_timer_ms),
            ("timer_c_ms", self.timer_c_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        let upstream = self
            .upstream
            .iter()
            .map(|s| s.parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("upstream", e))?;
        let failover_set = FailoverSet::new(&self.failover_responses)
            .map_err(|e| invalid("failover_responses", e.to_string()))?;
        let pstn_gateway = match &self.pstn_gateway {
            Some(uri) => Some(Hop::parse(uri).map_err(|e| invalid("pstn_gateway", e))?),
            None => None,
        };
        let mut peers = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let name = p.name.trim();
            if name.is_empty() || name.contains([',', ' ', '\t']) {
                return Err(invalid(
                    "peers",
                    format!(
                        "entry {}: name must be non-empty, without commas or spaces",
                        i + 1
                    ),
                ));
            }
            if self.peers[..i].iter().any(|q| q.name == p.name) {
                return Err(invalid("peers", format!("`{name}` is listed twice")));
            }
            let hop = Hop::parse(&p.uri).map_err(|e| invalid("peers", format!("{name}: {e}")))?;
            // Listed under another name, this server would pass calls to itself.
            if p.name != self.name && listen.iter().any(|l| l.addr == hop.addr) {
                return Err(invalid(
                    "peers",
                    format!(
                        "`{name}` has this server's own address {}: list it as `{}`",
                        hop.addr, self.name
                    ),
                ));
            }
            let trusted = if p.addresses.is_empty() {
                vec![Cidr::host(hop.addr.ip())]
            } else {
                p.addresses
                    .iter()
                    .map(|a| a.parse::<Cidr>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| invalid("peers", format!("{name}: addresses: {e}")))?
            };
            peers.push(Peer {
                name: p.name.clone(),
                hop,
                trusted,
            });
        }
        let dns_servers = self
            .dns_servers
            .iter()
            .map(|s| {
                s.parse::<std::net::SocketAddr>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                    .map_err(|_| invalid("dns_servers", format!("`{s}` is not IP or IP:PORT")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let proxy = ProxyConfig {
            name: self.name.clone(),
            peers,
            pstn_gateway,
            dns_servers,
            upstream,
            delivery: DeliveryConfig {
                delivery_timer: Duration::from_millis(self.delivery_timer_ms),
                setup_timer: Duration::from_millis(self.setup_timer_ms),
                timer_c: Duration::from_millis(self.timer_c_ms),
                failover_set,
                ..DeliveryConfig::default()
            },
        };
        for (key, v) in [
            ("probe_timeout_ms", self.probe_timeout_ms),
            ("probe_failures", u64::from(self.probe_failures)),
            ("call_record_days", u64::from(self.call_record_days)),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        let api = if self.api_listen.is_empty() {
            None
        } else {
            let addr: std::net::SocketAddr = self.api_listen.parse().map_err(|_| {
                invalid(
                    "api_listen",
                    format!("`{}` is not ADDR:PORT", self.api_listen),
                )
            })?;
            let tls = match (&self.api_tls_certificate, &self.api_tls_private_key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        "api_tls_certificate",
                        "HTTPS needs both api_tls_certificate and api_tls_private_key".into(),
                    ));
                }
            };
            if tls.is_none() && !addr.ip().is_loopback() {
                return Err(invalid(
                    "api_listen",
                    format!(
                        "`{addr}` is not a loopback address: plain HTTP is only served on \
                         loopback; set api_tls_certificate and api_tls_private_key"
                    ),
                ));
            }
            Some(ApiListen { addr, tls })
        };
        let metrics = crate::metrics::parse_listen(&self.metrics_listen)
            .map_err(|e| invalid("metrics_listen", e))?;
        if self.worker_threads > 1024 {
            return Err(invalid(
                "worker_threads",
                "at most 1024 (0: one per CPU core)".into(),
            ));
        }
        if !self.store_url.is_empty()
            && !["postgres://", "postgresql://"]
                .iter()
                .any(|scheme| self.store_url.starts_with(scheme))
        {
            return Err(invalid(
                "store_url",
                "a PostgreSQL URL starts with postgres:// (empty: the embedded store)".into(),
            ));
        }
        for p in &self.failover_number_prefixes {
            let digits = p.strip_prefix('+').unwrap_or("");
            if digits.is_empty() && p != "+" || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    "failover_number_prefixes",
                    format!("`{p}`: a prefix is `+` followed by digits, e.g. \"+44\""),
                ));
            }
        }
        let probe = ProbeConfig {
            interval: (self.probe_interval_ms > 0)
                .then(|| Duration::from_millis(self.probe_interval_ms)),
            timeout: Duration::from_millis(self.probe_timeout_ms),
            failures: self.probe_failures,
        };
        let transport = TransportOptions {
            stream_idle_timeout: Duration::from_millis(self.stream_idle_timeout_ms),
            ..TransportOptions::default()
        };
        Ok(Settings {
            raw: self,
            listen,
            timers,
            transport,
            registrar,
            proxy,
            probe,
            api,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        CarrierConfig::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn the_shipped_example_parses_and_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let s = CarrierConfig::load(&path).unwrap();
        // The example documents every key with its default value.
        assert_eq!(s.raw, CarrierConfig::default());
    }

    #[test]
    fn a_misspelt_key_is_refused_by_name() {
        let e = parse("[carrier]\nt1_msec = 10\n").unwrap_err().to_string();
        assert!(e.contains("t1_msec"), "{e}");
        let e = parse("[carier]\n").unwrap_err().to_string();
        assert!(e.contains("carier"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse("[carrier]\nsip_listen = [\"sctp:1.2.3.4:5060\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sip_listen") && e.contains("sctp"), "{e}");
        let e = parse("[carrier]\nsip_listen = [\"udp:0.0.0.0:5060\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sip_listen") && e.contains("wildcard"), "{e}");
        let e = parse("[carrier]\nt1_ms = 0\n").unwrap_err().to_string();
        assert!(e.contains("t1_ms"), "{e}");
        let e = parse("[carrier]\nsip_listen = [\"tls:127.0.0.1:5061\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls_certificate"), "{e}");
        let e = parse("[carrier]\nt1_ms = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t1_ms"), "{e}");
    }

    #[test]
    fn proxy_keys_are_checked() {
        let s = parse(
            "[carrier]\nupstream = [\"127.0.0.14\", \"10.0.0.0/8\", \"2001:db8::/32\"]\n\
             delivery_timer_ms = 300\nfailover_responses = [503]\n",
        )
        .unwrap();
        assert!(s.proxy.is_upstream("10.9.8.7".parse().unwrap()));
        assert!(s.proxy.is_upstream("127.0.0.14".parse().unwrap()));
        assert!(!s.proxy.is_upstream("127.0.0.15".parse().unwrap()));
        assert_eq!(s.proxy.delivery.delivery_timer, Duration::from_millis(300));
        assert!(s.proxy.delivery.failover_set.contains(503));
        assert!(!s.proxy.delivery.failover_set.contains(480));
        let e = parse("[carrier]\nupstream = [\"10.0.0.0/40\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream"), "{e}");
        let e = parse("[carrier]\nfailover_responses = [180]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("failover_responses"), "{e}");
        let s = parse("[carrier]\nprobe_interval_ms = 0\n").unwrap();
        assert_eq!(s.probe.interval, None, "0 turns probing off");
        let e = parse("[carrier]\nprobe_failures = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("probe_failures"), "{e}");
        let e = parse("[carrier]\ntimer_c_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("timer_c_ms"), "{e}");
    }

    #[test]
    fn peers_and_gateway_are_checked() {
        let s = parse(
            "[carrier]\nname = \"trunk2\"\npstn_gateway = \"sip:127.0.0.13:5080;transport=tcp\"\n\
             [[carrier.peers]]\nname = \"trunk1\"\nuri = \"sip:127.0.0.10\"\n\
             [[carrier.peers]]\nname = \"trunk2\"\nuri = \"sip:127.0.0.20:5062\"\n\
             addresses = [\"10.1.0.0/16\"]\n",
        )
        .unwrap();
        let gw = s.proxy.pstn_gateway.as_ref().unwrap();
        assert_eq!(gw.addr, "127.0.0.13:5080".parse().unwrap());
        assert_eq!(gw.transport, crate::sip::transport::Transport::Tcp);
        assert_eq!(s.proxy.peers.len(), 2);
        assert_eq!(
            s.proxy.peers[0].hop.addr,
            "127.0.0.10:5060".parse().unwrap()
        );
        // trunk1 is trusted at its URI's address; this server's own entry never is a peer.
        assert_eq!(
            s.proxy
                .peer_at("127.0.0.10".parse().unwrap())
                .map(|p| p.name.as_str()),
            Some("trunk1")
        );
        assert!(s.proxy.peer_at("10.1.2.3".parse().unwrap()).is_none());
        assert!(s.proxy.accepts_calls_from("127.0.0.10".parse().unwrap()));
        for (text, key) in [
            ("pstn_gateway = \"sip:gw.example.com\"\n", "pstn_gateway"),
            ("pstn_gateway = \"tel:+15551234\"\n", "pstn_gateway"),
            (
                "[[carrier.peers]]\nname = \"a\"\nuri = \"sip:127.0.0.1;transport=sctp\"\n",
                "peers",
            ),
            (
                "[[carrier.peers]]\nname = \"\"\nuri = \"sip:127.0.0.1\"\n",
                "peers",
            ),
            (
                "[[carrier.peers]]\nname = \"a\"\nuri = \"sip:127.0.0.1\"\n\
                 [[carrier.peers]]\nname = \"a\"\nuri = \"sip:127.0.0.2\"\n",
                "peers",
            ),
            (
                "[[carrier.peers]]\nname = \"a\"\nuri = \"sip:127.0.0.1\"\nport = 1\n",
                "port",
            ),
            ("dns_servers = [\"ns1\"]\n", "dns_servers"),
            ("name = \"trunk 1\"\n", "name"),
            ("api_listen = \"192.0.2.1:8080\"\n", "api_listen"),
            ("worker_threads = 5000\n", "worker_threads"),
            ("metrics_listen = \"localhost\"\n", "metrics_listen"),
            ("api_listen = \"localhost\"\n", "api_listen"),
            ("api_tls_certificate = \"/x.pem\"\n", "api_tls_certificate"),
            (
                "failover_number_prefixes = [\"44\"]\n",
                "failover_number_prefixes",
            ),
            (
                "failover_number_prefixes = [\"+4a\"]\n",
                "failover_number_prefixes",
            ),
            (
                "sip_listen = [\"udp:127.0.0.10:5060\"]\n\
                 [[carrier.peers]]\nname = \"other\"\nuri = \"sip:127.0.0.10:5060\"\n",
                "own address",
            ),
        ] {
            let e = parse(&format!("[carrier]\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn empty_file_is_the_loopback_default() {
        let s = parse("").unwrap();
        assert_eq!(s.listen.len(), 2);
        assert_eq!(s.timers.t1, Duration::from_millis(500));
    }
}
