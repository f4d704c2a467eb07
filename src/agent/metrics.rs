//! What the agent shows Prometheus (served by [`crate::metrics`]), kept equal to its status:
//!
//! - `lifeline_agent_registered{server}`: 1 while the PBX is registered on that trunk server;
//!   `lifeline_agent_withdrawn{server}`: 1 while its binding is withdrawn (PBX down).
//! - `lifeline_agent_pbx_state{state}`: 1 for the current one of `up`, `down`, `unknown`.
//! - `lifeline_agent_sync_pending`, `lifeline_agent_sync_refused`: the failover settings sync
//!   (a plan the carrier does not hold yet; the API refused the last one), and
//!   `lifeline_agent_sync_last_success_timestamp_seconds`.

use metrics::gauge;
use tokio::sync::watch;

use super::health::PbxState;
use super::run::AgentStatus;
use super::upstream::SyncState;

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Sets the gauges from `status` and `sync` on every change, until both senders are gone.
pub async fn follow(
    mut status: watch::Receiver<AgentStatus>,
    mut sync: watch::Receiver<SyncState>,
) {
    let mut status_open = true;
    let mut sync_open = true;
    let mut shown: Vec<String> = Vec::new();
    while status_open || sync_open {
        shown = show_status(&status.borrow_and_update(), shown);
        show_sync(&sync.borrow_and_update());
        tokio::select! {
            r = status.changed(), if status_open => status_open = r.is_ok(),
            r = sync.changed(), if sync_open => sync_open = r.is_ok(),
        }
    }
}

/// Sets the gauges; a server shown before and no longer configured reads 0. Returns the
/// servers shown.
fn show_status(status: &AgentStatus, before: Vec<String>) -> Vec<String> {
    for s in &status.servers {
        gauge!("lifeline_agent_registered", "server" => s.server.clone()).set(flag(s.registered));
        gauge!("lifeline_agent_withdrawn", "server" => s.server.clone()).set(flag(s.withdrawn));
    }
    for gone in before
        .into_iter()
        .filter(|b| !status.servers.iter().any(|s| &s.server == b))
    {
        gauge!("lifeline_agent_registered", "server" => gone.clone()).set(0.0);
        gauge!("lifeline_agent_withdrawn", "server" => gone).set(0.0);
    }
    for state in [PbxState::Up, PbxState::Down, PbxState::Unknown] {
        gauge!("lifeline_agent_pbx_state", "state" => state.as_str())
            .set(flag(status.pbx == state));
    }
    status.servers.iter().map(|s| s.server.clone()).collect()
}

fn show_sync(sync: &SyncState) {
    gauge!("lifeline_agent_sync_pending").set(flag(sync.pending));
    gauge!("lifeline_agent_sync_refused").set(flag(sync.refused));
    if let Some(ms) = sync.last_success_ms {
        gauge!("lifeline_agent_sync_last_success_timestamp_seconds").set(ms as f64 / 1000.0);
    }
}
