//! The trunk server: configuration, the SIP service (answers of its own, and later the
//! registrar and the delivery proxy), the configuration store with its `admin` commands, and
//! the command line behind `lifeline-carrier`.

pub mod admin;
pub mod api;
pub mod bindings;
pub mod call_log;
pub mod call_record;
pub mod cli;
pub mod config;
pub mod customers;
pub mod delivery_rule;
pub mod explain;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod registrar;
pub mod server;
pub mod store;
