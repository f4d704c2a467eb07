//! The agent's configuration: the `[agent]` table of a TOML file (installed as
//! `/etc/lifeline/agent.toml`; `config.example.toml` documents every key with its default).
//! Unknown keys are refused by name; every value is checked before the agent uses it, so a
//! broken edit never replaces the configuration in force.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::carrier::store::{normalize_e164, normalize_failover_uri};
use crate::sip::transport::{ListenSpec, Transport};
use crate::sip::uri::{SipUri, Uri};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key's value is wrong: the message names the key (`agent.pbx.contact`).
    #[error("{path}: agent.{key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole file: each program reads its own table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    agent: Option<AgentConfig>,
    #[serde(rename = "carrier")]
    _carrier: Option<toml::Table>,
}

/// The `[agent]` table, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The trunk group's SIP username and password (digest).
    pub username: String,
    pub password: String,
    /// The trunk servers, in order, as SIP URIs (`sip:trunk1.example.net`,
    /// `sip:192.0.2.10:5060`), over UDP; names are resolved by RFC 3263 (SRV, A).
    pub servers: Vec<String>,
    /// The agent's own SIP socket (it sends REGISTER and OPTIONS from there).
    pub sip_listen: String,
    /// DNS servers for the RFC 3263 lookups (`IP` or `IP:PORT`); empty: the system's.
    pub dns_servers: Vec<String>,
    /// The registration expiry asked for, in seconds (the server may grant less).
    pub register_expires_s: u32,
    /// Backoff after a timeout or a 5xx: from `retry_min_ms`, doubling with jitter, up to
    /// `retry_max_ms` (a Retry-After from the server wins when longer).
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// After a refusal that retrying soon cannot fix (403, wrong password, 404, …).
    pub fatal_retry_ms: u64,
    /// RFC 3261 T1 for the agent's transactions.
    pub t1_ms: u64,
    /// Where `lifeline-agent status` reads the running agent's state.
    pub status_socket: PathBuf,
    /// Log filter (`info`, `debug`); `RUST_LOG` wins when set.
    pub log_level: String,
    /// Where Prometheus metrics are served (`ADDR:PORT`, `GET /metrics`); empty: not served.
    pub metrics_listen: String,
    pub pbx: PbxConfig,
    pub api: ApiConfig,
    pub failover: FailoverConfig,
}

/// `[agent.pbx]`: the PBX beside the agent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PbxConfig {
    /// Where the agent sends its OPTIONS health checks (`IP:PORT`).
    pub address: String,
    /// Required: the SIP URI at which trunk servers reach the PBX (its public address or
    /// port forward), registered as the Contact on every trunk server.
    pub contact: String,
    /// How often the PBX is asked.
    pub check_interval_ms: u64,
    /// A check without an answer within this has missed.
    pub check_timeout_ms: u64,
    /// Misses in a row before the PBX is down (and its bindings are withdrawn).
    pub down_after: u32,
    /// Answers in a row before a down PBX is up again.
    pub up_after: u32,
}

/// `[agent.api]`: the carrier's provisioning API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `https://trunk1.example.net:8443` (plain `http://` only to a loopback address); empty:
    /// no health reports and no settings sync.
    pub url: String,
    /// A token scoped to this trunk group.
    pub token: String,
    /// A PEM file of extra CA certificates for the API's HTTPS (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Health reports are sent at this interval, and at every change.
    pub report_interval_ms: u64,
}

