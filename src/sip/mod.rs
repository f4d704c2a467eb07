//! The SIP layer: message parsing and building, transports, transactions (RFC 3261 §17),
//! digest authentication (RFC 7616/8760) and server location (RFC 3263).

pub mod digest;
pub mod icmp;
pub mod message;
pub mod resolve;
pub mod syntax;
pub mod transaction;
pub mod transport;
pub mod uri;
