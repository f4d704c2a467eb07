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

/// A map keyed by ids this element hands out itself (counters), hashed with a fast hash:
/// no peer chooses such keys, so the DoS-resistant default buys nothing for them. Keys that
/// come from the wire (branches, addresses) keep the default hasher.
pub type IdMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
