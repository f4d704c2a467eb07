//! The delivery rule (DESIGN.md, "The delivery rule", the heart of the product): where an
//! inbound call for a DID goes, in which order, and when a target counts as failed — as a
//! pure state machine, with no sockets, no DNS, no store and no clock of its own.
//!
//! An INVITE for DID `d` of trunk group `g` arrives at trunk server `S`:
//!
//! 1. **Primary**: `g`'s usable bindings on `S`, highest q first, one branch at a time. A 2xx,
//!    or a final answer outside the failover set (486, 600, 603, 404, …), is relayed: the
//!    call was delivered.
//! 2. **Failure to deliver** a target: no usable binding at all; a transport error (acted on
//!    at once); no response within the *delivery timer*; a bare 100 Trying and then nothing
//!    within the *setup timer*; or a final response in the *failover set*. Once a target sent
//!    a 1xx other than 100 it has been *reached*: its final answer, whatever the code, is
//!    relayed, and Timer C governs.
//! 3. **If `d` has failover** (its own number, or `g`'s global number or failover PBX): the
//!    call stays on `S`. The failover PBX first (every resolved target in order, or the other
//!    trunk group's bindings on `S` — whose own failover is not applied), then the failover
//!    number (the DID's own, else `g`'s global one), sent through the PSTN gateway.
//! 4. **If `d` has no failover**: the next trunk servers that have not tried the call yet, in
//!    the configured order; the first that answers at all has taken the call and applies this
//!    same rule with its own registrations, and its final answer is relayed.
//!
//! When every target fails the caller gets the best final response received, else 480: never
//! silence (see [`better_response`]).
//!
//! [`Plan::new`] turns what the proxy knows about a call ([`CallFacts`]) into the ordered
//! stages of points 1, 3 and 4, each with the reason it has the targets it has; the `explain`
//! command prints that plan. [`Delivery`] walks the plan and applies point 2, quinn-style:
//! the proxy feeds it responses, transport errors, the caller's CANCEL and timeouts, each with
//! `now`, and polls [`Action`]s (start or cancel a branch, relay or answer, done).
//!
//! What the rule leaves open, decided here:
//! - the caller's CANCEL cancels the current branch and answers 487 at once; no branch starts
//!   after it;
//! - Timer C (RFC 3261 §16.8) cancels the ringing branch; the caller gets 408 when that
//!   branch's 487 arrives (or after a grace period), or the branch's own final answer if one
//!   raced the CANCEL;
//! - a transport error after ringing (the PBX went away mid-ring) is still "reached": no
//!   failover, the caller gets 480;
//! - a target given up on for its silence that answers 2xx before the caller has a final
//!   answer gets the call (the current branch is cancelled); every 2xx after that is forwarded
//!   as RFC 3261 §16.7 step 10 asks;
//! - best response (RFC 3261 §16.7 step 6, simplified): a 6xx, else the lowest class, the
//!   first received within a class. Only failover-set answers count: the others were relayed.
//!   503 is passed on as 500, whether it is the best failure or a reached target's answer.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use super::store::TrunkGroupId;

/// Why a delivery setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryRuleError {
    /// The failover set may only hold final failure codes (300–699): a 1xx or 2xx is never a
    /// failure to deliver.
    #[error("{0} is not a final failure status (300-699)")]
    NotAFailureStatus(u16),
}

// === Inputs ===

/// The failover settings that apply to one DID (DESIGN.md, "Words").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailoverPlan {
    /// The DID's own failover number, E.164.
    pub did_number: Option<String>,
    /// The trunk group's global failover number, E.164: used when the DID has none.
    pub global_number: Option<String>,
    /// The trunk group's failover PBX.
    pub pbx: Option<FailoverPbx>,
}

impl FailoverPlan {
    /// Whether the DID has failover (rule point 3). If so, the call never leaves this server.
    pub fn is_configured(&self) -> bool {
        self.did_number.is_some() || self.global_number.is_some() || self.pbx.is_some()
    }

    /// The failover number that applies: the DID's own, else the trunk group's global one.
    pub fn number(&self) -> Option<&str> {
        self.did_number.as_deref().or(self.global_number.as_deref())
    }
}

/// A trunk group's failover PBX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailoverPbx {
    /// A SIP URI with an IP address or an FQDN (RFC 3263 may resolve it into several targets).
    Uri(String),
    /// Another trunk group of the same account: its bindings on this server.
    TrunkGroup(TrunkGroupId),
}

impl fmt::Display for FailoverPbx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailoverPbx::Uri(uri) => f.write_str(uri),
            FailoverPbx::TrunkGroup(id) => write!(f, "trunk group {id}"),
        }
    }
}

/// What the proxy knows about one inbound call when it arrives. `T` is the proxy's own
/// description of a SIP target (a binding's contact and flow, a resolved address); this module
/// only moves it around.
#[derive(Debug, Clone)]
pub struct CallFacts<T> {
    /// The DID's trunk group.
    pub trunk_group: TrunkGroupId,
    /// The trunk group's usable bindings on this server, highest q first: registered and not
    /// failing their OPTIONS probes. Empty when it is not registered here.
    pub bindings: Vec<T>,
    /// The failover settings of the DID and its trunk group.
    pub failover: FailoverPlan,
    /// The failover PBX's targets, when the proxy knows them already (the other trunk group's
    /// usable bindings here, or the address of a URI with an IP address). `None` with a
    /// failover PBX set: the delivery asks for them with [`Action::ResolveFailoverPbx`] only
    /// when the call gets that far, so a call the PBX answers costs no DNS lookup.
    pub failover_pbx_targets: Option<Vec<T>>,
    /// This trunk server's name.
    pub server: String,
    /// The trunk servers in the configured order (this server's own name may be among them).
    pub peers: Vec<String>,
    /// The trunk servers that have already tried this call, from the trusted mark a peer put
    /// in the request. The proxy adds this server's name to the mark when it passes the call on.
    pub tried_by: Vec<String>,
    /// The request was diverted before from this DID or to its failover number (a Diversion
    /// or History-Info entry of the request names one of them): sending it to the number again
    /// could go round through the PSTN for ever, so the number is not tried.
    pub already_diverted: bool,
}

/// The final statuses that mean "not delivered, try the next target" (rule point 2), as a
/// bit set over 300–699: checking a response costs no allocation and no search.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FailoverSet([u64; 7]);

impl FailoverSet {
    /// The default set: 408, 480, 500, 502, 503, 504.
    pub const DEFAULT_CODES: [u16; 6] = [408, 480, 500, 502, 503, 504];

    /// A set of the given codes; each must be a final failure status (300–699).
    pub fn new(codes: &[u16]) -> Result<FailoverSet, DeliveryRuleError> {
        let mut bits = [0u64; 7];
        for &code in codes {
            if !(300..=699).contains(&code) {
                return Err(DeliveryRuleError::NotAFailureStatus(code));
            }
            let i = usize::from(code - 300);
            bits[i / 64] |= 1 << (i % 64);
        }
        Ok(FailoverSet(bits))
    }

    /// Whether a final response with `status` is a failure to deliver.
    pub fn contains(&self, status: u16) -> bool {
        if !(300..=699).contains(&status) {
            return false;
        }
        let i = usize::from(status - 300);
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

impl Default for FailoverSet {
    fn default() -> Self {
        FailoverSet::new(&Self::DEFAULT_CODES).expect("the default codes are failure statuses")
    }
}

impl fmt::Debug for FailoverSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries((300..=699).filter(|&s| self.contains(s)))
            .finish()
    }
}

/// The delivery timers and the failover set: keys of the carrier config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// A target that sends nothing at all within this has failed (default 2 s).
    pub delivery_timer: Duration,
    /// A target that sent only 100 Trying, and then neither ringing nor a final answer within
    /// this, has failed (default 10 s).
    pub setup_timer: Duration,
    /// RFC 3261 §16.6 Timer C: how long a reached target (it rang) may go without a further
    /// provisional or a final answer before its branch is cancelled and the caller gets 408
    /// (default 180 s). A peer trunk server that answered is under Timer C from its 100 on.
    pub timer_c: Duration,
    /// How long a branch cancelled by Timer C may take to send its final answer before the
    /// caller gets 408 anyway (default 32 s, RFC 3261 64·T1).
    pub cancel_grace: Duration,
    /// The final statuses that mean "not delivered" (default 408, 480, 500, 502, 503, 504).
    pub failover_set: FailoverSet,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            delivery_timer: Duration::from_secs(2),
            setup_timer: Duration::from_secs(10),
            timer_c: Duration::from_secs(180),
            cancel_grace: Duration::from_secs(32),
            failover_set: FailoverSet::default(),
        }
    }
}

