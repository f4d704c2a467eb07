//! Lifeline: SIP trunk failover.
//!
//! `sip` is the project's own SIP layer (messages, transports, transactions, digest, RFC 3263);
//! `carrier` is what runs on a trunk server; `agent` what runs beside the customer's PBX.
#![forbid(unsafe_code)]

pub mod agent;
pub mod carrier;
pub mod metrics;
pub mod process;
pub mod sip;

/// What `--version` prints after the program's name: the package version and the git commit
/// it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LIFELINE_COMMIT"),
    ")"
);
