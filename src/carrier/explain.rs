//! `lifeline-carrier explain <DID>`: how a call to a DID would be routed right now on this
//! server, for support: the DID's trunk group, its bindings here, its failover settings and
//! the ordered targets of the delivery rule, each stage with the reason it has them.
//!
//! It reads what the running server writes: the configuration store, and this server's
//! bindings file (at most `bindings_flush_ms` behind the server). Which bindings are failing
//! their OPTIONS probes only the running server knows; they are listed here as usable.

use std::io::Write;
use std::time::{Duration, SystemTime};

use super::bindings::BindingStore;
use super::config::Settings;
use super::customers::Customers;
use super::delivery_rule::{Stage, Target};
use super::proxy::{CallSetup, plan_call};
use super::registrar::{Registrar, unix_ms};
use super::store::Store;
use crate::sip::digest::Authenticator;

/// Why `explain` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{0}")]
    Store(#[from] super::store::StoreError),
    #[error("{0}")]
    Bindings(#[from] super::bindings::BindingStoreError),
    #[error("{0} is not a DID of this carrier")]
    UnknownDid(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Writes the explanation for `did` to `out`.
pub async fn explain(
    settings: &Settings,
    did: &str,
    out: &mut impl Write,
) -> Result<(), ExplainError> {
    let dir = &settings.raw.data_dir;
    let store = Store::connect(&settings.store_location()).await?;
    let customers = Customers::load(&store).await?;
    store.close().await;
    let Some(d) = customers.did(did) else {
        return Err(ExplainError::UnknownDid(did.to_string()));
    };
    let now_ms = unix_ms(SystemTime::now());
    let (bindings, loaded) = BindingStore::open(dir, Duration::from_secs(3600), now_ms).await?;
    let registrar = Registrar::new(
        settings.registrar.clone(),
        Authenticator::new(Duration::from_secs(1)),
        bindings,
        loaded,
    );
    let group = customers.trunk_group(d.trunk_group_id);
    let failover = customers.failover(d);
    let contacts = registrar.contacts(d.trunk_group_id, now_ms);
    let failover_contacts = customers
        .failover_trunk_group(d)
        .map(|other| registrar.contacts(other, now_ms))
        .unwrap_or_default();
    let plan = plan_call(
        &settings.proxy,
        &settings.listen,
        CallSetup {
            trunk_group: d.trunk_group_id,
            contacts: &contacts,
            failover: failover.clone(),
            failover_contacts: &failover_contacts,
            tried_by: Vec::new(),
            already_diverted: false,
        },
    );

    let server = &settings.raw.name;
    writeln!(out, "DID {} on {server}", d.number)?;
    match group {
        Some(g) => writeln!(
            out,
            "trunk group {} ({}, username {}) of account {}",
            g.id, g.name, g.username, g.account_id
        )?,
        None => writeln!(out, "trunk group {}", d.trunk_group_id)?,
    }
    writeln!(out, "bindings on {server}: {}", contacts.len())?;
    for c in &contacts {
        let q = c
            .binding
            .q
            .map_or_else(|| "-".to_string(), |q| format!("{}", f64::from(q) / 1000.0));
        let left = (c.binding.expires_at_ms - now_ms).max(0) / 1000;
        writeln!(
            out,
            "  {} q={q} via {} {} expires in {left}s",
            c.binding.contact, c.binding.flow.transport, c.binding.flow.remote
        )?;
    }
    writeln!(
        out,
        "failover: DID number {}, global number {}, PBX {}",
        failover.did_number.as_deref().unwrap_or("-"),
        failover.global_number.as_deref().unwrap_or("-"),
        failover
            .pbx
            .as_ref()
            .map_or_else(|| "-".to_string(), |p| p.to_string()),
    )?;
    writeln!(out, "a call arriving now is tried in this order:")?;
    writeln!(out, "{plan}")?;
    // What the plan cannot know by itself.
    let number_stage = plan.stage(Stage::FailoverNumber);
    if !number_stage.targets.is_empty() && settings.proxy.pstn_gateway.is_none() {
        writeln!(
            out,
            "warning: no pstn_gateway is configured: the failover number cannot be tried"
        )?;
    }
    for t in &plan.stage(Stage::NextServer).targets {
        if let Target::NextServer(name) = t
            && let Some(p) = settings.proxy.peers.iter().find(|p| &p.name == name)
        {
            writeln!(out, "peer {name} at {}", p.hop.uri)?;
        }
    }
    writeln!(
        out,
        "note: bindings failing their OPTIONS probes are skipped by the running server; \
         this listing cannot see that"
    )?;
    Ok(())
}
