//! The carrier as a library: started and stopped in-process, its listen addresses are free
//! again afterwards (a restart in the same process, and tests, need that).

use std::path::Path;
use std::time::Duration;

use lifeline::carrier::config::CarrierConfig;
use lifeline::carrier::server;

#[tokio::test]
async fn stop_releases_the_listen_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[carrier]\nsip_listen = [\"udp:127.0.41.20:0\", \"tcp:127.0.41.20:0\"]\n\
         api_listen = \"127.0.41.20:0\"\ndata_dir = \"{}\"\n",
        dir.path().join("data").display()
    );
    let settings = CarrierConfig::parse(&text, Path::new("test.toml")).unwrap();
    let running = server::start(settings).await.unwrap();
    let bound: Vec<_> = running.bound().iter().map(|b| b.addr).collect();
    let api = running.api_addr().expect("the API listens");
    // A connection stays open while the carrier stops: it must not hold the sockets.
    let _client = tokio::net::TcpStream::connect(bound[1]).await.unwrap();
    running.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let udp = std::net::UdpSocket::bind(bound[0]);
        let tcp = std::net::TcpListener::bind(bound[1]);
        let api = std::net::TcpListener::bind(api);
        if udp.is_ok() && tcp.is_ok() && api.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still bound after stop: udp {:?}, tcp {:?}",
            udp.err(),
            tcp.err()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
