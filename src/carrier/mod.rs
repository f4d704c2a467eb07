//! The trunk server: configuration, the SIP service (answers of its own, and later the
//! registrar and the delivery proxy) and the command line behind `lifeline-carrier`.

pub mod cli;
pub mod config;
pub mod server;
