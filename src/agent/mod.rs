//! `lifeline-agent`, on the customer's FreePBX host: registers the PBX with every trunk server
//! at once, watches the PBX, reports health and pushes the customer's failover settings.

pub mod cli;
pub mod config;
pub mod health;
pub mod metrics;
pub mod registration;
pub mod run;
pub mod upstream;
pub mod watch_file;