// === The plan: points 1, 3 and 4 ===

/// The stages of the rule, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Point 1: the trunk group's bindings on this server.
    Primary,
    /// Point 3: the failover PBX.
    FailoverPbx,
    /// Point 3: the failover number, through the PSTN gateway.
    FailoverNumber,
    /// Point 4: the next trunk servers that have not tried the call.
    NextServer,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Primary => "primary",
            Stage::FailoverPbx => "failover PBX",
            Stage::FailoverNumber => "failover number",
            Stage::NextServer => "next trunk server",
        })
    }
}

/// One place a call can be sent: one branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<T> {
    /// A binding of the DID's trunk group on this server.
    Binding(T),
    /// One target of the failover PBX (a resolved address, or a binding of the failover trunk
    /// group on this server).
    FailoverPbx(T),
    /// A failover number (E.164): the proxy sends the call to the PSTN gateway.
    FailoverNumber(String),
    /// A peer trunk server, by its configured name.
    NextServer(String),
}

impl<T: fmt::Display> fmt::Display for Target<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Binding(t) | Target::FailoverPbx(t) => t.fmt(f),
            Target::FailoverNumber(n) => write!(f, "{n} via the PSTN gateway"),
            Target::NextServer(peer) => f.write_str(peer),
        }
    }
}

/// Why a stage of the plan has the targets it has: what support reads in `explain`, and what
/// the logs say when a call went somewhere surprising.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Point 1: the trunk group's usable bindings on this server.
    Primary {
        trunk_group: TrunkGroupId,
        server: String,
    },
    /// Point 1, nothing to try: the trunk group has no usable binding on this server.
    NotRegistered {
        trunk_group: TrunkGroupId,
        server: String,
    },
    /// No failover PBX is set.
    NoFailoverPbx,
    /// The failover PBX is a SIP URI: each of its resolved targets, in order.
    FailoverPbxUri { uri: String },
    /// The failover PBX is another trunk group: its bindings on this server. That group's own
    /// failover is not applied (no chaining).
    FailoverPbxTrunkGroup {
        trunk_group: TrunkGroupId,
        server: String,
    },
    /// No failover number: neither the DID's own nor a global one.
    NoFailoverNumber,
    /// The DID's own failover number; `global_not_used` is the trunk group's global number it
    /// takes precedence over, if any.
    DidNumber { global_not_used: Option<String> },
    /// The trunk group's global failover number: the DID has none of its own.
    GlobalNumber,
    /// The failover number is not tried: the call was already diverted from this DID or to
    /// that number (a loop through the PSTN).
    AlreadyDiverted { number: String },
    /// The DID has failover, so the call is not passed to `peers` (the seed's "important
    /// detail").
    FailoverKeepsCallHere { server: String, peers: Vec<String> },
    /// The DID has no failover: the trunk servers that have not tried the call, in order.
    NextServers { tried_by: Vec<String> },
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Primary {
                trunk_group,
                server,
            } => write!(
                f,
                "trunk group {trunk_group}'s bindings on {server} (registered, not failing \
                 their probes), highest q first"
            ),
            Why::NotRegistered {
                trunk_group,
                server,
            } => write!(
                f,
                "trunk group {trunk_group} is not registered on {server} (or every binding is \
                 failing its probes)"
            ),
            Why::NoFailoverPbx => f.write_str("no failover PBX set"),
            Why::FailoverPbxUri { uri } => {
                write!(f, "the failover PBX {uri}: every resolved target in order")
            }
            Why::FailoverPbxTrunkGroup {
                trunk_group,
                server,
            } => write!(
                f,
                "the failover PBX is trunk group {trunk_group}: its bindings on {server}; its \
                 own failover is not applied"
            ),
            Why::NoFailoverNumber => {
                f.write_str("no failover number set (neither the DID's own nor a global one)")
            }
            Why::DidNumber {
                global_not_used: None,
            } => f.write_str("the DID's own failover number"),
            Why::DidNumber {
                global_not_used: Some(global),
            } => write!(
                f,
                "the DID's own failover number (the trunk group's global number {global} is not \
                 used)"
            ),
            Why::GlobalNumber => f.write_str(
                "the trunk group's global failover number (the DID has none of its own)",
            ),
            Why::AlreadyDiverted { number } => write!(
                f,
                "the failover number {number} is not tried: the call was already diverted from \
                 this DID or to that number (it would loop)"
            ),
            Why::FailoverKeepsCallHere { server, peers } if peers.is_empty() => {
                write!(f, "the DID has failover: the call stays on {server}")
            }
            Why::FailoverKeepsCallHere { server, peers } => write!(
                f,
                "the DID has failover, so {server} does not pass the call to {} (the seed's \
                 important detail: a PBX registered on only one trunk server gets its calls \
                 failed over while it is up)",
                peers.join(", ")
            ),
            Why::NextServers { tried_by } if tried_by.is_empty() => {
                f.write_str("the DID has no failover: the other trunk servers in order")
            }
            Why::NextServers { tried_by } => write!(
                f,
                "the DID has no failover: the trunk servers that have not tried the call (tried \
                 already: {})",
                tried_by.join(", ")
            ),
        }
    }
}

/// One stage of a call's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStage<T> {
    pub stage: Stage,
    /// The targets, in the order they are tried; empty when the stage has nothing to try.
    pub targets: Vec<Target<T>>,
    /// The failover PBX whose targets are not known yet: they are asked for with
    /// [`Action::ResolveFailoverPbx`] when the call reaches this stage.
    pub unresolved: Option<FailoverPbx>,
    /// Why these targets.
    pub why: Why,
}

impl<T: fmt::Display> fmt::Display for PlannedStage<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.stage)?;
        if let Some(pbx) = &self.unresolved {
            write!(f, "{pbx}, resolved when the call gets here")?;
        } else if self.targets.is_empty() {
            f.write_str("none")?;
        } else {
            for (i, t) in self.targets.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                t.fmt(f)?;
            }
        }
        write!(f, " — {}", self.why)
    }
}

/// The ordered stages for one call (points 1, 3 and 4 of the rule). Every stage of the rule is
/// listed, even when it has nothing to try, so the plan says why at every step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<T> {
    /// Primary, failover PBX, failover number, next trunk server: always these four, in the
    /// order of [`Stage`].
    stages: Vec<PlannedStage<T>>,
}

impl<T> Plan<T> {
    /// Plans a call.
    pub fn new(call: CallFacts<T>) -> Plan<T> {
        let CallFacts {
            trunk_group,
            bindings,
            failover,
            failover_pbx_targets,
            server,
            peers,
            tried_by,
            already_diverted,
        } = call;
        let has_failover = failover.is_configured();

        // 1. The trunk group's own bindings on this server.
        let primary = PlannedStage {
            stage: Stage::Primary,
            why: if bindings.is_empty() {
                Why::NotRegistered {
                    trunk_group,
                    server: server.clone(),
                }
            } else {
                Why::Primary {
                    trunk_group,
                    server: server.clone(),
                }
            },
            targets: bindings.into_iter().map(Target::Binding).collect(),
            unresolved: None,
        };

        // 3. The failover PBX first...
        let mut pbx = PlannedStage {
            stage: Stage::FailoverPbx,
            targets: Vec::new(),
            unresolved: None,
            why: Why::NoFailoverPbx,
        };
        if let Some(setting) = failover.pbx {
            pbx.why = match &setting {
                FailoverPbx::Uri(uri) => Why::FailoverPbxUri { uri: uri.clone() },
                FailoverPbx::TrunkGroup(id) => Why::FailoverPbxTrunkGroup {
                    trunk_group: *id,
                    server: server.clone(),
                },
            };
            match failover_pbx_targets {
                Some(targets) => {
                    pbx.targets = targets.into_iter().map(Target::FailoverPbx).collect()
                }
                None => pbx.unresolved = Some(setting),
            }
        }

        // ...then the failover number: the DID's own, else the global one.
        let (targets, why) = match (failover.did_number, failover.global_number) {
            (Some(own), global) => (
                vec![Target::FailoverNumber(own)],
                Why::DidNumber {
                    global_not_used: global,
                },
            ),
            (None, Some(global)) => (vec![Target::FailoverNumber(global)], Why::GlobalNumber),
            (None, None) => (Vec::new(), Why::NoFailoverNumber),
        };
        let (targets, why) = match targets.first() {
            Some(Target::FailoverNumber(n)) if already_diverted => {
                (Vec::new(), Why::AlreadyDiverted { number: n.clone() })
            }
            _ => (targets, why),
        };
        let number = PlannedStage {
            stage: Stage::FailoverNumber,
            targets,
            unresolved: None,
            why,
        };

        // 4. Only without failover: the trunk servers that have not tried the call.
        let untried: Vec<String> = peers
            .into_iter()
            .filter(|p| *p != server && !tried_by.contains(p))
            .collect();
        let next = if has_failover {
            PlannedStage {
                stage: Stage::NextServer,
                targets: Vec::new(),
                unresolved: None,
                why: Why::FailoverKeepsCallHere {
                    server,
                    peers: untried,
                },
            }
        } else {
            PlannedStage {
                stage: Stage::NextServer,
                targets: untried.into_iter().map(Target::NextServer).collect(),
                unresolved: None,
                why: Why::NextServers { tried_by },
            }
        };

        Plan {
            stages: vec![primary, pbx, number, next],
        }
    }

