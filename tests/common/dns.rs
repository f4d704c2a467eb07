//! An authoritative DNS server (hickory) for one in-memory zone on loopback, for tests of
//! RFC 3263 lookups: nothing else is ever queried.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::LowerName;
use hickory_server::proto::serialize::txt::Parser;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

/// An authoritative DNS server for one zone, stopped when dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    pub zone: Arc<InMemoryZoneHandler>,
    _server: Server<Catalog>,
}

impl DnsServer {
    /// Serves `zone_text` on 127.0.0.1 (UDP and TCP, one ephemeral port).
    pub async fn start(zone_text: &str) -> DnsServer {
        Self::start_on("127.0.0.1", zone_text).await
    }

    /// Serves `zone_text` on `ip` (UDP and TCP, one ephemeral port).
    pub async fn start_on(ip: &str, zone_text: &str) -> DnsServer {
        let (origin, records) = Parser::new(zone_text, None, None)
            .parse()
            .expect("test zone parses");
        let zone = Arc::new(
            InMemoryZoneHandler::<TokioRuntimeProvider>::new(
                origin.clone(),
                records,
                ZoneType::Primary,
                AxfrPolicy::Deny,
            )
            .expect("test zone loads"),
        );
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );
        let (udp, tcp) = bind_udp_and_tcp(ip).await;
        let addr = udp.local_addr().unwrap();
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 32);
        DnsServer {
            addr,
            zone,
            _server: server,
        }
    }
}

/// A DNS server running on a runtime of its own, for tests that are not async.
pub struct BackgroundDns {
    pub addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
    _server: DnsServer,
}

impl BackgroundDns {
    pub fn start_on(ip: &str, zone_text: &str) -> BackgroundDns {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime.block_on(DnsServer::start_on(ip, zone_text));
        BackgroundDns {
            addr: server.addr,
            _runtime: runtime,
            _server: server,
        }
    }
}

/// UDP and TCP on the same ephemeral port of `ip` (retrying if TCP's is taken).
async fn bind_udp_and_tcp(ip: &str) -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind((ip, 0)).await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            return (udp, tcp);
        }
    }
    panic!("no free loopback port for UDP and TCP");
}
