//! RFC 3263 server location against a real DNS server on loopback.
//!
//! Each test starts its own authoritative hickory server for an in-memory zone on
//! `127.0.0.1:<ephemeral>` (UDP and TCP) and points a `SipResolver` at it; nothing else is
//! ever queried. Every test is bounded by a 10 s timeout.

use std::future::Future;

use std::time::Duration;

mod common;

use common::dns::DnsServer;
use hickory_server::proto::rr::rdata::A;
use hickory_server::proto::rr::{Name, RData, Record};
use lifeline::sip::resolve::{Lookup, ResolveError, ResolveOptions, SipResolver, Target};
use lifeline::sip::transport::Transport;
use tokio::net::UdpSocket;
use tokio::time::Instant;

const ZONE: &str = r#"
$ORIGIN example.test.
$TTL 300
@                 IN SOA   ns.example.test. hostmaster.example.test. 1 3600 600 86400 30
@                 IN NS    ns
ns                IN A     127.0.0.1

; NAPTR -> SRV -> A/AAAA. Order 10 (TLS) comes before order 20 (UDP) although listed later;
; the "u" record and the unknown service are not for us.
naptr             IN NAPTR 20 10 "s" "SIP+D2U"  "" _sip._udp.naptr
naptr             IN NAPTR 10 10 "s" "SIPS+D2T" "" _sips._tcp.naptr
naptr             IN NAPTR 5  10 "u" "E2U+sip"  "!^.*$!sip:info@example.test!" .
naptr             IN NAPTR 15 10 "s" "SIP+D2X"  "" _sip._sctp.naptr
_sips._tcp.naptr  IN SRV   10 0 5061 tls1
_sip._udp.naptr   IN SRV   10 0 5070 udp1
; Exists, but no NAPTR points at it: must not be used when NAPTR answers.
_sip._tcp.naptr   IN SRV   10 0 5080 tcp1
tls1              IN A     127.0.1.1
tls1              IN AAAA  ::1
udp1              IN A     127.0.1.2
tcp1              IN A     127.0.1.3

; SRV priorities (listed out of order), a TCP service, and TLS "decidedly not available".
prio              IN A     127.0.2.9
_sip._udp.prio    IN SRV   30 10 5062 c.prio
_sip._udp.prio    IN SRV   10 10 5060 a.prio
_sip._udp.prio    IN SRV   20 10 5061 b.prio
_sip._tcp.prio    IN SRV   10 0  5060 a.prio
_sips._tcp.prio   IN SRV   0  0  0    .
a.prio            IN A     127.0.2.1
b.prio            IN A     127.0.2.2
b.prio            IN AAAA  ::1
c.prio            IN A     127.0.2.3

; Weighted selection: 90/10 at priority 10, a weight-0 backup at priority 20.
_sip._udp.weights IN SRV   10 90 5060 heavy.weights
_sip._udp.weights IN SRV   10 10 5060 light.weights
_sip._udp.weights IN SRV   20 0  5060 backup.weights
heavy.weights     IN A     127.0.3.1
light.weights     IN A     127.0.3.2
backup.weights    IN A     127.0.3.3

; Two SRV records leading to the same address: listed once.
_sip._udp.dup     IN SRV   10 0 5060 a.prio
_sip._udp.dup     IN SRV   20 0 5060 a.prio
_sip._udp.dup     IN SRV   30 0 5060 c.prio

; No NAPTR, no SRV.
plain             IN A     127.0.4.1
plain             IN AAAA  ::1
"#;

trait WithResolver {
    fn resolver(&self, opts: ResolveOptions) -> SipResolver;
}

impl WithResolver for DnsServer {
    fn resolver(&self, opts: ResolveOptions) -> SipResolver {
        SipResolver::with_nameservers_and_options(&[self.addr], opts).unwrap()
    }
}

fn opts() -> ResolveOptions {
    ResolveOptions {
        timeout: Duration::from_secs(1),
        attempts: 2,
        ..ResolveOptions::default()
    }
}

/// Bounds a test body in time.
async fn bounded<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), body)
        .await
        .expect("test took more than 10 s")
}

fn t(addr: &str, transport: Transport) -> Target {
    Target {
        addr: addr.parse().unwrap(),
        transport,
    }
}

use Transport::{Tcp, Tls, Udp};