    /// The stages in the order they are tried.
    pub fn stages(&self) -> &[PlannedStage<T>] {
        &self.stages
    }

    /// One stage of the plan.
    pub fn stage(&self, stage: Stage) -> &PlannedStage<T> {
        // Plan::new lays the stages out in the order of the enum.
        &self.stages[stage as usize]
    }
}

/// The plan as `explain` prints it: one numbered line per stage, then what the caller gets
/// when everything fails.
impl<T: fmt::Display> fmt::Display for Plan<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, stage) in self.stages.iter().enumerate() {
            writeln!(f, "{}. {stage}", i + 1)?;
        }
        f.write_str(
            "if every target fails: the caller gets the best final response received, else 480",
        )
    }
}

// === What the machine says ===

/// One branch of a call: the index of its [`Attempt`] in [`Delivery::attempts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchId(u32);

impl BranchId {
    /// The index of the branch's attempt.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BranchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the proxy must do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<T> {
    /// Send the INVITE to `target` in a new client transaction, and report what happens to it
    /// under `branch`.
    StartBranch { branch: BranchId, target: Target<T> },
    /// Cancel the branch (RFC 3261 §9.1: the CANCEL goes once the branch has sent a
    /// provisional response; before that the transaction is just let go). Its later responses
    /// are still reported: a 2xx that raced the CANCEL matters.
    CancelBranch { branch: BranchId },
    /// Find the failover PBX's targets (RFC 3263 for a URI, the bindings on this server for a
    /// trunk group) and report them with [`Delivery::handle_failover_pbx_targets`], with an
    /// empty list when there are none or the lookup failed.
    ResolveFailoverPbx { pbx: FailoverPbx },
    /// Forward this provisional response (1xx other than 100) of the branch to the caller.
    RelayProvisional { branch: BranchId, status: u16 },
    /// Answer the caller with this final status: with `from` set, the response that branch
    /// sent (its status may be rewritten: 503 becomes 500, RFC 3261 §16.7 step 6); without,
    /// a response the proxy builds.
    Respond { status: u16, from: Option<BranchId> },
    /// A further 2xx of a branch after the caller has its final answer (a retransmission,
    /// or an answer that raced a CANCEL): forward it too (RFC 3261 §16.7 step 10, RFC 6026),
    /// so the caller can ACK it and, if it no longer wants the call, hang it up.
    RelayAnswer { branch: BranchId, status: u16 },
    /// The caller has its final answer; the outcome is for the logs and the call record.
    /// Comes once, right after the [`Action::Respond`].
    Done(DeliveryOutcome<T>),
}

/// How a call ended, for the logs and the call record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome<T> {
    /// A target answered with a 2xx.
    Delivered { target: Target<T>, status: u16 },
    /// A target was reached and its final answer (not a 2xx) was relayed: a busy or declining
    /// PBX, one that rang and gave up, or 408 when Timer C expired.
    Reached { target: Target<T>, status: u16 },
    /// A peer trunk server took the call; `status` is its final answer, relayed.
    PassedToPeer { peer: String, status: u16 },
    /// Every target failed (or there were none): the caller got `status`.
    Failed { status: u16 },
    /// The caller cancelled: it got 487.
    Cancelled,
}

impl<T> DeliveryOutcome<T> {
    /// The final status the caller got.
    pub fn status(&self) -> u16 {
        match self {
            DeliveryOutcome::Delivered { status, .. }
            | DeliveryOutcome::Reached { status, .. }
            | DeliveryOutcome::PassedToPeer { status, .. }
            | DeliveryOutcome::Failed { status } => *status,
            DeliveryOutcome::Cancelled => 487,
        }
    }
}

/// How one attempt (one branch) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 2xx.
    Answered(u16),
    /// A final answer relayed to the caller: outside the failover set, or after ringing.
    Reached(u16),
    /// A final answer in the failover set, before ringing: not delivered.
    FailoverResponse(u16),
    /// Nothing at all within the delivery timer: not delivered, branch cancelled.
    NoResponse,
    /// Only 100 Trying within the setup timer: not delivered, branch cancelled.
    SetupTimeout,
    /// The transport could not deliver the request (or lost the connection).
    TransportError,
    /// Cancelled: the caller cancelled, or another branch answered.
    Cancelled,
    /// Rang, then nothing within Timer C: branch cancelled, the caller got 408.
    TimerC,
    /// A 2xx after the caller already had its final answer; relayed.
    LateAnswer(u16),
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptOutcome::Answered(s) => write!(f, "answered {s}"),
            AttemptOutcome::Reached(s) => write!(f, "reached, final {s} relayed"),
            AttemptOutcome::FailoverResponse(s) => write!(f, "not delivered: {s}"),
            AttemptOutcome::NoResponse => {
                f.write_str("not delivered: no response (delivery timer)")
            }
            AttemptOutcome::SetupTimeout => {
                f.write_str("not delivered: only 100 Trying (setup timer)")
            }
            AttemptOutcome::TransportError => f.write_str("transport error"),
            AttemptOutcome::Cancelled => f.write_str("cancelled"),
            AttemptOutcome::TimerC => f.write_str("rang too long (Timer C)"),
            AttemptOutcome::LateAnswer(s) => write!(f, "answered {s} too late"),
        }
    }
}

/// One target tried: the call record's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt<T> {
    pub branch: BranchId,
    pub stage: Stage,
    pub target: Target<T>,
    pub started: Instant,
    /// When the attempt's outcome was decided; `None` while it runs.
    pub ended: Option<Instant>,
    pub outcome: Option<AttemptOutcome>,
}

impl<T> Attempt<T> {
    /// How long the attempt took, once decided.
    pub fn duration(&self) -> Option<Duration> {
        self.ended
            .map(|e| e.saturating_duration_since(self.started))
    }
}

/// The better of two final failure statuses for the caller (RFC 3261 §16.7 step 6,
/// simplified): a 6xx wins, then the lowest class; within a class the one received first
/// (`a`) stays. The caller never sees 503 from a proxy: [`Action::Respond`] maps it to 500.
pub fn better_response(a: u16, b: u16) -> u16 {
    let rank = |s: u16| if s >= 600 { 0 } else { s / 100 };
    if rank(b) < rank(a) { b } else { a }
}

// === The machine: point 2 ===

/// Where the current branch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// INVITE sent, nothing heard: the delivery timer runs.
    Sent,
    /// A bare 100 Trying: the setup timer runs.
    Trying,
    /// Rang (or, for a peer trunk server, answered at all): reached, Timer C runs.
    Reached,
    /// Timer C fired, the branch is cancelled: waiting for its final answer (cancel grace).
    TimerCExpired,
}

#[derive(Debug, Clone, Copy)]
struct Current {
    branch: BranchId,
    phase: Phase,
    deadline: Option<Instant>,
}

/// The delivery of one inbound call: walks its [`Plan`] one branch at a time and applies the
/// rule's "failure to deliver".
///
/// Feed it everything that happens to its branches and to the caller, each with `now`; after
/// each call, drain [`poll_action`](Self::poll_action) and re-arm the timer from
/// [`poll_timeout`](Self::poll_timeout). A client transaction's Timer B (a timeout) is
/// reported as a 408 response; its transport error with
/// [`handle_transport_error`](Self::handle_transport_error).
#[derive(Debug)]
pub struct Delivery<T> {
    plan: Plan<T>,
    config: DeliveryConfig,
    /// The next target to try: a stage index, and a target index within it.
    next_stage: usize,
    next_target: usize,
    current: Option<Current>,
    /// Waiting for the proxy to report the failover PBX's targets.
    resolving: bool,
    /// The best failure response so far, and the branch that sent it.
    best: Option<(u16, BranchId)>,
    attempts: Vec<Attempt<T>>,
    actions: VecDeque<Action<T>>,
    outcome: Option<DeliveryOutcome<T>>,
}

// === impl Delivery ===