/// `[agent.failover]`: the customer's failover settings, pushed to the carrier as the trunk
/// group's whole failover plan.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// true: this file is the authority for the trunk group's failover plan; false: the
    /// settings are left to the portal and nothing is pushed.
    pub sync: bool,
    /// The global failover number (E.164), for DIDs without their own.
    pub global_number: Option<String>,
    /// The failover PBX as a SIP URI …
    pub pbx_uri: Option<String>,
    /// … or as another trunk group of the same account (its id).
    pub pbx_trunk_group: Option<i64>,
    /// Per-DID failover numbers: `"+15551234567" = "+15557654321"`.
    pub dids: BTreeMap<String, String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            username: String::new(),
            password: String::new(),
            servers: vec!["sip:trunk1.invalid".into(), "sip:trunk2.invalid".into()],
            sip_listen: "udp:0.0.0.0:0".into(),
            dns_servers: Vec::new(),
            register_expires_s: 300,
            retry_min_ms: 1000,
            retry_max_ms: 60_000,
            fatal_retry_ms: 300_000,
            t1_ms: 500,
            status_socket: PathBuf::from("/run/lifeline/agent.sock"),
            log_level: "info".into(),
            metrics_listen: String::new(),
            pbx: PbxConfig::default(),
            api: ApiConfig::default(),
            failover: FailoverConfig::default(),
        }
    }
}

impl Default for PbxConfig {
    fn default() -> Self {
        PbxConfig {
            address: "127.0.0.1:5060".into(),
            contact: String::new(),
            check_interval_ms: 5000,
            check_timeout_ms: 2000,
            down_after: 3,
            up_after: 2,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            url: String::new(),
            token: String::new(),
            ca_file: None,
            report_interval_ms: 60_000,
        }
    }
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            sync: true,
            global_number: None,
            pbx_uri: None,
            pbx_trunk_group: None,
            dids: BTreeMap::new(),
        }
    }
}

/// A trunk server as configured: its URI and what to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// As written in `servers`.
    pub uri: String,
    /// The host to resolve (a name or an IP address).
    pub host: String,
    pub port: Option<u16>,
    pub transport: Option<Transport>,
    pub sips: bool,
}

/// The failover plan to push, checked (numbers in E.164 with `+`, the URI normalised).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FailoverPlan {
    pub global_number: Option<String>,
    pub pbx_uri: Option<String>,
    pub pbx_trunk_group: Option<i64>,
    pub dids: BTreeMap<String, String>,
}

/// A checked configuration, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub raw: AgentConfig,
    pub listen: ListenSpec,
    pub servers: Vec<ServerSpec>,
    pub dns_servers: Vec<SocketAddr>,
    pub pbx_address: SocketAddr,
    /// `pbx.contact`, parsed.
    pub contact: Uri,
    /// `None` when `failover.sync` is off.
    pub failover: Option<FailoverPlan>,
    /// Where metrics are served, if anywhere.
    pub metrics: Option<SocketAddr>,
}

impl Settings {
    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.raw.pbx.check_interval_ms)
    }
    pub fn check_timeout(&self) -> Duration {
        Duration::from_millis(self.raw.pbx.check_timeout_ms)
    }
    pub fn retry_min(&self) -> Duration {
        Duration::from_millis(self.raw.retry_min_ms)
    }
    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.raw.retry_max_ms)
    }
    pub fn fatal_retry(&self) -> Duration {
        Duration::from_millis(self.raw.fatal_retry_ms)
    }
}