#[tokio::test]
async fn numeric_hosts_skip_dns() {
    bounded(async {
        // A "name server" that never answers: any query would hang for the full timeout.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let resolver = SipResolver::with_nameservers_and_options(
            &[silent.local_addr().unwrap()],
            ResolveOptions {
                timeout: Duration::from_millis(300),
                attempts: 1,
                ..ResolveOptions::default()
            },
        )
        .unwrap();

        let started = Instant::now();
        let cases = [
            (Lookup::host("127.0.0.2"), t("127.0.0.2:5060", Udp)),
            (Lookup::host("::1"), t("[::1]:5060", Udp)),
            (Lookup::host("[::1]"), t("[::1]:5060", Udp)),
            (
                Lookup {
                    port: Some(5099),
                    ..Lookup::host("[::1]")
                },
                t("[::1]:5099", Udp),
            ),
            (
                Lookup {
                    transport: Some(Tcp),
                    ..Lookup::host("127.0.0.3")
                },
                t("127.0.0.3:5060", Tcp),
            ),
            (
                Lookup {
                    transport: Some(Tls),
                    ..Lookup::host("127.0.0.3")
                },
                t("127.0.0.3:5061", Tls),
            ),
            (
                Lookup {
                    secure: true,
                    ..Lookup::host("::1")
                },
                t("[::1]:5061", Tls),
            ),
        ];
        for (req, want) in cases {
            assert_eq!(resolver.resolve(&req).await, Ok(vec![want]), "{req:?}");
        }
        assert!(started.elapsed() < Duration::from_millis(200));
        let mut buf = [0u8; 512];
        assert!(
            silent.try_recv(&mut buf).is_err(),
            "no DNS query may be sent for IP literals"
        );

        // Contrast: a name does go to the (silent) server, and fails as transient.
        let err = resolver
            .resolve(&Lookup::host("pbx.example.test"))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(silent.try_recv(&mut buf).is_ok(), "the name was queried");
    })
    .await;
}

#[tokio::test]
async fn naptr_then_srv_then_addresses() {
    bounded(async {
        let dns = DnsServer::start(ZONE).await;
        let resolver = dns.resolver(opts());
        let got = resolver.resolve(&Lookup::host("naptr.example.test")).await;
        assert_eq!(
            got,
            Ok(vec![
                t("127.0.1.1:5061", Tls),
                t("[::1]:5061", Tls),
                t("127.0.1.2:5070", Udp),
            ])
        );

        // sips: only SIPS+D2T records count.
        let got = resolver
            .resolve(&Lookup {
                secure: true,
                ..Lookup::host("naptr.example.test")
            })
            .await;
        assert_eq!(
            got,
            Ok(vec![t("127.0.1.1:5061", Tls), t("[::1]:5061", Tls)])
        );
    })
    .await;
}

#[tokio::test]
async fn srv_fallback_follows_priorities_and_transports() {
    bounded(async {
        let dns = DnsServer::start(ZONE).await;
        let resolver = dns.resolver(opts());
        // No NAPTR: SRV for UDP (by priority), then TCP; TLS is ".", so absent.
        let got = resolver.resolve(&Lookup::host("prio.example.test")).await;
        assert_eq!(
            got,
            Ok(vec![
                t("127.0.2.1:5060", Udp),
                t("127.0.2.2:5061", Udp),
                t("[::1]:5061", Udp),
                t("127.0.2.3:5062", Udp),
                t("127.0.2.1:5060", Tcp),
            ])
        );
        // Names are case-insensitive and may be absolute.
        assert_eq!(
            resolver.resolve(&Lookup::host("PRIO.Example.Test.")).await,
            got
        );
    })
    .await;
}

