//! Lifeline: SIP trunk failover.
//!
//! `sip` is the project's own SIP layer (messages, transports, transactions, digest, RFC 3263);
//! `carrier` is what runs on a trunk server; `agent` what runs beside the customer's PBX.
#![forbid(unsafe_code)]

pub mod agent;
pub mod carrier;
pub mod sip;