impl AgentConfig {
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
        file.agent.unwrap_or_default().check(path)
    }

    /// Checks every value; the first wrong one is named.
    pub fn check(self, path: &Path) -> Result<Settings, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if self.username.is_empty() {
            return Err(invalid(
                "username",
                "required: the trunk group's SIP username".into(),
            ));
        }
        crate::carrier::store::check_username(&self.username)
            .map_err(|e| invalid("username", e.to_string()))?;
        if self.password.is_empty() {
            return Err(invalid("password", "required".into()));
        }
        if self.servers.is_empty() {
            return Err(invalid("servers", "at least one trunk server".into()));
        }
        let servers = self
            .servers
            .iter()
            .map(|s| server_spec(s).map_err(|m| invalid("servers", format!("`{s}`: {m}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let listen: ListenSpec = self
            .sip_listen
            .parse()
            .map_err(|m: String| invalid("sip_listen", m))?;
        if listen.transport != Transport::Udp {
            return Err(invalid(
                "sip_listen",
                "the agent's own socket is UDP (TCP servers are reached by connection)".into(),
            ));
        }
        let dns_servers = self
            .dns_servers
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                    .map_err(|_| invalid("dns_servers", format!("`{s}` is not IP or IP:PORT")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (key, v) in [
            ("register_expires_s", u64::from(self.register_expires_s)),
            ("retry_min_ms", self.retry_min_ms),
            ("retry_max_ms", self.retry_max_ms),
            ("fatal_retry_ms", self.fatal_retry_ms),
            ("t1_ms", self.t1_ms),
            ("pbx.check_interval_ms", self.pbx.check_interval_ms),
            ("pbx.check_timeout_ms", self.pbx.check_timeout_ms),
            ("pbx.down_after", u64::from(self.pbx.down_after)),
            ("pbx.up_after", u64::from(self.pbx.up_after)),
            ("api.report_interval_ms", self.api.report_interval_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        if self.pbx.check_timeout_ms >= self.pbx.check_interval_ms {
            return Err(invalid(
                "pbx.check_timeout_ms",
                "must be less than pbx.check_interval_ms".into(),
            ));
        }
        if self.retry_max_ms < self.retry_min_ms {
            return Err(invalid(
                "retry_max_ms",
                "must not be less than retry_min_ms".into(),
            ));
        }
        let pbx_address: SocketAddr = self.pbx.address.parse().map_err(|_| {
            invalid(
                "pbx.address",
                format!("`{}` is not IP:PORT", self.pbx.address),
            )
        })?;
        if self.pbx.contact.is_empty() {
            return Err(invalid(
                "pbx.contact",
                "required: the SIP URI at which trunk servers reach the PBX, e.g. \
                 \"sip:203.0.113.5:5060\""
                    .into(),
            ));
        }
        let contact = match Uri::parse(&self.pbx.contact.as_str().into()) {
            Ok(uri @ Uri::Sip(_)) => uri,
            _ => {
                return Err(invalid(
                    "pbx.contact",
                    format!("`{}` is not a sip: or sips: URI", self.pbx.contact),
                ));
            }
        };
        if !self.api.url.is_empty() {
            check_api_url(&self.api.url).map_err(|m| invalid("api.url", m))?;
            if self.api.token.is_empty() {
                return Err(invalid(
                    "api.token",
                    "required with api.url: a token scoped to this trunk group".into(),
                ));
            }
        }
        let failover = if self.failover.sync {
            Some(check_failover(&self.failover).map_err(|(k, m)| invalid(&k, m))?)
        } else {
            None
        };
        let metrics = crate::metrics::parse_listen(&self.metrics_listen)
            .map_err(|e| invalid("metrics_listen", e))?;
        Ok(Settings {
            raw: self,
            listen,
            servers,
            dns_servers,
            pbx_address,
            contact,
            failover,
            metrics,
        })
    }
}

/// A trunk server URI: `sip:` or `sips:`, a host, an optional port and `transport`.
fn server_spec(text: &str) -> Result<ServerSpec, String> {
    let Ok(Uri::Sip(SipUri {
        secure,
        host,
        port,
        params,
        ..
    })) = Uri::parse(&text.into())
    else {
        return Err("not a sip: or sips: URI".into());
    };
    let transport = match params.value("transport") {
        None => None,
        Some(v) => {
            Some(Transport::from_token(v).ok_or_else(|| format!("unknown transport `{v}`"))?)
        }
    };
    if secure || transport.is_some_and(|t| t != Transport::Udp) {
        // A binding made over a connection would have the carrier send calls down the
        // agent's connection, not to pbx.contact.
        return Err("the agent registers over UDP (sip: without transport=tcp/tls)".into());
    }
    Ok(ServerSpec {
        uri: text.to_owned(),
        host: host.to_string(),
        port,
        transport,
        sips: secure,
    })
}

/// `https://…`, or `http://` to a loopback address.
fn check_api_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    match scheme {
        "https" => Ok(()),
        "http"
            if host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()) =>
        {
            Ok(())
        }
        "http" => Err(format!(
            "`{url}`: plain HTTP only to a loopback address; use https://"
        )),
        _ => Err(format!("`{url}`: the scheme is https")),
    }
}

/// The failover plan, checked as the carrier checks it (E.164, a SIP URI); the key of the
/// first wrong value comes with the message.
fn check_failover(f: &FailoverConfig) -> Result<FailoverPlan, (String, String)> {
    let number = |key: String, n: &str| normalize_e164(n).map_err(|e| (key, e.to_string()));
    let global_number = match &f.global_number {
        Some(n) => Some(number("failover.global_number".into(), n)?),
        None => None,
    };
    if f.pbx_uri.is_some() && f.pbx_trunk_group.is_some() {
        return Err((
            "failover.pbx_trunk_group".into(),
            "a failover PBX is a URI or a trunk group, not both".into(),
        ));
    }
    let pbx_uri = match &f.pbx_uri {
        Some(u) => Some(
            normalize_failover_uri(u).map_err(|e| ("failover.pbx_uri".into(), e.to_string()))?,
        ),
        None => None,
    };
    let mut dids = BTreeMap::new();
    for (did, target) in &f.dids {
        let key = format!("failover.dids.\"{did}\"");
        let did = number(key.clone(), did)?;
        let target = number(key.clone(), target)?;
        if did == target {
            return Err((key, "a DID cannot fail over to its own number".into()));
        }
        dids.insert(did, target);
    }
    Ok(FailoverPlan {
        global_number,
        pbx_uri,
        pbx_trunk_group: f.pbx_trunk_group,
        dids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        AgentConfig::parse(text, Path::new("agent.toml"))
    }

    const MINIMAL: &str = "[agent]\nusername = \"acme-main\"\npassword = \"pw\"\n\
                           servers = [\"sip:127.0.0.10\", \"sip:trunk2.example.net:5080;transport=udp\"]\n\
                           [agent.pbx]\ncontact = \"sip:203.0.113.5:5060\"\n";

    #[test]
    fn the_example_file_documents_every_key_with_its_default() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
                .unwrap();
        let file: File = toml::from_str(&text).unwrap();
        let example = file.agent.expect("an [agent] table");
        // Every key is written out, and with its default (the example's credentials,
        // servers and contact aside: they have none).
        let defaults = AgentConfig {
            username: example.username.clone(),
            password: example.password.clone(),
            servers: example.servers.clone(),
            pbx: PbxConfig {
                contact: example.pbx.contact.clone(),
                ..PbxConfig::default()
            },
            api: ApiConfig {
                url: example.api.url.clone(),
                token: example.api.token.clone(),
                ..ApiConfig::default()
            },
            failover: example.failover.clone(),
            ..AgentConfig::default()
        };
        assert_eq!(example, defaults);
        let table: toml::Table = toml::from_str(&text).unwrap();
        let written = table["agent"].as_table().unwrap();
        for key in [
            "username",
            "password",
            "servers",
            "sip_listen",
            "dns_servers",
            "register_expires_s",
            "retry_min_ms",
            "retry_max_ms",
            "fatal_retry_ms",
            "t1_ms",
            "status_socket",
            "log_level",
            "pbx",
            "api",
            "failover",
        ] {
            assert!(
                written.contains_key(key),
                "config.example.toml lacks agent.{key}"
            );
        }
        // And it is a working configuration.
        AgentConfig::parse(&text, Path::new("config.example.toml")).unwrap();
    }

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let s = parse(MINIMAL).unwrap();
        assert_eq!(s.pbx_address, "127.0.0.1:5060".parse().unwrap());
        assert_eq!(s.raw.pbx.check_interval_ms, 5000);
        assert_eq!((s.raw.pbx.down_after, s.raw.pbx.up_after), (3, 2));
        assert_eq!(s.servers.len(), 2);
        assert_eq!(s.servers[0].host, "127.0.0.10");
        assert_eq!(s.servers[1].host, "trunk2.example.net");
        assert_eq!(s.servers[1].port, Some(5080));
        assert_eq!(s.servers[1].transport, Some(Transport::Udp));
        assert_eq!(s.failover, Some(FailoverPlan::default()));
    }

    #[test]
    fn failover_settings_are_checked_and_normalised() {
        let s = parse(&format!(
            "{MINIMAL}[agent.failover]\nglobal_number = \"15550001111\"\n\
             pbx_uri = \"SIP:Backup.Example.NET\"\n\
             [agent.failover.dids]\n\"+15551230001\" = \"+15557770001\"\n"
        ))
        .unwrap();
        let plan = s.failover.unwrap();
        assert_eq!(plan.global_number.as_deref(), Some("+15550001111"));
        assert_eq!(plan.dids["+15551230001"], "+15557770001");
        assert!(plan.pbx_uri.unwrap().starts_with("sip:"));
        let off = parse(&format!("{MINIMAL}[agent.failover]\nsync = false\n")).unwrap();
        assert_eq!(off.failover, None);
    }

    #[test]
    fn every_wrong_value_is_refused_by_its_key() {
        for (extra, key) in [
            (
                "[agent.failover]\nglobal_number = \"12\"\n",
                "failover.global_number",
            ),
            (
                "[agent.failover.dids]\n\"+15551230001\" = \"call me\"\n",
                "failover.dids.\"+15551230001\"",
            ),
            (
                "[agent.failover.dids]\n\"+15551230001\" = \"+15551230001\"\n",
                "failover.dids.\"+15551230001\"",
            ),
            (
                "[agent.failover]\npbx_uri = \"http://x\"\n",
                "failover.pbx_uri",
            ),
            (
                "[agent.failover]\npbx_uri = \"sip:x.example\"\npbx_trunk_group = 2\n",
                "failover.pbx_trunk_group",
            ),
            (
                "[agent.api]\nurl = \"http://192.0.2.1:8080\"\ntoken = \"t\"\n",
                "api.url",
            ),
            (
                "[agent.api]\nurl = \"https://api.example.net\"\n",
                "api.token",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err();
            assert!(
                err.to_string().contains(&format!("agent.{key}:")),
                "{extra}: {err}"
            );
        }
        for (text, key) in [
            (
                MINIMAL.replace("username = \"acme-main\"\n", ""),
                "username",
            ),
            (
                MINIMAL.replace("servers = [", "servers = [\"tel:+1\", "),
                "servers",
            ),
            (
                MINIMAL.replace("contact = \"sip:203.0.113.5:5060\"", "contact = \"\""),
                "pbx.contact",
            ),
            (
                MINIMAL.replace(
                    "contact = \"sip:203.0.113.5:5060\"",
                    "contact = \"mailto:x\"",
                ),
                "pbx.contact",
            ),
            (
                format!("{MINIMAL}check_interval_ms = 0\n"),
                "pbx.check_interval_ms",
            ),
            (
                format!("{MINIMAL}check_timeout_ms = 5000\n"),
                "pbx.check_timeout_ms",
            ),
            (format!("{MINIMAL}address = \"localhost\"\n"), "pbx.address"),
            (
                MINIMAL.replace("[agent]\n", "[agent]\nsip_listen = \"tcp:0.0.0.0:0\"\n"),
                "sip_listen",
            ),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(
                err.to_string().contains(&format!("agent.{key}:")),
                "{key}: {err}"
            );
        }
        // Unknown and misspelt keys are named.
        let err = parse(&format!("{MINIMAL}chek_interval_ms = 5\n")).unwrap_err();
        assert!(err.to_string().contains("chek_interval_ms"), "{err}");
    }
}