impl<T: Clone + fmt::Display> Delivery<T> {
    /// Plans the call and starts its first branch (or answers the caller at once when there is
    /// nothing to try).
    pub fn new(now: Instant, call: CallFacts<T>, config: DeliveryConfig) -> Self {
        Self::with_plan(now, Plan::new(call), config)
    }

    /// Starts delivering along a plan already made.
    pub fn with_plan(now: Instant, plan: Plan<T>, config: DeliveryConfig) -> Self {
        let mut delivery = Delivery {
            plan,
            config,
            next_stage: 0,
            next_target: 0,
            current: None,
            resolving: false,
            best: None,
            attempts: Vec::new(),
            actions: VecDeque::new(),
            outcome: None,
        };
        delivery.try_next(now);
        delivery
    }

    /// The next thing the proxy must do.
    pub fn poll_action(&mut self) -> Option<Action<T>> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.current.and_then(|c| c.deadline)
    }

    /// The plan being followed (the failover PBX's stage fills in once resolved).
    pub fn plan(&self) -> &Plan<T> {
        &self.plan
    }

    /// Every target tried so far, in order; [`BranchId::index`] indexes it.
    pub fn attempts(&self) -> &[Attempt<T>] {
        &self.attempts
    }

    /// How the call ended, once the caller has its final answer.
    pub fn outcome(&self) -> Option<&DeliveryOutcome<T>> {
        self.outcome.as_ref()
    }

    /// Whether the caller has its final answer. The proxy keeps the delivery while branches
    /// may still send a 2xx (their transactions are alive).
    pub fn is_done(&self) -> bool {
        self.outcome.is_some()
    }

    /// A response of a branch (any status, 2xx retransmissions included).
    pub fn handle_response(&mut self, now: Instant, branch: BranchId, status: u16) {
        if branch.index() >= self.attempts.len() || !(100..=699).contains(&status) {
            return;
        }
        let Some(mut cur) = self.current.filter(|c| c.branch == branch) else {
            // A branch already given up on, or any branch after the end: only a 2xx still
            // matters (the callee picked up).
            if is_success(status) {
                self.late_answer(now, branch, status);
            }
            return;
        };
        let peer = matches!(self.attempts[branch.index()].target, Target::NextServer(_));
        match status {
            100 => {
                if cur.phase == Phase::Sent {
                    // A peer that answers at all has taken the call: it runs this rule itself,
                    // which takes its own timers, so only Timer C bounds it.
                    (cur.phase, cur.deadline) = if peer {
                        (Phase::Reached, now.checked_add(self.config.timer_c))
                    } else {
                        (Phase::Trying, now.checked_add(self.config.setup_timer))
                    };
                    self.current = Some(cur);
                }
            }
            101..=199 => {
                if cur.phase != Phase::TimerCExpired {
                    // It rang: reached. Each provisional restarts Timer C (RFC 3261 §16.7).
                    cur.phase = Phase::Reached;
                    cur.deadline = now.checked_add(self.config.timer_c);
                    self.current = Some(cur);
                    self.actions
                        .push_back(Action::RelayProvisional { branch, status });
                }
            }
            200..=299 => {
                self.current = None;
                self.end_attempt(now, branch, AttemptOutcome::Answered(status));
                self.relay_final(branch, status);
            }
            _ => {
                self.current = None;
                match cur.phase {
                    Phase::TimerCExpired if status == 487 => {
                        self.end_attempt(now, branch, AttemptOutcome::TimerC);
                        self.answer_after_timer_c(branch);
                    }
                    Phase::Sent | Phase::Trying
                        if !peer && self.config.failover_set.contains(status) =>
                    {
                        self.end_attempt(now, branch, AttemptOutcome::FailoverResponse(status));
                        self.best = match self.best {
                            Some((best, from)) if better_response(best, status) == best => {
                                Some((best, from))
                            }
                            _ => Some((status, branch)),
                        };
                        self.try_next(now);
                    }
                    _ => {
                        self.end_attempt(now, branch, AttemptOutcome::Reached(status));
                        self.relay_final(branch, status);
                    }
                }
            }
        }
    }

    /// The branch's request could not be delivered, or its connection broke: acted on at once.
    pub fn handle_transport_error(&mut self, now: Instant, branch: BranchId) {
        let Some(cur) = self.current.filter(|c| c.branch == branch) else {
            return;
        };
        self.current = None;
        self.end_attempt(now, branch, AttemptOutcome::TransportError);
        match cur.phase {
            Phase::Sent | Phase::Trying => self.try_next(now),
            // It rang and went away: reached, so no failover; nothing to relay.
            Phase::Reached => {
                let outcome = self.reached_outcome(branch, 480);
                self.answer(480, None, outcome);
            }
            Phase::TimerCExpired => self.answer_after_timer_c(branch),
        }
    }

    /// The caller cancelled: cancel the current branch, start no other, answer 487.
    pub fn handle_cancel(&mut self, now: Instant) {
        if self.is_done() {
            return;
        }
        if let Some(cur) = self.current.take() {
            if cur.phase != Phase::TimerCExpired {
                self.actions
                    .push_back(Action::CancelBranch { branch: cur.branch });
            }
            self.end_attempt(now, cur.branch, AttemptOutcome::Cancelled);
        }
        self.resolving = false;
        self.answer(487, None, DeliveryOutcome::Cancelled);
    }

    /// The failover PBX's targets, after [`Action::ResolveFailoverPbx`].
    pub fn handle_failover_pbx_targets(&mut self, now: Instant, targets: Vec<T>) {
        if !self.resolving {
            return;
        }
        self.resolving = false;
        let stage = &mut self.plan.stages[self.next_stage];
        stage.unresolved = None;
        stage.targets = targets.into_iter().map(Target::FailoverPbx).collect();
        self.try_next(now);
    }

    /// Fires the current branch's timer if it is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(mut cur) = self.current else {
            return;
        };
        if cur.deadline.is_none_or(|d| d > now) {
            return;
        }
        let branch = cur.branch;
        match cur.phase {
            Phase::Sent | Phase::Trying => {
                self.current = None;
                self.actions.push_back(Action::CancelBranch { branch });
                let outcome = if cur.phase == Phase::Sent {
                    AttemptOutcome::NoResponse
                } else {
                    AttemptOutcome::SetupTimeout
                };
                self.end_attempt(now, branch, outcome);
                self.try_next(now);
            }
            Phase::Reached => {
                // Timer C (RFC 3261 §16.8): cancel, and wait a while for the branch's final.
                self.actions.push_back(Action::CancelBranch { branch });
                cur.phase = Phase::TimerCExpired;
                cur.deadline = now.checked_add(self.config.cancel_grace);
                self.current = Some(cur);
            }
            Phase::TimerCExpired => {
                self.current = None;
                self.end_attempt(now, branch, AttemptOutcome::TimerC);
                self.answer_after_timer_c(branch);
            }
        }
    }

    /// Starts the next target of the plan; when none is left, answers the caller with the best
    /// failure received, else 480.
    fn try_next(&mut self, now: Instant) {
        debug_assert!(self.current.is_none() && !self.is_done());
        while let Some(stage) = self.plan.stages.get(self.next_stage) {
            if let Some(pbx) = &stage.unresolved {
                self.resolving = true;
                self.actions
                    .push_back(Action::ResolveFailoverPbx { pbx: pbx.clone() });
                return;
            }
            if let Some(target) = stage.targets.get(self.next_target) {
                let (kind, target) = (stage.stage, target.clone());
                self.next_target += 1;
                self.start_branch(now, kind, target);
                return;
            }
            self.next_stage += 1;
            self.next_target = 0;
        }
        let (status, from) = match self.best {
            Some((503, from)) => (500, Some(from)),
            Some((status, from)) => (status, Some(from)),
            None => (480, None),
        };
        self.answer(status, from, DeliveryOutcome::Failed { status });
    }

    fn start_branch(&mut self, now: Instant, stage: Stage, target: Target<T>) {
        let branch = BranchId(self.attempts.len() as u32);
        self.attempts.push(Attempt {
            branch,
            stage,
            target: target.clone(),
            started: now,
            ended: None,
            outcome: None,
        });
        self.current = Some(Current {
            branch,
            phase: Phase::Sent,
            deadline: now.checked_add(self.config.delivery_timer),
        });
        self.actions
            .push_back(Action::StartBranch { branch, target });
    }

    fn end_attempt(&mut self, now: Instant, branch: BranchId, outcome: AttemptOutcome) {
        let attempt = &mut self.attempts[branch.index()];
        attempt.ended = Some(now);
        attempt.outcome = Some(outcome);
        info!(
            branch = branch.0,
            stage = %attempt.stage,
            branch_target = %attempt.target,
            outcome = %outcome,
            elapsed_ms = attempt.duration().unwrap_or_default().as_millis() as u64,
            "delivery attempt ended"
        );
    }

    /// A 2xx on a branch that is not the current one.
    fn late_answer(&mut self, now: Instant, branch: BranchId, status: u16) {
        if self.is_done() {
            let attempt = &mut self.attempts[branch.index()];
            if !matches!(attempt.outcome, Some(AttemptOutcome::Answered(_))) {
                attempt.outcome = Some(AttemptOutcome::LateAnswer(status));
            }
            self.actions
                .push_back(Action::RelayAnswer { branch, status });
            return;
        }
        // A branch given up on for its silence picked up after all: take it, drop the rest.
        if let Some(cur) = self.current.take() {
            self.actions
                .push_back(Action::CancelBranch { branch: cur.branch });
            self.end_attempt(now, cur.branch, AttemptOutcome::Cancelled);
        }
        self.resolving = false;
        self.end_attempt(now, branch, AttemptOutcome::Answered(status));
        self.relay_final(branch, status);
    }

    fn relay_final(&mut self, branch: BranchId, status: u16) {
        // A proxy never passes 503 on: the caller would take it as this server being
        // unavailable and retry elsewhere (RFC 3261 §16.7 step 6).
        let status = if status == 503 { 500 } else { status };
        let outcome = self.reached_outcome(branch, status);
        self.answer(status, Some(branch), outcome);
    }

    /// Timer C ran out on a reached branch: the caller gets 408.
    fn answer_after_timer_c(&mut self, branch: BranchId) {
        let outcome = self.reached_outcome(branch, 408);
        self.answer(408, None, outcome);
    }

    fn reached_outcome(&self, branch: BranchId, status: u16) -> DeliveryOutcome<T> {
        match &self.attempts[branch.index()].target {
            Target::NextServer(peer) => DeliveryOutcome::PassedToPeer {
                peer: peer.clone(),
                status,
            },
            target if is_success(status) => DeliveryOutcome::Delivered {
                target: target.clone(),
                status,
            },
            target => DeliveryOutcome::Reached {
                target: target.clone(),
                status,
            },
        }
    }

    fn answer(&mut self, status: u16, from: Option<BranchId>, outcome: DeliveryOutcome<T>) {
        info!(
            status,
            attempts = self.attempts.len(),
            outcome = outcome_name(&outcome),
            "delivery finished"
        );
        self.actions.push_back(Action::Respond { status, from });
        self.actions.push_back(Action::Done(outcome.clone()));
        self.outcome = Some(outcome);
    }
}