#[tokio::test]
async fn explicit_transport_uses_its_srv() {
    bounded(async {
        let dns = DnsServer::start(ZONE).await;
        let resolver = dns.resolver(opts());
        let req = |host, transport| Lookup {
            transport: Some(transport),
            ..Lookup::host(host)
        };
        assert_eq!(
            resolver.resolve(&req("prio.example.test", Tcp)).await,
            Ok(vec![t("127.0.2.1:5060", Tcp)])
        );
        // NAPTR is skipped when the transport is known.
        assert_eq!(
            resolver.resolve(&req("naptr.example.test", Tcp)).await,
            Ok(vec![t("127.0.1.3:5080", Tcp)])
        );
        // SRV target "." means not available: no fall back to prio's A record.
        assert_eq!(
            resolver.resolve(&req("prio.example.test", Tls)).await,
            Err(ResolveError::NotFound {
                host: "prio.example.test".into()
            })
        );
        // sips: with no transport only looks at _sips._tcp, which is "." here.
        assert!(matches!(
            resolver
                .resolve(&Lookup {
                    secure: true,
                    ..Lookup::host("prio.example.test")
                })
                .await,
            Err(ResolveError::NotFound { .. })
        ));
        // No SRV for the transport: A/AAAA at its default port.
        assert_eq!(
            resolver.resolve(&req("plain.example.test", Tcp)).await,
            Ok(vec![t("127.0.4.1:5060", Tcp), t("[::1]:5060", Tcp)])
        );
        assert_eq!(
            resolver.resolve(&req("plain.example.test", Tls)).await,
            Ok(vec![t("127.0.4.1:5061", Tls), t("[::1]:5061", Tls)])
        );
    })
    .await;
}

