//! Prometheus metrics, for both programs: one process-wide recorder (the `metrics` macros record
//! into it) and an HTTP endpoint, `GET /metrics`, on the address in the configuration.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;

/// Bucket bounds of the delivery delay: from a fraction of a millisecond (an unregistered
/// PBX) to past the default setup timer (10 s).
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Bucket bounds of the call setup time: a call may ring for up to Timer C (180 s).
const SETUP_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0,
];

/// How often histograms are trimmed (the exporter leaves it to its user).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The process's recorder, installed when the endpoint is first served: without one the
/// `metrics` macros record nothing (histogram samples would otherwise pile up, undrained). In
/// a process that runs several servers (the tests), they share it.
fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("lifeline_call_setup_seconds".into()),
                SETUP_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("lifeline_delivery_delay_seconds".into()),
                    SECONDS_BUCKETS,
                )
            })
            .expect("bucket bounds are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed: /metrics will show nothing");
        }
        handle
    })
}

/// Serves `GET /metrics` on `addr` until the task is aborted; returns the bound address.
pub async fn serve(addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let handle = handle();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("metrics_listen {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                handle.render(),
            )
        }),
    );
    tracing::info!(addr = %bound, "metrics served at /metrics");
    let task = tokio::spawn(async move {
        let upkeep = async {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        };
        tokio::select! {
            served = axum::serve(listener, app) => {
                if let Err(e) = served {
                    tracing::warn!(error = %e, "metrics endpoint stopped");
                }
            }
            () = upkeep => {}
        }
    });
    Ok((bound, task))
}

/// Parses a `metrics_listen` value: empty is off.
pub fn parse_listen(value: &str) -> Result<Option<SocketAddr>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| format!("{value:?} is not an address with a port (\"127.0.0.1:9464\")"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values() {
        assert_eq!(parse_listen(""), Ok(None));
        assert_eq!(
            parse_listen("127.0.0.1:9464"),
            Ok(Some("127.0.0.1:9464".parse().unwrap()))
        );
        assert_eq!(
            parse_listen("[::1]:9464"),
            Ok(Some("[::1]:9464".parse().unwrap()))
        );
        assert!(parse_listen("127.0.0.1").unwrap_err().contains("127.0.0.1"));
    }
}