fn is_success(status: u16) -> bool {
    (200..=299).contains(&status)
}

fn outcome_name<T>(outcome: &DeliveryOutcome<T>) -> &'static str {
    match outcome {
        DeliveryOutcome::Delivered { .. } => "delivered",
        DeliveryOutcome::Reached { .. } => "reached",
        DeliveryOutcome::PassedToPeer { .. } => "passed to peer",
        DeliveryOutcome::Failed { .. } => "failed",
        DeliveryOutcome::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type D = Delivery<&'static str>;
    type A = Action<&'static str>;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn b(n: u32) -> BranchId {
        BranchId(n)
    }

    /// trunk1 of trunk1, trunk2; trunk group 5; the given bindings; no failover.
    fn facts(bindings: &[&'static str]) -> CallFacts<&'static str> {
        CallFacts {
            trunk_group: 5,
            bindings: bindings.to_vec(),
            failover: FailoverPlan::default(),
            failover_pbx_targets: None,
            server: "trunk1".into(),
            peers: vec!["trunk1".into(), "trunk2".into()],
            tried_by: Vec::new(),
            already_diverted: false,
        }
    }

    fn with_number(mut call: CallFacts<&'static str>, n: &str) -> CallFacts<&'static str> {
        call.failover.did_number = Some(n.into());
        call
    }

    fn drain(d: &mut D) -> Vec<A> {
        std::iter::from_fn(|| d.poll_action()).collect()
    }

    fn start(n: u32, target: Target<&'static str>) -> A {
        Action::StartBranch {
            branch: b(n),
            target,
        }
    }

    fn respond(status: u16, from: Option<u32>) -> A {
        Action::Respond {
            status,
            from: from.map(b),
        }
    }

    fn outcomes(d: &D) -> Vec<Option<AttemptOutcome>> {
        d.attempts().iter().map(|a| a.outcome).collect()
    }

    fn started_targets(actions: &[A]) -> Vec<Target<&'static str>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::StartBranch { target, .. } => Some(target.clone()),
                _ => None,
            })
            .collect()
    }

    // === point 1: primary ===

    #[test]
    fn primary_answers_200() {
        let t0 = Instant::now();
        let mut d = D::new(t0, facts(&["pbx-a", "pbx-b"]), DeliveryConfig::default());
        assert_eq!(drain(&mut d), [start(0, Target::Binding("pbx-a"))]);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(2000)));
        d.handle_response(t0 + ms(10), b(0), 100);
        d.handle_response(t0 + ms(20), b(0), 180);
        assert_eq!(
            drain(&mut d),
            [Action::RelayProvisional {
                branch: b(0),
                status: 180
            }]
        );
        d.handle_response(t0 + ms(3000), b(0), 200);
        let done = DeliveryOutcome::Delivered {
            target: Target::Binding("pbx-a"),
            status: 200,
        };
        assert_eq!(
            drain(&mut d),
            [respond(200, Some(0)), Action::Done(done.clone())]
        );
        assert_eq!(d.outcome(), Some(&done));
        assert_eq!(d.poll_timeout(), None);
        let a = &d.attempts()[0];
        assert_eq!(a.outcome, Some(AttemptOutcome::Answered(200)));
        assert_eq!(a.stage, Stage::Primary);
        assert_eq!(a.duration(), Some(ms(3000)));
        // The 2xx retransmission is forwarded too, and the record stays "answered".
        d.handle_response(t0 + ms(3500), b(0), 200);
        assert_eq!(
            drain(&mut d),
            [Action::RelayAnswer {
                branch: b(0),
                status: 200
            }]
        );
        assert_eq!(outcomes(&d), [Some(AttemptOutcome::Answered(200))]);
    }

    #[test]
    fn busy_486_is_relayed_without_failover() {
        let t0 = Instant::now();
        let call = with_number(facts(&["pbx-a", "pbx-b"]), "+15550001111");
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0 + ms(30), b(0), 486);
        assert_eq!(
            drain(&mut d),
            [
                respond(486, Some(0)),
                Action::Done(DeliveryOutcome::Reached {
                    target: Target::Binding("pbx-a"),
                    status: 486
                })
            ]
        );
        assert_eq!(outcomes(&d), [Some(AttemptOutcome::Reached(486))]);
    }

    #[test]
    fn any_final_outside_the_failover_set_is_relayed() {
        for status in [404, 600, 603, 302] {
            let t0 = Instant::now();
            let call = with_number(facts(&["pbx-a"]), "+15550001111");
            let mut d = D::new(t0, call, DeliveryConfig::default());
            drain(&mut d);
            d.handle_response(t0, b(0), status);
            assert_eq!(drain(&mut d)[0], respond(status, Some(0)), "{status}");
        }
    }

    // === point 2: failure to deliver ===

    #[test]
    fn failover_status_tries_the_next_binding_then_the_failover() {
        let t0 = Instant::now();
        let call = with_number(facts(&["pbx-a", "pbx-b"]), "+15550001111");
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0 + ms(10), b(0), 503);
        assert_eq!(drain(&mut d), [start(1, Target::Binding("pbx-b"))]);
        d.handle_response(t0 + ms(20), b(1), 100);
        d.handle_response(t0 + ms(30), b(1), 503);
        assert_eq!(
            drain(&mut d),
            [start(2, Target::FailoverNumber("+15550001111".into()))]
        );
        assert_eq!(d.attempts()[2].stage, Stage::FailoverNumber);
        d.handle_response(t0 + ms(40), b(2), 503);
        // The best response is the first 503, which a proxy passes on as 500.
        assert_eq!(
            drain(&mut d),
            [
                respond(500, Some(0)),
                Action::Done(DeliveryOutcome::Failed { status: 500 })
            ]
        );
        assert_eq!(
            outcomes(&d),
            [Some(AttemptOutcome::FailoverResponse(503)); 3]
        );
    }

    #[test]
    fn a_target_that_rang_is_reached_even_with_a_failover_status() {
        let t0 = Instant::now();
        let call = with_number(facts(&["pbx-a", "pbx-b"]), "+15550001111");
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0 + ms(10), b(0), 180);
        d.handle_response(t0 + ms(5000), b(0), 480);
        assert_eq!(
            drain(&mut d),
            [
                Action::RelayProvisional {
                    branch: b(0),
                    status: 180
                },
                respond(480, Some(0)),
                Action::Done(DeliveryOutcome::Reached {
                    target: Target::Binding("pbx-a"),
                    status: 480
                })
            ]
        );
        assert_eq!(d.attempts().len(), 1);
        // 183 (early media) counts as ringing too.
        let mut d = D::new(t0, facts(&["pbx-a", "pbx-b"]), DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0, b(0), 183);
        d.handle_response(t0, b(0), 503);
        // Relayed, no failover; as 500 (a proxy never passes 503 on).
        assert_eq!(drain(&mut d)[1], respond(500, Some(0)));
    }

    #[test]
    fn silent_target_fails_after_the_delivery_timer() {
        let t0 = Instant::now();
        let mut d = D::new(t0, facts(&["pbx-a", "pbx-b"]), DeliveryConfig::default());
        drain(&mut d);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(2000)));
        d.handle_timeout(t0 + ms(1999));
        assert_eq!(drain(&mut d), []);
        d.handle_timeout(t0 + ms(2000));
        assert_eq!(
            drain(&mut d),
            [
                Action::CancelBranch { branch: b(0) },
                start(1, Target::Binding("pbx-b"))
            ]
        );
        assert_eq!(d.attempts()[0].outcome, Some(AttemptOutcome::NoResponse));
        assert_eq!(d.attempts()[0].duration(), Some(ms(2000)));
        assert_eq!(d.attempts()[1].started, t0 + ms(2000));
        assert_eq!(d.poll_timeout(), Some(t0 + ms(4000)));
        // Its late 180 and 487 change nothing.
        d.handle_response(t0 + ms(2100), b(0), 180);
        d.handle_response(t0 + ms(2200), b(0), 487);
        assert_eq!(drain(&mut d), []);
    }

    #[test]
    fn bare_100_fails_after_the_setup_timer() {
        let t0 = Instant::now();
        let mut d = D::new(t0, facts(&["pbx-a", "pbx-b"]), DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0 + ms(100), b(0), 100);
        assert_eq!(drain(&mut d), []);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(10_100)));
        d.handle_timeout(t0 + ms(2000));
        assert_eq!(drain(&mut d), []);
        d.handle_timeout(t0 + ms(10_100));
        assert_eq!(
            drain(&mut d),
            [
                Action::CancelBranch { branch: b(0) },
                start(1, Target::Binding("pbx-b"))
            ]
        );
        assert_eq!(d.attempts()[0].outcome, Some(AttemptOutcome::SetupTimeout));
        assert_eq!(d.attempts()[0].duration(), Some(ms(10_100)));
    }

    #[test]
    fn transport_error_moves_on_at_once() {
        let t0 = Instant::now();
        let call = with_number(facts(&["pbx-a"]), "+15550001111");
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_transport_error(t0 + ms(3), b(0));
        // No CANCEL for a request that never arrived, no timer waited for.
        assert_eq!(
            drain(&mut d),
            [start(1, Target::FailoverNumber("+15550001111".into()))]
        );
        assert_eq!(
            d.attempts()[0].outcome,
            Some(AttemptOutcome::TransportError)
        );
        assert_eq!(d.attempts()[0].duration(), Some(ms(3)));
        assert_eq!(d.attempts()[1].started, t0 + ms(3));
        // A repeated report for the same branch is ignored.
        d.handle_transport_error(t0 + ms(4), b(0));
        assert_eq!(drain(&mut d), []);
    }

    #[test]
    fn transport_error_after_ringing_gives_480_without_failover() {
        let t0 = Instant::now();
        let call = with_number(facts(&["pbx-a"]), "+15550001111");
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0, b(0), 180);
        drain(&mut d);
        d.handle_transport_error(t0 + ms(500), b(0));
        assert_eq!(
            drain(&mut d),
            [
                respond(480, None),
                Action::Done(DeliveryOutcome::Reached {
                    target: Target::Binding("pbx-a"),
                    status: 480
                })
            ]
        );
    }

    #[test]
    fn timer_c_after_ringing_cancels_and_answers_408() {
        let t0 = Instant::now();
        let mut d = D::new(t0, facts(&["pbx-a", "pbx-b"]), DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0 + ms(1000), b(0), 180);
        drain(&mut d);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(181_000)));
        // Each provisional restarts Timer C.
        d.handle_response(t0 + ms(2000), b(0), 183);
        drain(&mut d);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(182_000)));
        d.handle_timeout(t0 + ms(182_000));
        assert_eq!(drain(&mut d), [Action::CancelBranch { branch: b(0) }]);
        // The 487 of the cancelled branch becomes 408 for the caller; no next binding.
        d.handle_response(t0 + ms(182_050), b(0), 487);
        assert_eq!(
            drain(&mut d),
            [
                respond(408, None),
                Action::Done(DeliveryOutcome::Reached {
                    target: Target::Binding("pbx-a"),
                    status: 408
                })
            ]
        );
        assert_eq!(outcomes(&d), [Some(AttemptOutcome::TimerC)]);
        assert_eq!(d.attempts()[0].duration(), Some(ms(182_050)));
    }

    #[test]
    fn timer_c_without_any_final_answers_408_after_the_grace() {
        let t0 = Instant::now();
        let config = DeliveryConfig::default();
        let mut d = D::new(t0, facts(&["pbx-a"]), config);
        drain(&mut d);
        d.handle_response(t0, b(0), 180);
        d.handle_timeout(t0 + config.timer_c);
        drain(&mut d);
        assert_eq!(
            d.poll_timeout(),
            Some(t0 + config.timer_c + config.cancel_grace)
        );
        d.handle_timeout(t0 + config.timer_c + config.cancel_grace);
        assert_eq!(
            drain(&mut d),
            [
                respond(408, None),
                Action::Done(DeliveryOutcome::Reached {
                    target: Target::Binding("pbx-a"),
                    status: 408
                })
            ]
        );
    }

    #[test]
    fn answer_racing_timer_c_is_relayed() {
        let t0 = Instant::now();
        let mut d = D::new(t0, facts(&["pbx-a"]), DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0, b(0), 180);
        d.handle_timeout(t0 + ms(180_000));
        drain(&mut d);
        d.handle_response(t0 + ms(180_001), b(0), 200);
        assert_eq!(drain(&mut d)[0], respond(200, Some(0)));
    }

    #[test]
    fn late_answer_of_a_silent_target_is_taken() {
        let t0 = Instant::now();
        let mut d = D::new(t0, facts(&["pbx-a", "pbx-b"]), DeliveryConfig::default());
        drain(&mut d);
        d.handle_timeout(t0 + ms(2000));
        drain(&mut d);
        d.handle_response(t0 + ms(2500), b(0), 200);
        assert_eq!(
            drain(&mut d),
            [
                Action::CancelBranch { branch: b(1) },
                respond(200, Some(0)),
                Action::Done(DeliveryOutcome::Delivered {
                    target: Target::Binding("pbx-a"),
                    status: 200
                })
            ]
        );
        assert_eq!(
            outcomes(&d),
            [
                Some(AttemptOutcome::Answered(200)),
                Some(AttemptOutcome::Cancelled)
            ]
        );
    }

    // === point 3: failover ===

    #[test]
    fn no_bindings_tries_the_failover_pbx_then_the_number() {
        let t0 = Instant::now();
        let mut call = facts(&[]);
        call.failover = FailoverPlan {
            did_number: None,
            global_number: Some("+15550002222".into()),
            pbx: Some(FailoverPbx::Uri("sip:backup.example.com".into())),
        };
        call.failover_pbx_targets = Some(vec!["backup-1", "backup-2"]);
        let mut d = D::new(t0, call, DeliveryConfig::default());
        assert_eq!(drain(&mut d), [start(0, Target::FailoverPbx("backup-1"))]);
        d.handle_transport_error(t0 + ms(1), b(0));
        assert_eq!(drain(&mut d), [start(1, Target::FailoverPbx("backup-2"))]);
        d.handle_response(t0 + ms(2), b(1), 503);
        assert_eq!(
            drain(&mut d),
            [start(2, Target::FailoverNumber("+15550002222".into()))]
        );
        d.handle_response(t0 + ms(3), b(2), 200);
        assert_eq!(
            drain(&mut d)[1],
            Action::Done(DeliveryOutcome::Delivered {
                target: Target::FailoverNumber("+15550002222".into()),
                status: 200
            })
        );
        let stages: Vec<Stage> = d.attempts().iter().map(|a| a.stage).collect();
        assert_eq!(
            stages,
            [
                Stage::FailoverPbx,
                Stage::FailoverPbx,
                Stage::FailoverNumber
            ]
        );
    }

    #[test]
    fn failover_pbx_is_resolved_only_when_reached() {
        let t0 = Instant::now();
        let mut call = with_number(facts(&["pbx-a"]), "+15550001111");
        call.failover.pbx = Some(FailoverPbx::Uri("sip:backup.example.com".into()));
        let mut d = D::new(t0, call, DeliveryConfig::default());
        // The PBX is tried first; no lookup yet.
        assert_eq!(drain(&mut d), [start(0, Target::Binding("pbx-a"))]);
        d.handle_response(t0 + ms(5), b(0), 480);
        assert_eq!(
            drain(&mut d),
            [Action::ResolveFailoverPbx {
                pbx: FailoverPbx::Uri("sip:backup.example.com".into())
            }]
        );
        assert_eq!(d.poll_timeout(), None);
        d.handle_failover_pbx_targets(t0 + ms(50), vec!["backup-1"]);
        assert_eq!(drain(&mut d), [start(1, Target::FailoverPbx("backup-1"))]);
        assert_eq!(
            d.plan().stages[1].targets,
            [Target::FailoverPbx("backup-1")]
        );
        // A second report is ignored.
        d.handle_failover_pbx_targets(t0 + ms(60), vec!["backup-9"]);
        assert_eq!(drain(&mut d), []);
    }

    #[test]
    fn failover_pbx_that_resolves_to_nothing_falls_to_the_number() {
        let t0 = Instant::now();
        let mut call = with_number(facts(&[]), "+15550001111");
        call.failover.pbx = Some(FailoverPbx::Uri("sip:gone.example.com".into()));
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_failover_pbx_targets(t0 + ms(50), Vec::new());
        assert_eq!(
            drain(&mut d),
            [start(0, Target::FailoverNumber("+15550001111".into()))]
        );
    }

    #[test]
    fn failover_trunk_group_without_bindings_falls_to_the_number() {
        let t0 = Instant::now();
        let mut call = with_number(facts(&[]), "+15550001111");
        call.failover.pbx = Some(FailoverPbx::TrunkGroup(7));
        call.failover_pbx_targets = Some(Vec::new());
        let mut d = D::new(t0, call, DeliveryConfig::default());
        assert_eq!(
            drain(&mut d),
            [start(0, Target::FailoverNumber("+15550001111".into()))]
        );
    }

    #[test]
    fn failover_trunk_group_gets_its_bindings_here() {
        let t0 = Instant::now();
        let mut call = facts(&[]);
        call.failover.pbx = Some(FailoverPbx::TrunkGroup(7));
        call.failover_pbx_targets = Some(vec!["group7-a"]);
        let mut d = D::new(t0, call, DeliveryConfig::default());
        assert_eq!(drain(&mut d), [start(0, Target::FailoverPbx("group7-a"))]);
        // It fails: no chaining to group 7's own failover, no peer: 480... from the best.
        d.handle_response(t0, b(0), 480);
        assert_eq!(drain(&mut d)[0], respond(480, Some(0)));
    }

    #[test]
    fn the_dids_own_number_wins_over_the_global_one() {
        let t0 = Instant::now();
        let mut call = facts(&[]);
        call.failover.did_number = Some("+15550001111".into());
        call.failover.global_number = Some("+15550002222".into());
        let mut d = D::new(t0, call, DeliveryConfig::default());
        let actions = drain(&mut d);
        assert_eq!(
            started_targets(&actions),
            [Target::FailoverNumber("+15550001111".into())]
        );
        // Only one number is ever tried.
        d.handle_response(t0, b(0), 503);
        assert_eq!(started_targets(&drain(&mut d)), []);
    }

    #[test]
    fn an_already_diverted_call_skips_the_number_but_stays_here() {
        let t0 = Instant::now();
        let mut call = facts(&[]);
        call.failover.did_number = Some("+15550001111".into());
        call.already_diverted = true;
        let plan = Plan::new(call.clone());
        assert_eq!(
            plan.stage(Stage::FailoverNumber).why,
            Why::AlreadyDiverted {
                number: "+15550001111".into()
            }
        );
        // Still "has failover": not passed to trunk2 either; the caller gets 480.
        let mut d = D::new(t0, call, DeliveryConfig::default());
        assert_eq!(drain(&mut d)[0], respond(480, None));
    }

    #[test]
    fn only_a_global_number() {
        let t0 = Instant::now();
        let mut call = facts(&[]);
        call.failover.global_number = Some("+15550002222".into());
        let mut d = D::new(t0, call, DeliveryConfig::default());
        assert_eq!(
            drain(&mut d),
            [start(0, Target::FailoverNumber("+15550002222".into()))]
        );
    }

    #[test]
    fn failover_configured_never_passes_to_another_server() {
        let t0 = Instant::now();
        let mut call = with_number(facts(&["pbx-a"]), "+15550001111");
        call.peers = vec!["trunk1".into(), "trunk2".into(), "trunk3".into()];
        let mut d = D::new(t0, call, DeliveryConfig::default());
        let mut actions = drain(&mut d);
        d.handle_timeout(t0 + ms(2000));
        actions.extend(drain(&mut d));
        d.handle_response(t0 + ms(2100), b(1), 480);
        actions.extend(drain(&mut d));
        assert_eq!(
            started_targets(&actions),
            [
                Target::Binding("pbx-a"),
                Target::FailoverNumber("+15550001111".into())
            ]
        );
        assert_eq!(
            actions.last(),
            Some(&Action::Done(DeliveryOutcome::Failed { status: 480 }))
        );
        assert_eq!(
            d.plan().stage(Stage::NextServer).why,
            Why::FailoverKeepsCallHere {
                server: "trunk1".into(),
                peers: vec!["trunk2".into(), "trunk3".into()]
            }
        );
    }

    #[test]
    fn cancel_during_failover_cancels_the_branch_and_answers_487() {
        let t0 = Instant::now();
        let call = with_number(facts(&["pbx-a"]), "+15550001111");
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0 + ms(10), b(0), 503);
        drain(&mut d);
        d.handle_response(t0 + ms(20), b(1), 180);
        drain(&mut d);
        d.handle_cancel(t0 + ms(900));
        assert_eq!(
            drain(&mut d),
            [
                Action::CancelBranch { branch: b(1) },
                respond(487, None),
                Action::Done(DeliveryOutcome::Cancelled)
            ]
        );
        assert_eq!(d.poll_timeout(), None);
        assert_eq!(d.attempts()[1].outcome, Some(AttemptOutcome::Cancelled));
        assert_eq!(d.attempts()[1].duration(), Some(ms(890)));
        // Nothing starts afterwards: not the branch's 487, a timeout or a second CANCEL.
        d.handle_response(t0 + ms(950), b(1), 487);
        d.handle_timeout(t0 + ms(100_000));
        d.handle_cancel(t0 + ms(100_001));
        assert_eq!(drain(&mut d), []);
        // A 2xx that raced the CANCEL is still forwarded, so the caller can hang it up.
        d.handle_response(t0 + ms(960), b(1), 200);
        assert_eq!(
            drain(&mut d),
            [Action::RelayAnswer {
                branch: b(1),
                status: 200
            }]
        );
        assert_eq!(
            d.attempts()[1].outcome,
            Some(AttemptOutcome::LateAnswer(200))
        );
        assert_eq!(d.outcome(), Some(&DeliveryOutcome::Cancelled));
    }

    #[test]
    fn cancel_while_the_failover_pbx_is_being_resolved() {
        let t0 = Instant::now();
        let mut call = facts(&[]);
        call.failover.pbx = Some(FailoverPbx::Uri("sip:backup.example.com".into()));
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_cancel(t0 + ms(5));
        assert_eq!(
            drain(&mut d),
            [respond(487, None), Action::Done(DeliveryOutcome::Cancelled)]
        );
        d.handle_failover_pbx_targets(t0 + ms(50), vec!["backup-1"]);
        assert_eq!(drain(&mut d), []);
    }

    // === point 4: next trunk server ===

    #[test]
    fn no_failover_passes_to_the_next_server() {
        let t0 = Instant::now();
        let mut d = D::new(t0, facts(&["pbx-a"]), DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0 + ms(10), b(0), 503);
        assert_eq!(
            drain(&mut d),
            [start(1, Target::NextServer("trunk2".into()))]
        );
        assert_eq!(d.attempts()[1].stage, Stage::NextServer);
        // trunk2 takes the call with its 100: no setup timer for a peer, Timer C instead.
        d.handle_response(t0 + ms(11), b(1), 100);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(11) + ms(180_000)));
        // Its final answer is relayed whatever it is.
        d.handle_response(t0 + ms(4000), b(1), 480);
        assert_eq!(
            drain(&mut d),
            [
                respond(480, Some(1)),
                Action::Done(DeliveryOutcome::PassedToPeer {
                    peer: "trunk2".into(),
                    status: 480
                })
            ]
        );
    }

    #[test]
    fn a_dead_peer_is_skipped_for_the_next_one() {
        let t0 = Instant::now();
        let mut call = facts(&[]);
        call.peers = vec!["trunk1".into(), "trunk2".into(), "trunk3".into()];
        let mut d = D::new(t0, call, DeliveryConfig::default());
        assert_eq!(
            drain(&mut d),
            [start(0, Target::NextServer("trunk2".into()))]
        );
        d.handle_timeout(t0 + ms(2000));
        assert_eq!(
            drain(&mut d),
            [
                Action::CancelBranch { branch: b(0) },
                start(1, Target::NextServer("trunk3".into()))
            ]
        );
        d.handle_response(t0 + ms(2010), b(1), 200);
        assert_eq!(
            drain(&mut d)[1],
            Action::Done(DeliveryOutcome::PassedToPeer {
                peer: "trunk3".into(),
                status: 200
            })
        );
    }

    #[test]
    fn last_server_with_nothing_left_rejects_480() {
        let t0 = Instant::now();
        let mut call = facts(&[]);
        call.server = "trunk2".into();
        call.tried_by = vec!["trunk1".into()];
        let mut d = D::new(t0, call, DeliveryConfig::default());
        assert_eq!(
            drain(&mut d),
            [
                respond(480, None),
                Action::Done(DeliveryOutcome::Failed { status: 480 })
            ]
        );
        assert_eq!(d.poll_timeout(), None);
        assert!(d.attempts().is_empty());
        // Same at trunk2 with a PBX that fails: its best answer, not a pass back to trunk1.
        let mut call = facts(&["pbx-a"]);
        call.server = "trunk2".into();
        call.tried_by = vec!["trunk1".into()];
        let mut d = D::new(t0, call, DeliveryConfig::default());
        drain(&mut d);
        d.handle_transport_error(t0, b(0));
        assert_eq!(drain(&mut d)[0], respond(480, None));
    }

    // === best response ===

    #[test]
    fn a_503_after_ringing_is_passed_on_as_500() {
        let t0 = Instant::now();
        let mut d = D::new(t0, facts(&["pbx"]), DeliveryConfig::default());
        drain(&mut d);
        d.handle_response(t0, b(0), 180);
        d.handle_response(t0, b(0), 503);
        let actions = drain(&mut d);
        assert!(actions.contains(&respond(500, Some(0))), "{actions:?}");
    }

    #[test]
    fn best_response_prefers_6xx_then_the_lowest_class() {
        assert_eq!(better_response(503, 480), 480);
        assert_eq!(better_response(480, 503), 480);
        assert_eq!(better_response(480, 408), 480);
        assert_eq!(better_response(408, 600), 600);
        assert_eq!(better_response(603, 408), 603);
        assert_eq!(better_response(500, 504), 500);
    }

    #[test]
    fn caller_gets_the_best_failure_received() {
        let t0 = Instant::now();
        let config = DeliveryConfig {
            failover_set: FailoverSet::new(&[480, 503, 504, 600]).unwrap(),
            ..DeliveryConfig::default()
        };
        let mut d = D::new(t0, facts(&["a", "b", "c", "d"]), config);
        d.plan.stages[3].targets.clear(); // no peer, to see the answer
        drain(&mut d);
        d.handle_response(t0, b(0), 503);
        d.handle_response(t0, b(1), 480);
        d.handle_response(t0, b(2), 504);
        d.handle_timeout(t0 + ms(2000));
        assert_eq!(
            drain(&mut d).iter().rev().nth(1),
            Some(&respond(480, Some(1)))
        );

        let mut d = D::new(t0, facts(&["a", "b"]), config);
        d.plan.stages[3].targets.clear();
        drain(&mut d);
        d.handle_response(t0, b(0), 480);
        d.handle_response(t0, b(1), 600);
        assert_eq!(
            drain(&mut d).iter().rev().nth(1),
            Some(&respond(600, Some(1)))
        );
    }

    #[test]
    fn failover_set() {
        let set = FailoverSet::default();
        for s in [408, 480, 500, 502, 503, 504] {
            assert!(set.contains(s), "{s}");
        }
        for s in [100, 180, 200, 404, 486, 487, 501, 600, 603, 699, 700] {
            assert!(!set.contains(s), "{s}");
        }
        assert_eq!(
            FailoverSet::new(&[200]),
            Err(DeliveryRuleError::NotAFailureStatus(200))
        );
        assert!(FailoverSet::new(&[699, 300]).unwrap().contains(699));
        assert_eq!(format!("{set:?}"), "{408, 480, 500, 502, 503, 504}");
    }

    // === the plan, as `explain` prints it ===

    #[test]
    fn explain_registered_without_failover() {
        let plan = Plan::new(facts(&["sip:pbx@192.0.2.1:5060"]));
        assert_eq!(
            plan.to_string(),
            "1. primary: sip:pbx@192.0.2.1:5060 — trunk group 5's bindings on trunk1 \
             (registered, not failing their probes), highest q first\n\
             2. failover PBX: none — no failover PBX set\n\
             3. failover number: none — no failover number set (neither the DID's own nor a \
             global one)\n\
             4. next trunk server: trunk2 — the DID has no failover: the other trunk servers \
             in order\n\
             if every target fails: the caller gets the best final response received, else 480"
        );
    }

    #[test]
    fn explain_failover_keeps_the_call_here() {
        // The seed's important detail: registered only on trunk2, the call arrives at trunk1.
        let mut call = facts(&[]);
        call.failover.did_number = Some("+15550001111".into());
        call.failover.global_number = Some("+15550002222".into());
        call.failover.pbx = Some(FailoverPbx::Uri("sip:backup.example.com".into()));
        let text = Plan::new(call).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "1. primary: none — trunk group 5 is not registered on trunk1 (or every binding is \
             failing its probes)"
        );
        assert_eq!(
            lines[1],
            "2. failover PBX: sip:backup.example.com, resolved when the call gets here — the \
             failover PBX sip:backup.example.com: every resolved target in order"
        );
        assert_eq!(
            lines[2],
            "3. failover number: +15550001111 via the PSTN gateway — the DID's own failover \
             number (the trunk group's global number +15550002222 is not used)"
        );
        assert_eq!(
            lines[3],
            "4. next trunk server: none — the DID has failover, so trunk1 does not pass the \
             call to trunk2 (the seed's important detail: a PBX registered on only one trunk \
             server gets its calls failed over while it is up)"
        );
    }

    #[test]
    fn explain_other_set_ups() {
        let mut call = facts(&[]);
        call.failover.global_number = Some("+15550002222".into());
        call.failover.pbx = Some(FailoverPbx::TrunkGroup(7));
        call.failover_pbx_targets = Some(vec!["sip:group7@192.0.2.7"]);
        let text = Plan::new(call).to_string();
        assert!(text.contains(
            "2. failover PBX: sip:group7@192.0.2.7 — the failover PBX is trunk group 7: its \
             bindings on trunk1; its own failover is not applied"
        ));
        assert!(text.contains(
            "3. failover number: +15550002222 via the PSTN gateway — the trunk group's global \
             failover number (the DID has none of its own)"
        ));

        let mut call = facts(&[]);
        call.server = "trunk2".into();
        call.tried_by = vec!["trunk1".into()];
        let text = Plan::new(call).to_string();
        assert!(text.contains(
            "4. next trunk server: none — the DID has no failover: the trunk servers that have \
             not tried the call (tried already: trunk1)"
        ));

        let mut call = with_number(facts(&[]), "+15550001111");
        call.peers = vec!["trunk1".into()];
        let text = Plan::new(call).to_string();
        assert!(text.contains(
            "4. next trunk server: none — the DID has failover: the call stays on trunk1"
        ));
    }

    #[test]
    fn plan_orders_stages_and_targets() {
        let mut call = facts(&["a", "b"]);
        call.failover.pbx = Some(FailoverPbx::TrunkGroup(7));
        call.failover_pbx_targets = Some(vec!["g7"]);
        call.failover.global_number = Some("+15550002222".into());
        let plan = Plan::new(call);
        let stages: Vec<(Stage, usize)> = plan
            .stages
            .iter()
            .map(|s| (s.stage, s.targets.len()))
            .collect();
        assert_eq!(
            stages,
            [
                (Stage::Primary, 2),
                (Stage::FailoverPbx, 1),
                (Stage::FailoverNumber, 1),
                (Stage::NextServer, 0)
            ]
        );
        assert_eq!(
            plan.stages[0].targets,
            [Target::Binding("a"), Target::Binding("b")]
        );
    }
}
