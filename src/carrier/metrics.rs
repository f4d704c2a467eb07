//! What the carrier counts for Prometheus (served by [`crate::metrics`]). Every series has a
//! `server` label, the trunk server's name.
//!
//! - `lifeline_bindings`, `lifeline_registered_trunk_groups`: contacts bound here right now,
//!   and the trunk groups that have at least one.
//! - `lifeline_store_reachable`: 1 while the configuration store answers.
//! - `lifeline_register_responses_total{status}`: REGISTER answers by status code (200, 401,
//!   403, 423, …).
//! - `lifeline_calls_total{outcome, delivered_by}`: calls by how they ended (`delivered`,
//!   `reached`, `passed_to_peer`, `failed`, `cancelled`) and the stage of the target whose
//!   answer the caller got (`primary`, `failover_pbx`, `failover_number`, `next_trunk_server`,
//!   `none`).
//! - `lifeline_failovers_total{stage}`: calls that went on to a stage past the primary, once
//!   per stage tried.
//! - `lifeline_delivery_delay_seconds{stage}`: from the INVITE's arrival to the INVITE sent to
//!   the target that answered (near 0 for the primary; the failover latency otherwise).
//! - `lifeline_call_setup_seconds{outcome}`: from the INVITE's arrival to the caller's final
//!   answer.

use std::collections::HashMap;

use metrics::{Counter, Gauge, counter, gauge, histogram};

use super::call_record::CallRecord;

/// The carrier's metric handles; the ones on the REGISTER path are kept, not looked up.
pub struct CarrierMetrics {
    server: String,
    register: HashMap<u16, Counter>,
    bindings: Gauge,
    trunk_groups: Gauge,
    store_reachable: Gauge,
}

impl CarrierMetrics {
    pub fn new(server: &str) -> CarrierMetrics {
        let server = server.to_string();
        CarrierMetrics {
            bindings: gauge!("lifeline_bindings", "server" => server.clone()),
            trunk_groups: gauge!("lifeline_registered_trunk_groups", "server" => server.clone()),
            store_reachable: gauge!("lifeline_store_reachable", "server" => server.clone()),
            register: HashMap::new(),
            server,
        }
    }

    /// A REGISTER was answered with `status`.
    pub fn register_answered(&mut self, status: u16) {
        let server = &self.server;
        self.register
            .entry(status)
            .or_insert_with(|| {
                counter!(
                    "lifeline_register_responses_total",
                    "server" => server.clone(),
                    "status" => status.to_string()
                )
            })
            .increment(1);
    }

    /// This server's registrations and store, as they are now.
    pub fn set_state(&self, bindings: usize, trunk_groups: usize, store_reachable: bool) {
        self.bindings.set(bindings as f64);
        self.trunk_groups.set(trunk_groups as f64);
        self.store_reachable
            .set(if store_reachable { 1.0 } else { 0.0 });
    }

    /// A call ended for its caller.
    pub fn call_ended(&self, record: &CallRecord) {
        let outcome = label(&record.outcome);
        // The attempt whose answer the caller got (a peer's is named by the peer, not the
        // target).
        let answering = match (record.outcome.as_str(), &record.answered_by) {
            ("passed to peer", Some(_)) => record
                .attempts
                .iter()
                .rev()
                .find(|a| a.stage == "next trunk server"),
            (_, Some(by)) => record.attempts.iter().rev().find(|a| &a.target == by),
            (_, None) => None,
        };
        let delivered_by = answering.map_or_else(|| "none".to_string(), |a| label(&a.stage));
        if let Some(a) = answering {
            histogram!(
                "lifeline_delivery_delay_seconds",
                "server" => self.server.clone(),
                "stage" => delivered_by.clone()
            )
            .record(a.offset_ms as f64 / 1000.0);
        }
        histogram!(
            "lifeline_call_setup_seconds",
            "server" => self.server.clone(),
            "outcome" => outcome.clone()
        )
        .record(record.duration_ms as f64 / 1000.0);
        counter!(
            "lifeline_calls_total",
            "server" => self.server.clone(),
            "outcome" => outcome,
            "delivered_by" => delivered_by
        )
        .increment(1);
        let mut stages: Vec<&str> = record
            .attempts
            .iter()
            .map(|a| a.stage.as_str())
            .filter(|s| *s != "primary")
            .collect();
        stages.dedup();
        for stage in stages {
            counter!(
                "lifeline_failovers_total",
                "server" => self.server.clone(),
                "stage" => label(stage)
            )
            .increment(1);
        }
    }
}

/// A record's words as a label value: `failover PBX` → `failover_pbx`.
fn label(words: &str) -> String {
    words.to_ascii_lowercase().replace(' ', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_snake_case() {
        assert_eq!(label("failover PBX"), "failover_pbx");
        assert_eq!(label("next trunk server"), "next_trunk_server");
        assert_eq!(label("passed to peer"), "passed_to_peer");
    }
}