#[tokio::test]
async fn explicit_port_uses_addresses_only() {
    bounded(async {
        let dns = DnsServer::start(ZONE).await;
        let resolver = dns.resolver(opts());
        // prio has SRV records and naptr has NAPTR records: both ignored with a port.
        assert_eq!(
            resolver
                .resolve(&Lookup {
                    port: Some(5099),
                    ..Lookup::host("prio.example.test")
                })
                .await,
            Ok(vec![t("127.0.2.9:5099", Udp)])
        );
        assert_eq!(
            resolver
                .resolve(&Lookup {
                    port: Some(5099),
                    transport: Some(Tcp),
                    ..Lookup::host("tls1.example.test")
                })
                .await,
            Ok(vec![t("127.0.1.1:5099", Tcp), t("[::1]:5099", Tcp)])
        );
        assert_eq!(
            resolver
                .resolve(&Lookup {
                    port: Some(5999),
                    secure: true,
                    ..Lookup::host("tls1.example.test")
                })
                .await,
            Ok(vec![t("127.0.1.1:5999", Tls), t("[::1]:5999", Tls)])
        );
        // No SRV involved, so "naptr" (which has no address) is simply not found.
        assert!(matches!(
            resolver
                .resolve(&Lookup {
                    port: Some(5060),
                    ..Lookup::host("naptr.example.test")
                })
                .await,
            Err(ResolveError::NotFound { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn no_naptr_no_srv_uses_addresses_at_default_port() {
    bounded(async {
        let dns = DnsServer::start(ZONE).await;
        let resolver = dns.resolver(opts());
        assert_eq!(
            resolver.resolve(&Lookup::host("plain.example.test")).await,
            Ok(vec![t("127.0.4.1:5060", Udp), t("[::1]:5060", Udp)])
        );
        assert_eq!(
            resolver
                .resolve(&Lookup {
                    secure: true,
                    ..Lookup::host("plain.example.test")
                })
                .await,
            Ok(vec![t("127.0.4.1:5061", Tls), t("[::1]:5061", Tls)])
        );
        let v6_first = dns.resolver(ResolveOptions {
            prefer_ipv6: true,
            ..opts()
        });
        assert_eq!(
            v6_first.resolve(&Lookup::host("plain.example.test")).await,
            Ok(vec![t("[::1]:5060", Udp), t("127.0.4.1:5060", Udp)])
        );
    })
    .await;
}

#[tokio::test]
async fn duplicates_are_removed_keeping_order() {
    bounded(async {
        let dns = DnsServer::start(ZONE).await;
        let resolver = dns.resolver(opts());
        assert_eq!(
            resolver.resolve(&Lookup::host("dup.example.test")).await,
            Ok(vec![t("127.0.2.1:5060", Udp), t("127.0.2.3:5060", Udp)])
        );
    })
    .await;
}

#[tokio::test]
async fn nxdomain_is_not_found_and_refusal_is_transient() {
    bounded(async {
        let dns = DnsServer::start(ZONE).await;
        let resolver = dns.resolver(opts());
        assert_eq!(
            resolver.resolve(&Lookup::host("nope.example.test")).await,
            Err(ResolveError::NotFound {
                host: "nope.example.test".into()
            })
        );
        // The server is not authoritative for other zones and refuses: not a "no".
        let err = resolver
            .resolve(&Lookup::host("pbx.elsewhere.test"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ResolveError::Unavailable { .. }),
            "refusal must not look like NXDOMAIN: {err:?}"
        );

        // The negative answer is cached: still NotFound with the server gone.
        drop(dns);
        assert!(matches!(
            resolver.resolve(&Lookup::host("nope.example.test")).await,
            Err(ResolveError::NotFound { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn weighted_selection_spreads_load() {
    bounded(async {
        let dns = DnsServer::start(ZONE).await;
        // No cache: every resolution orders the SRV records afresh.
        let resolver = dns.resolver(ResolveOptions {
            cache_capacity: 0,
            ..opts()
        });
        let req = Lookup {
            transport: Some(Udp),
            ..Lookup::host("weights.example.test")
        };
        let heavy = t("127.0.3.1:5060", Udp);
        let light = t("127.0.3.2:5060", Udp);
        let backup = t("127.0.3.3:5060", Udp);
        let samples = 400;
        let mut heavy_first = 0;
        for _ in 0..samples {
            let got = resolver.resolve(&req).await.unwrap();
            assert_eq!(got.len(), 3);
            assert_eq!(got[2], backup, "priority 20 always comes last");
            assert!(got[..2].contains(&heavy) && got[..2].contains(&light));
            if got[0] == heavy {
                heavy_first += 1;
            }
        }
        // Expected about 90 % (360); generous bounds.
        assert!(
            (300..=390).contains(&heavy_first),
            "heavy first {heavy_first}/{samples}"
        );
    })
    .await;
}

const SHORT_TTL_ZONE: &str = r#"
$ORIGIN short.test.
@     1 IN SOA ns.short.test. hostmaster.short.test. 1 3600 600 86400 1
host  1 IN A   127.0.5.1
"#;

#[tokio::test]
async fn cached_within_ttl_then_asks_again() {
    bounded(async {
        let dns = DnsServer::start(SHORT_TTL_ZONE).await;
        let resolver = dns.resolver(ResolveOptions {
            timeout: Duration::from_millis(300),
            attempts: 1,
            ..ResolveOptions::default()
        });
        let req = Lookup::host("host.short.test");
        let first = resolver.resolve(&req).await;
        assert_eq!(first, Ok(vec![t("127.0.5.1:5060", Udp)]));

        // Server gone, still within the 1 s TTL: answered from the cache.
        drop(dns);
        let started = Instant::now();
        assert_eq!(resolver.resolve(&req).await, first);
        // A query would have waited for the 300 ms timeout.
        assert!(started.elapsed() < Duration::from_millis(200));

        // Past the TTL the server is asked again, and it is not there any more.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let err = resolver.resolve(&req).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn changes_show_up_after_ttl() {
    bounded(async {
        let zone = SHORT_TTL_ZONE.replace("127.0.5.1", "127.0.6.1");
        let dns = DnsServer::start(&zone).await;
        let resolver = dns.resolver(opts());
        let req = Lookup::host("host.short.test");
        assert_eq!(
            resolver.resolve(&req).await,
            Ok(vec![t("127.0.6.1:5060", Udp)])
        );

        let name = Name::from_ascii("host.short.test.").unwrap();
        let added = Record::from_rdata(name, 1, RData::A(A::new(127, 0, 6, 2)));
        assert!(dns.zone.upsert(added, 2).await);
        // Within the TTL: the cached answer.
        assert_eq!(
            resolver.resolve(&req).await,
            Ok(vec![t("127.0.6.1:5060", Udp)])
        );

        tokio::time::sleep(Duration::from_millis(1300)).await;
        let mut got = resolver.resolve(&req).await.unwrap();
        got.sort_by_key(|t| t.addr);
        assert_eq!(got, [t("127.0.6.1:5060", Udp), t("127.0.6.2:5060", Udp)]);

        // clear_cache forgets everything at once.
        assert!(
            dns.zone
                .upsert(
                    Record::from_rdata(
                        Name::from_ascii("host.short.test.").unwrap(),
                        1,
                        RData::A(A::new(127, 0, 6, 3)),
                    ),
                    3,
                )
                .await
        );
        resolver.clear_cache();
        assert_eq!(resolver.resolve(&req).await.map(|v| v.len()), Ok(3));
    })
    .await;
}
