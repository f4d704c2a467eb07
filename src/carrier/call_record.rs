//! The record of one inbound call: what the proxy decided and what happened, for support
//! ("why did my call go there?"). The proxy makes one when the caller has its final answer;
//! the server keeps them in its local state file (see [`super::bindings`]).

use super::store::TrunkGroupId;

/// One call, as it ended for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub call_id: String,
    /// The DID called, E.164 with `+`.
    pub did: String,
    pub trunk_group: TrunkGroupId,
    /// This trunk server's name.
    pub server: String,
    /// Where the INVITE came from (`ip:port`).
    pub source: String,
    /// The peer trunk server that passed the call here, if any.
    pub from_peer: Option<String>,
    /// When the INVITE arrived, Unix milliseconds (wall clock).
    pub started_at_ms: i64,
    /// From the INVITE to the caller's final answer.
    pub duration_ms: u64,
    /// The final status the caller got.
    pub status: u16,
    /// `delivered`, `reached`, `passed to peer`, `failed` or `cancelled`.
    pub outcome: String,
    /// The target whose answer the caller got (delivered, reached or passed to peer).
    pub answered_by: Option<String>,
    /// Every target tried, in order.
    pub attempts: Vec<AttemptRecord>,
}

/// One target tried for a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// `primary`, `failover PBX`, `failover number` or `next trunk server`.
    pub stage: String,
    /// The target as the logs name it.
    pub target: String,
    /// When the attempt started, in milliseconds after the INVITE arrived.
    pub offset_ms: u64,
    /// How long it took until its outcome was decided; `None` if undecided when the call ended
    /// (a branch still running cannot be: the caller has its answer).
    pub duration_ms: Option<u64>,
    /// How it ended (`answered 200`, `not delivered: 503`, `transport error`, ...).
    pub outcome: String,
}
