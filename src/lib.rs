//! Lifeline: SIP trunk failover.
//!
//! `sip` is the project's own SIP layer (messages, transports, transactions, digest, RFC 3263);
//! `carrier` is what runs on a trunk server.
#![forbid(unsafe_code)]

pub mod carrier;
pub mod sip;
