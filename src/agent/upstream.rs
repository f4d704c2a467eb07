//! The agent's side of the carrier's provisioning API: health reports and the failover
//! settings sync.
//!
//! - [`ApiClient`]: HTTPS (rustls) JSON requests with the trunk group's token, each bounded by
//!   [`REQUEST_TIMEOUT`]; the trunk group is found once with `GET /v1/trunk-groups` (an agent's
//!   token sees exactly its own group).
//! - [`spawn_reporter`]: posts the agent's [`HealthReport`] at start, at every change and every
//!   `report_interval_ms`.
//! - [`spawn_sync`]: pushes `[agent.failover]` as the trunk group's whole failover plan
//!   (`PUT /v1/trunk-groups/{id}/failover`) and keeps the carrier's copy equal to the file's,
//!   retrying with backoff while the API is unreachable; the outcome is a [`SyncState`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::config::{ApiConfig, FailoverPlan};
use crate::carrier::store::TrunkGroupId;

/// How long one request may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest error body read for a message.
const ERROR_BODY_LIMIT: usize = 4096;

/// Why a request to the API did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The client could not be set up (`api.url`, `api.ca_file`).
    #[error("{0}")]
    Setup(String),
    /// No answer: connection refused, TLS failure, timeout.
    #[error("API unreachable: {0}")]
    Unreachable(String),
    /// The API answered with a server error (5xx), or asked to be asked later (408, 429).
    #[error("API answered {status}: {message}")]
    Unavailable { status: u16, message: String },
    /// The API refused the request (4xx): retrying the same request soon cannot help.
    #[error("{}", refusal_text(*.status, .code, .message, .field))]
    Refused {
        status: u16,
        /// The API's error code (`number_not_allowed`, `unauthorized`, …).
        code: String,
        message: String,
        /// The offending field of the request body, when the API names one.
        field: Option<String>,
    },
    /// The token does not see exactly one trunk group.
    #[error(
        "the API token sees {groups} trunk groups: api.token must be a token scoped to this \
         agent's one trunk group (scope {{\"trunk_group\": ID}})"
    )]
    NotScoped { groups: usize },
    /// A success whose body could not be read.
    #[error("unexpected answer from the API: {0}")]
    BadAnswer(String),
}

fn refusal_text(status: u16, code: &str, message: &str, field: &Option<String>) -> String {
    match field {
        Some(f) => format!("API refused ({status} {code}) field `{f}`: {message}"),
        None => format!("API refused ({status} {code}): {message}"),
    }
}

impl UpstreamError {
    /// Whether trying again soon may succeed (unreachable, 5xx, timeout), as opposed to a
    /// refusal that only a change of the request or of the carrier's settings can fix.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unreachable(_)
                | UpstreamError::Unavailable { .. }
                | UpstreamError::BadAnswer(_)
        )
    }
}

/// A client of the carrier API for one trunk group. Cloning is cheap: clones share the
/// connection pool and the trunk group id once found.
#[derive(Clone)]
pub struct ApiClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `api.url` without a trailing `/`.
    base: String,
    token: String,
    group: OnceCell<TrunkGroupId>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.inner.base)
            .field("trunk_group", &self.inner.group.get())
            .finish_non_exhaustive()
    }
}

/// One trunk group as `GET /v1/trunk-groups` lists it (only the id is read).
#[derive(Deserialize)]
struct GroupId {
    id: TrunkGroupId,
}

/// The API's error body: `{"error": {"code", "message", "field"}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(Deserialize)]
struct ErrorInner {
    code: String,
    message: String,
    #[serde(default)]
    field: Option<String>,
}

impl ApiClient {
    /// A client for `api.url` with `api.token`, trusting the built-in web roots and the
    /// certificates of `api.ca_file`; every request is bounded by [`REQUEST_TIMEOUT`].
    pub fn new(config: &ApiConfig) -> Result<ApiClient, UpstreamError> {
        ApiClient::with_timeout(config, REQUEST_TIMEOUT)
    }

    /// As [`ApiClient::new`], with another bound per request.
    pub fn with_timeout(config: &ApiConfig, timeout: Duration) -> Result<ApiClient, UpstreamError> {
        let base = config.url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base)
            .map_err(|e| UpstreamError::Setup(format!("api.url `{}`: {e}", config.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(UpstreamError::Setup(format!(
                "api.url `{}` is not an http(s) URL",
                config.url
            )));
        }
        if config.token.is_empty() {
            return Err(UpstreamError::Setup("api.token is empty".into()));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            // The token goes with every request: never follow a redirect elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("lifeline-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                UpstreamError::Setup(format!("api.ca_file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                UpstreamError::Setup(format!("api.ca_file {}: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(UpstreamError::Setup(format!(
                    "api.ca_file {}: no PEM certificate",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| UpstreamError::Setup(format!("HTTP client: {e}")))?;
        Ok(ApiClient {
            inner: Arc::new(Inner {
                http,
                base,
                token: config.token.clone(),
                group: OnceCell::new(),
            }),
        })
    }

    /// The API's base URL (`api.url` without a trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// The trunk group the token is scoped to, asked once (`GET /v1/trunk-groups`, which
    /// must list exactly one group) and remembered after the first success.
    pub async fn trunk_group_id(&self) -> Result<TrunkGroupId, UpstreamError> {
        self.inner
            .group
            .get_or_try_init(|| async {
                let groups: Vec<GroupId> = self
                    .send(self.inner.http.get(self.url("/v1/trunk-groups")))
                    .await?
                    .json()
                    .await
                    .map_err(|e| UpstreamError::BadAnswer(format!("GET /v1/trunk-groups: {e}")))?;
                match groups.as_slice() {
                    [one] => {
                        info!(trunk_group = one.id, "API token scoped to trunk group");
                        Ok(one.id)
                    }
                    _ => Err(UpstreamError::NotScoped {
                        groups: groups.len(),
                    }),
                }
            })
            .await
            .copied()
    }

    /// Replaces the trunk group's whole failover plan (`PUT /v1/trunk-groups/{id}/failover`).
    pub async fn put_failover(&self, plan: &FailoverPlan) -> Result<(), UpstreamError> {
        let id = self.trunk_group_id().await?;
        let request = self
            .inner
            .http
            .put(self.url(&format!("/v1/trunk-groups/{id}/failover")))
            .json(&PlanBody::from(plan));
        self.send(request).await?;
        Ok(())
    }

    /// Posts a health report (`POST /v1/trunk-groups/{id}/health`).
    pub async fn post_health(&self, report: &HealthReport) -> Result<(), UpstreamError> {
        let id = self.trunk_group_id().await?;
        let request = self
            .inner
            .http
            .post(self.url(&format!("/v1/trunk-groups/{id}/health")))
            .json(report);
        self.send(request).await?;
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.base)
    }

    /// Sends with the token; a non-2xx answer becomes the matching error.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        let response = request
            .bearer_auth(&self.inner.token)
            .send()
            .await
            .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = read_limited(response).await;
        let parsed = serde_json::from_str::<ErrorBody>(&text)
            .ok()
            .map(|b| b.error);
        let code = status.as_u16();
        if status.is_server_error() || code == 408 || code == 429 {
            let message = match parsed {
                Some(e) => format!("{}: {}", e.code, e.message),
                None => short(&text, status),
            };
            return Err(UpstreamError::Unavailable {
                status: code,
                message,
            });
        }
        Err(match parsed {
            Some(e) => UpstreamError::Refused {
                status: code,
                code: e.code,
                message: e.message,
                field: e.field,
            },
            None => UpstreamError::Refused {
                status: code,
                code: status
                    .canonical_reason()
                    .unwrap_or("error")
                    .to_ascii_lowercase()
                    .replace(' ', "_"),
                message: short(&text, status),
                field: None,
            },
        })
    }
}

/// An error with its causes: reqwest's own text hides the interesting part ("connection
/// refused", "invalid peer certificate: UnknownIssuer").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// At most [`ERROR_BODY_LIMIT`] bytes of an answer's body, as text.
async fn read_limited(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_LIMIT);
    String::from_utf8_lossy(&body).into_owned()
}

/// A body that is not the API's JSON error, for a log line.
fn short(text: &str, status: reqwest::StatusCode) -> String {
    let text = text.trim();
    if text.is_empty() {
        return status.canonical_reason().unwrap_or("no reason").to_owned();
    }
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The failover plan as `PUT /v1/trunk-groups/{id}/failover` takes it (and as
/// [`SyncState`] shows it).
#[derive(Serialize)]
struct PlanBody<'a> {
    global_number: Option<&'a str>,
    pbx: Option<PbxBody<'a>>,
    dids: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum PbxBody<'a> {
    Uri(&'a str),
    TrunkGroup(i64),
}

impl<'a> From<&'a FailoverPlan> for PlanBody<'a> {
    fn from(p: &'a FailoverPlan) -> Self {
        let pbx = match (&p.pbx_uri, p.pbx_trunk_group) {
            (Some(uri), _) => Some(PbxBody::Uri(uri)),
            (None, Some(id)) => Some(PbxBody::TrunkGroup(id)),
            (None, None) => None,
        };
        PlanBody {
            global_number: p.global_number.as_deref(),
            pbx,
            dids: &p.dids,
        }
    }
}

// === Health reports ===

pub use super::health::PbxState;

/// The agent's registration on one trunk server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ServerReport {
    pub registered: bool,
    /// The expiry granted, in seconds.
    pub expires_in: Option<u32>,
    pub last_error: Option<String>,
}

/// What the agent reports upstream (`POST /v1/trunk-groups/{id}/health`). The carrier takes
/// at most 32 servers and a version of at most 100 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub pbx: PbxState,
    /// Per trunk server, by name.
    pub servers: BTreeMap<String, ServerReport>,
    pub version: String,
}

impl Default for HealthReport {
    /// PBX unknown, no servers, this build's version.
    fn default() -> Self {
        HealthReport {
            pbx: PbxState::Unknown,
            servers: BTreeMap::new(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// The shortest time between two reports caused by changes: a burst of changes (every
/// server registering at start) is one report.
const REPORT_MIN_GAP: Duration = Duration::from_secs(1);

/// Posts the current report at start, after every change of `reports` (at most one post per
/// second: a burst of changes is one post, of the latest value) and every `interval`. A
/// failed post is logged once per run of failures and tried again at the next change or
/// interval. Ends when the sender of `reports` is dropped (after posting a change not yet
/// posted).
pub fn spawn_reporter(
    client: ApiClient,
    reports: watch::Receiver<HealthReport>,
    interval: Duration,
) -> JoinHandle<()> {
    tokio::spawn(run_reporter(client, reports, interval, REPORT_MIN_GAP))
}

async fn run_reporter(
    client: ApiClient,
    mut reports: watch::Receiver<HealthReport>,
    interval: Duration,
    min_gap: Duration,
) {
    let mut last_post: Option<Instant> = None;
    // Whether the value changed since the last post (the first value counts as a change).
    let mut changed = true;
    let mut failing = false;
    loop {
        let due = match last_post {
            None => Instant::now(),
            Some(at) if changed => at + min_gap,
            Some(at) => at + interval,
        };
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            r = reports.changed(), if !changed => {
                if r.is_err() {
                    debug!("health reporter stopped");
                    return;
                }
                changed = true;
                continue;
            }
        }
        let report = reports.borrow_and_update().clone();
        changed = false;
        last_post = Some(Instant::now());
        match client.post_health(&report).await {
            Ok(()) => {
                if failing {
                    info!("health reports delivered again");
                    failing = false;
                } else {
                    debug!(pbx = ?report.pbx, "health report delivered");
                }
            }
            Err(e) => {
                if !failing {
                    warn!(
                        error = %e,
                        retry_in = ?interval,
                        "health report not delivered; retrying at the next change or interval"
                    );
                    failing = true;
                } else {
                    debug!(error = %e, "health report not delivered");
                }
            }
        }
    }
}

// === Failover settings sync ===

/// Where the failover settings sync stands, for `lifeline-agent status`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct SyncState {
    /// Whether `[agent.failover] sync` is on.
    pub enabled: bool,
    /// A plan is wanted that the carrier does not hold yet (being sent, retried, or
    /// refused).
    pub pending: bool,
    /// When the carrier last accepted a plan: Unix milliseconds.
    pub last_success_ms: Option<i64>,
    /// When a plan was last sent: Unix milliseconds.
    pub last_attempt_ms: Option<i64>,
    /// Why the last attempt failed; cleared by a success.
    pub last_error: Option<String>,
    /// Whether the last attempt was refused by the API (not retried until the plan changes,
    /// or after a slow retry).
    pub refused: bool,
    /// When the next attempt is planned (a retry): Unix milliseconds.
    pub next_attempt_ms: Option<i64>,
    /// The plan in force upstream as this agent last pushed it (`None` until a push
    /// succeeds, and while the sync is off), in the API's form.
    #[serde(serialize_with = "serialize_plan")]
    pub in_force: Option<FailoverPlan>,
}

fn serialize_plan<S: Serializer>(plan: &Option<FailoverPlan>, s: S) -> Result<S::Ok, S::Error> {
    plan.as_ref().map(PlanBody::from).serialize(s)
}

/// The sync's timing: backoff while the API is unreachable, and the slow retry of a refused
/// plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTiming {
    /// The first retry after a failure; doubles (with ±20 % jitter) up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// A refused plan is sent again after this, if no other plan came meanwhile.
    pub refused_retry: Duration,
}

impl Default for SyncTiming {
    fn default() -> Self {
        SyncTiming {
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            refused_retry: Duration::from_secs(300),
        }
    }
}

/// Keeps the carrier's failover plan equal to the latest value of `plans` ([`SyncTiming`]'s
/// defaults: retries from 1 s doubling to 60 s, a refused plan again after 5 minutes).
///
/// `None` is sync off: nothing is sent. Each `Some(plan)` different from the plan in force
/// upstream is pushed as the whole plan; while it is in flight a newer one waits (a request
/// is never abandoned half-way, so an older plan can never land after a newer one), then the
/// newest is sent. Unreachable, 5xx, timeouts: retried with backoff until it lands or a newer
/// plan replaces it. A refusal (4xx): logged with the API's code, message and field, and not
/// retried until another plan comes or `refused_retry` has passed. The outcome is published
/// in `state`. Ends when the sender of `plans` is dropped.
pub fn spawn_sync(
    client: ApiClient,
    plans: watch::Receiver<Option<FailoverPlan>>,
    state: watch::Sender<SyncState>,
) -> JoinHandle<()> {
    spawn_sync_with(client, plans, state, SyncTiming::default())
}

/// [`spawn_sync`] with other timing.
pub fn spawn_sync_with(
    client: ApiClient,
    plans: watch::Receiver<Option<FailoverPlan>>,
    state: watch::Sender<SyncState>,
    timing: SyncTiming,
) -> JoinHandle<()> {
    tokio::spawn(run_sync(client, plans, state, timing))
}

fn now_ms() -> i64 {
    crate::carrier::registrar::unix_ms(SystemTime::now())
}

/// `delay` with ±20 % jitter, at most `max`.
fn jittered(delay: Duration, max: Duration) -> Duration {
    let factor = rand::rng().random_range(0.8..=1.2);
    delay.mul_f64(factor).min(max)
}

/// What to do after a push.
enum Next {
    /// Look at the latest plan again.
    Reread,
    /// The sender is gone.
    Stop,
}

async fn run_sync(
    client: ApiClient,
    mut plans: watch::Receiver<Option<FailoverPlan>>,
    state: watch::Sender<SyncState>,
    timing: SyncTiming,
) {
    // The plan the carrier refused, and when.
    let mut refused: Option<(FailoverPlan, Instant)> = None;
    loop {
        let wanted = plans.borrow_and_update().clone();
        let in_force = state.borrow().in_force.clone();
        let plan = match wanted {
            None => {
                // Off: the portal may change the plan; nothing is known to be in force, and
                // turning the sync on again pushes.
                state.send_modify(|s| {
                    s.enabled = false;
                    s.pending = false;
                    s.refused = false;
                    s.next_attempt_ms = None;
                    s.in_force = None;
                });
                refused = None;
                if plans.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Some(plan) if in_force.as_ref() == Some(&plan) => {
                state.send_modify(|s| {
                    s.enabled = true;
                    s.pending = false;
                    s.refused = false;
                    s.next_attempt_ms = None;
                });
                refused = None;
                if plans.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Some(plan) => plan,
        };
        state.send_modify(|s| {
            s.enabled = true;
            s.pending = true;
        });
        if let Some((refused_plan, at)) = &refused
            && *refused_plan == plan
        {
            // Refused before: only a slow retry, unless another plan comes first.
            let retry_at = *at + timing.refused_retry;
            let wait = retry_at.saturating_duration_since(Instant::now());
            state.send_modify(|s| s.next_attempt_ms = Some(now_ms() + millis(wait)));
            match wait_for_other(&mut plans, &plan, retry_at).await {
                Wait::Deadline => {}
                Wait::OtherPlan => continue,
                Wait::Closed => return,
            }
        }
        match push(&client, &plan, &mut plans, &state, timing, &mut refused).await {
            Next::Reread => continue,
            Next::Stop => return,
        }
    }
}

/// How a wait ended.
enum Wait {
    Deadline,
    /// `plans` holds another value than the plan waited with.
    OtherPlan,
    /// The sender of `plans` is gone.
    Closed,
}

/// Waits until `deadline`, or until `plans` holds something else than `current` (the same
/// plan sent again does not end the wait).
async fn wait_for_other(
    plans: &mut watch::Receiver<Option<FailoverPlan>>,
    current: &FailoverPlan,
    deadline: Instant,
) -> Wait {
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return Wait::Deadline,
            r = plans.changed() => {
                if r.is_err() {
                    return Wait::Closed;
                }
                if plans.borrow().as_ref() != Some(current) {
                    return Wait::OtherPlan;
                }
            }
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Sends `plan` until it lands, is refused, or a newer plan comes (during a backoff wait).
async fn push(
    client: &ApiClient,
    plan: &FailoverPlan,
    plans: &mut watch::Receiver<Option<FailoverPlan>>,
    state: &watch::Sender<SyncState>,
    timing: SyncTiming,
    refused: &mut Option<(FailoverPlan, Instant)>,
) -> Next {
    let mut delay = timing.retry_min;
    let mut failures = 0u32;
    loop {
        state.send_modify(|s| {
            s.last_attempt_ms = Some(now_ms());
            s.next_attempt_ms = None;
        });
        let result = client.put_failover(plan).await;
        match result {
            Ok(()) => {
                *refused = None;
                info!(
                    global_number = plan.global_number.as_deref().unwrap_or("none"),
                    pbx = %pbx_text(plan),
                    dids = plan.dids.len(),
                    attempts = failures + 1,
                    "failover settings pushed"
                );
                state.send_modify(|s| {
                    s.pending = false;
                    s.refused = false;
                    s.last_success_ms = Some(now_ms());
                    s.last_error = None;
                    s.in_force = Some(plan.clone());
                });
                return Next::Reread;
            }
            Err(e) if e.is_transient() => {
                failures += 1;
                let wait = jittered(delay, timing.retry_max);
                warn!(
                    error = %e,
                    attempt = failures,
                    "API unreachable; retrying in {:.1?}",
                    wait
                );
                state.send_modify(|s| {
                    s.refused = false;
                    s.last_error = Some(e.to_string());
                    s.next_attempt_ms = Some(now_ms() + millis(wait));
                });
                match wait_for_other(plans, plan, Instant::now() + wait).await {
                    Wait::Deadline => {}
                    // A newer plan: send it instead, at once.
                    Wait::OtherPlan => return Next::Reread,
                    Wait::Closed => return Next::Stop,
                }
                delay = delay.saturating_mul(2).min(timing.retry_max);
            }
            Err(e) => {
                match &e {
                    UpstreamError::Refused {
                        status,
                        code,
                        message,
                        field,
                    } => error!(
                        status,
                        code = %code,
                        field = field.as_deref().unwrap_or("-"),
                        reason = %message,
                        "failover settings refused; fix [agent.failover] or the carrier's \
                         settings (sent again when the plan changes, or in {:?})",
                        timing.refused_retry
                    ),
                    other => error!(
                        error = %other,
                        retry_in = ?timing.refused_retry,
                        "failover settings refused"
                    ),
                }
                *refused = Some((plan.clone(), Instant::now()));
                state.send_modify(|s| {
                    s.refused = true;
                    s.last_error = Some(e.to_string());
                    s.next_attempt_ms = Some(now_ms() + millis(timing.refused_retry));
                });
                return Next::Reread;
            }
        }
    }
}

fn pbx_text(plan: &FailoverPlan) -> String {
    match (&plan.pbx_uri, plan.pbx_trunk_group) {
        (Some(uri), _) => uri.clone(),
        (None, Some(id)) => format!("trunk group {id}"),
        (None, None) => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use axum::extract::{Request, State};
    use axum::middleware::Next;
    use axum::response::{IntoResponse, Response};
    use tempfile::TempDir;

    use super::*;
    use crate::carrier::api::{ApiState, Reloadable, ServerView};
    use crate::carrier::call_log::CallLog;
    use crate::carrier::delivery_rule::FailoverPbx;
    use crate::carrier::store::{AccountId, FailoverSettings, Store, TokenScope};

    /// Long enough for a loaded machine; waits end as soon as their condition holds.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// Backoff in milliseconds, and a refused plan never again within a test.
    const FAST: SyncTiming = SyncTiming {
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        refused_retry: Duration::from_secs(3600),
    };

    /// What reached the API, and what it is told to do to it.
    #[derive(Default)]
    struct Traffic {
        /// `GET /v1/trunk-groups`.
        lists: AtomicUsize,
        /// `PUT …/failover`.
        puts: AtomicUsize,
        /// `POST …/health`.
        posts: AtomicUsize,
        /// Answer this many of the next PUTs with 503.
        fail_puts: AtomicUsize,
        /// Hold each PUT this long (ms) before handling it.
        put_delay_ms: AtomicU64,
    }

    async fn count(State(t): State<Arc<Traffic>>, req: Request, next: Next) -> Response {
        let path = req.uri().path().to_owned();
        match req.method().as_str() {
            "GET" if path == "/v1/trunk-groups" => {
                t.lists.fetch_add(1, Ordering::SeqCst);
            }
            "POST" if path.ends_with("/health") => {
                t.posts.fetch_add(1, Ordering::SeqCst);
            }
            "PUT" if path.ends_with("/failover") => {
                t.puts.fetch_add(1, Ordering::SeqCst);
                let delay = t.put_delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if t.fail_puts
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let body = serde_json::json!({"error": {
                        "code": "store_unavailable", "message": "test outage"}});
                    return (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(body),
                    )
                        .into_response();
                }
            }
            _ => {}
        }
        next.run(req).await
    }

    /// A carrier API on a real store: one account, one trunk group with two DIDs, and a
    /// token scoped to the group.
    struct Carrier {
        _dir: TempDir,
        store: Store,
        state: ApiState,
        account: AccountId,
        group: TrunkGroupId,
        token: String,
        traffic: Arc<Traffic>,
    }

    impl Carrier {
        async fn new() -> Carrier {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).await.unwrap();
            let account = store.create_account("acme").await.unwrap().id;
            let group = store
                .create_trunk_group(account, "main", "acme-main", "secret", "lifeline")
                .await
                .unwrap()
                .id;
            store.create_did("+15551230001", group).await.unwrap();
            store.create_did("+15551230002", group).await.unwrap();
            let (_, token) = store
                .create_token(
                    TokenScope::TrunkGroup {
                        account,
                        trunk_group: group,
                    },
                    "agent",
                )
                .await
                .unwrap();
            let (customers, store_health) =
                crate::carrier::customers::watch_customers(store.clone(), Duration::from_secs(1))
                    .await
                    .unwrap();
            let call_log = CallLog::open(dir.path(), Duration::from_secs(86_400))
                .await
                .unwrap();
            let state = ApiState {
                store: store.clone(),
                server_name: "trunk1".into(),
                server: ServerView {
                    customers,
                    store_health,
                },
                call_log,
                realm: "lifeline".into(),
                failover_prefixes: Reloadable::new(vec!["+1555".into()]),
                trunk_servers: Reloadable::new(vec!["trunk1".into()]),
            };
            Carrier {
                _dir: dir,
                store,
                state,
                account,
                group,
                token,
                traffic: Arc::default(),
            }
        }

        /// Serves the API (counted) on `addr`; port 0 picks one.
        async fn serve_on(&self, addr: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = crate::carrier::api::router(self.state.clone()).layer(
                axum::middleware::from_fn_with_state(self.traffic.clone(), count),
            );
            let task = tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            });
            (addr, task)
        }

        async fn serve(&self) -> (SocketAddr, JoinHandle<()>) {
            self.serve_on("127.0.0.1:0".parse().unwrap()).await
        }

        fn client(&self, addr: SocketAddr) -> ApiClient {
            self.client_with_token(addr, &self.token)
        }

        fn client_with_token(&self, addr: SocketAddr, token: &str) -> ApiClient {
            ApiClient::new(&ApiConfig {
                url: format!("http://{addr}/"),
                token: token.into(),
                ca_file: None,
                report_interval_ms: 60_000,
            })
            .unwrap()
        }

        async fn plan(&self) -> FailoverSettings {
            self.store.failover_plan(self.group).await.unwrap()
        }

        /// The `after` of every `failover.put` in the audit trail, oldest first.
        async fn puts_audited(&self) -> Vec<serde_json::Value> {
            let mut entries = self.store.audit(self.account, 1000).await.unwrap();
            entries.reverse();
            entries
                .into_iter()
                .filter(|e| e.action == "failover.put")
                .map(|e| serde_json::from_str(e.after.as_deref().unwrap()).unwrap())
                .collect()
        }

        fn count(&self, which: fn(&Traffic) -> &AtomicUsize) -> usize {
            which(&self.traffic).load(Ordering::SeqCst)
        }
    }

    fn plan(global: &str, did_target: Option<&str>, pbx: Option<&str>) -> FailoverPlan {
        FailoverPlan {
            global_number: Some(global.into()),
            pbx_uri: pbx.map(str::to_owned),
            pbx_trunk_group: None,
            dids: did_target
                .map(|t| BTreeMap::from([("+15551230001".to_owned(), t.to_owned())]))
                .unwrap_or_default(),
        }
    }

    /// The plan as the store holds it once accepted.
    fn stored(p: &FailoverPlan) -> FailoverSettings {
        FailoverSettings {
            global_number: p.global_number.clone(),
            pbx: p.pbx_uri.clone().map(FailoverPbx::Uri),
            dids: p.dids.clone(),
        }
    }

    fn json_of(p: &FailoverPlan) -> serde_json::Value {
        serde_json::to_value(PlanBody::from(p)).unwrap()
    }

    async fn wait_state(
        rx: &mut watch::Receiver<SyncState>,
        what: &str,
        f: impl FnMut(&SyncState) -> bool,
    ) -> SyncState {
        let result = tokio::time::timeout(DEADLINE, rx.wait_for(f))
            .await
            .map(|r| r.map(|s| s.clone()));
        match result {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => panic!("sync stopped while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}: {:?}", *rx.borrow()),
        }
    }

    /// Polls `f` until it holds.
    async fn eventually<F, Fut>(what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let end = Instant::now() + DEADLINE;
        while !f().await {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ends(handle: JoinHandle<()>, what: &str) {
        tokio::time::timeout(DEADLINE, handle)
            .await
            .unwrap_or_else(|_| panic!("{what} did not stop"))
            .unwrap();
    }

    fn start_sync(
        client: ApiClient,
        first: Option<FailoverPlan>,
        timing: SyncTiming,
    ) -> (
        watch::Sender<Option<FailoverPlan>>,
        watch::Receiver<SyncState>,
        JoinHandle<()>,
    ) {
        let (plans_tx, plans_rx) = watch::channel(first);
        let (state_tx, state_rx) = watch::channel(SyncState::default());
        let task = spawn_sync_with(client, plans_rx, state_tx, timing);
        (plans_tx, state_rx, task)
    }

    #[tokio::test]
    async fn finds_its_trunk_group_once() {
        let carrier = Carrier::new().await;
        let (addr, _server) = carrier.serve().await;
        let client = carrier.client(addr);
        assert_eq!(client.trunk_group_id().await.unwrap(), carrier.group);
        assert_eq!(
            client.clone().trunk_group_id().await.unwrap(),
            carrier.group
        );
        assert_eq!(carrier.count(|t| &t.lists), 1, "the id is asked once");
    }

    #[tokio::test]
    async fn a_token_seeing_several_trunk_groups_is_refused_by_name() {
        let carrier = Carrier::new().await;
        carrier
            .store
            .create_trunk_group(carrier.account, "second", "acme-second", "pw", "lifeline")
            .await
            .unwrap();
        let (_, account_token) = carrier
            .store
            .create_token(TokenScope::Account(carrier.account), "portal")
            .await
            .unwrap();
        let (addr, _server) = carrier.serve().await;
        let err = carrier
            .client_with_token(addr, &account_token)
            .trunk_group_id()
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::NotScoped { groups: 2 }),
            "{err:?}"
        );
        assert!(!err.is_transient());
        assert!(err.to_string().contains("scoped to"), "{err}");
    }

    #[tokio::test]
    async fn pushes_the_plan_and_a_newer_one_replaces_it() {
        let carrier = Carrier::new().await;
        let (addr, _server) = carrier.serve().await;
        let first = plan("+15559990001", Some("+15559990002"), None);
        let (plans, mut state, task) = start_sync(carrier.client(addr), Some(first.clone()), FAST);

        let s = wait_state(&mut state, "the first plan in force", |s| {
            s.in_force.as_ref() == Some(&first) && !s.pending
        })
        .await;
        assert!(s.enabled && s.last_success_ms.is_some() && s.last_error.is_none());
        assert_eq!(carrier.plan().await, stored(&first));

        let second = plan(
            "+15559990003",
            None,
            Some("sip:backup.example.net:5070;transport=tcp"),
        );
        plans.send(Some(second.clone())).unwrap();
        wait_state(&mut state, "the second plan in force", |s| {
            s.in_force.as_ref() == Some(&second) && !s.pending
        })
        .await;
        assert_eq!(carrier.plan().await, stored(&second));
        assert_eq!(
            carrier.puts_audited().await,
            vec![json_of(&first), json_of(&second)]
        );
        assert_eq!(carrier.count(|t| &t.puts), 2);
        assert_eq!(carrier.count(|t| &t.lists), 1, "the trunk group id is kept");

        // The state shows the plan in the API's form.
        let shown = serde_json::to_value(&*state.borrow()).unwrap();
        assert_eq!(shown["in_force"], json_of(&second));
        assert_eq!(shown["pending"], false);

        drop(plans);
        ends(task, "the sync").await;
    }

    #[tokio::test]
    async fn sync_off_sends_nothing() {
        let carrier = Carrier::new().await;
        let (addr, _server) = carrier.serve().await;
        let (plans, mut state, task) = start_sync(carrier.client(addr), None, FAST);
        // Turning it on afterwards pushes: the first request the API sees is this one.
        let p = plan("+15559990001", None, None);
        plans.send(Some(p.clone())).unwrap();
        wait_state(&mut state, "the plan in force", |s| {
            s.in_force.as_ref() == Some(&p)
        })
        .await;
        assert_eq!(carrier.count(|t| &t.puts), 1);
        plans.send(None).unwrap();
        wait_state(&mut state, "sync off", |s| {
            !s.enabled && !s.pending && s.in_force.is_none()
        })
        .await;
        assert_eq!(carrier.count(|t| &t.puts), 1);
        // On again (the portal may have changed the plan meanwhile): pushed again.
        plans.send(Some(p.clone())).unwrap();
        wait_state(&mut state, "the plan in force again", |s| {
            s.in_force.as_ref() == Some(&p)
        })
        .await;
        assert_eq!(carrier.count(|t| &t.puts), 2);
        drop(plans);
        ends(task, "the sync").await;
    }

    #[tokio::test]
    async fn the_latest_plan_wins() {
        let carrier = Carrier::new().await;
        // Each PUT takes a while, so newer plans come while one is in flight.
        carrier.traffic.put_delay_ms.store(300, Ordering::SeqCst);
        let (addr, _server) = carrier.serve().await;
        let plans_sent: Vec<FailoverPlan> = (1..=4)
            .map(|i| plan(&format!("+1555999000{i}"), None, None))
            .collect();
        let (plans, mut state, task) =
            start_sync(carrier.client(addr), Some(plans_sent[0].clone()), FAST);
        eventually("the first PUT", || async {
            carrier.count(|t| &t.puts) >= 1
        })
        .await;
        for p in &plans_sent[1..] {
            plans.send(Some(p.clone())).unwrap();
            tokio::task::yield_now().await;
        }
        let last = plans_sent.last().unwrap();
        wait_state(&mut state, "the last plan in force", |s| {
            s.in_force.as_ref() == Some(last) && !s.pending
        })
        .await;
        assert_eq!(carrier.plan().await, stored(last));
        // What the carrier received: plans in the order given, none older after a newer.
        let received = carrier.puts_audited().await;
        let order: Vec<usize> = received
            .iter()
            .map(|j| {
                plans_sent
                    .iter()
                    .position(|p| json_of(p) == *j)
                    .expect("a plan that was sent")
            })
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(order.last(), Some(&3));
        assert!(
            order.len() < plans_sent.len(),
            "plans waiting were skipped: {order:?}"
        );
        drop(plans);
        ends(task, "the sync").await;
    }

    #[tokio::test]
    async fn a_refused_plan_is_not_retried_until_another_comes() {
        let carrier = Carrier::new().await;
        let (addr, _server) = carrier.serve().await;
        // Outside the carrier's failover prefixes (+1555).
        let refused = plan("+442071234567", None, None);
        let (plans, mut state, task) =
            start_sync(carrier.client(addr), Some(refused.clone()), FAST);
        let s = wait_state(&mut state, "the refusal", |s| s.refused).await;
        let error = s.last_error.clone().unwrap();
        assert!(
            error.contains("number_not_allowed") && error.contains("global_number"),
            "{error}"
        );
        assert!(s.pending && s.in_force.is_none() && s.next_attempt_ms.is_some());

        // Sent again unchanged (a reload): still not retried. Backoff is 20 ms here, so a
        // retry loop would show dozens of requests within this window.
        plans.send(Some(refused.clone())).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            carrier.count(|t| &t.puts),
            1,
            "a refused plan is not retried"
        );

        let fixed = plan("+15559990001", None, None);
        plans.send(Some(fixed.clone())).unwrap();
        let s = wait_state(&mut state, "the fixed plan in force", |s| {
            s.in_force.as_ref() == Some(&fixed)
        })
        .await;
        assert!(!s.refused && !s.pending && s.last_error.is_none(), "{s:?}");
        assert_eq!(carrier.count(|t| &t.puts), 2);
        assert_eq!(carrier.plan().await, stored(&fixed));
        assert_eq!(carrier.puts_audited().await, vec![json_of(&fixed)]);
        drop(plans);
        ends(task, "the sync").await;
    }

    #[tokio::test]
    async fn a_refused_plan_is_retried_slowly() {
        let carrier = Carrier::new().await;
        let (addr, _server) = carrier.serve().await;
        // A DID that is not the trunk group's.
        let mut refused = plan("+15559990001", None, None);
        refused
            .dids
            .insert("+15550000000".into(), "+15559990002".into());
        let timing = SyncTiming {
            refused_retry: Duration::from_millis(300),
            ..FAST
        };
        let started = Instant::now();
        let (plans, mut state, task) = start_sync(carrier.client(addr), Some(refused), timing);
        let s = wait_state(&mut state, "the refusal", |s| s.refused).await;
        assert!(s.last_error.unwrap().contains("unknown_did"));
        eventually("a slow retry", || async { carrier.count(|t| &t.puts) >= 3 }).await;
        let puts = carrier.count(|t| &t.puts);
        let bound = started.elapsed().as_millis() / 300 + 1;
        assert!(
            puts as u128 <= bound,
            "{puts} requests in {:?}",
            started.elapsed()
        );
        drop(plans);
        ends(task, "the sync").await;
    }

    #[tokio::test]
    async fn a_wrong_token_is_a_refusal() {
        let carrier = Carrier::new().await;
        let (addr, _server) = carrier.serve().await;
        let client = carrier.client_with_token(addr, "llt_not-a-token");
        let (plans, mut state, task) =
            start_sync(client, Some(plan("+15559990001", None, None)), FAST);
        let s = wait_state(&mut state, "the refusal", |s| s.refused).await;
        assert!(s.last_error.unwrap().contains("unauthorized"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(carrier.count(|t| &t.lists), 1, "not retried");
        assert_eq!(carrier.count(|t| &t.puts), 0);
        drop(plans);
        ends(task, "the sync").await;
    }

    #[tokio::test]
    async fn server_errors_are_retried() {
        let carrier = Carrier::new().await;
        carrier.traffic.fail_puts.store(3, Ordering::SeqCst);
        let (addr, _server) = carrier.serve().await;
        let p = plan("+15559990001", None, None);
        let (plans, mut state, task) = start_sync(carrier.client(addr), Some(p.clone()), FAST);
        let s = wait_state(&mut state, "a failed attempt", |s| s.last_error.is_some()).await;
        assert!(s.last_error.unwrap().contains("503"));
        assert!(!s.refused && s.pending);
        wait_state(&mut state, "the plan in force", |s| {
            s.in_force.as_ref() == Some(&p)
        })
        .await;
        assert_eq!(carrier.count(|t| &t.puts), 4);
        assert!(state.borrow().last_error.is_none());
        drop(plans);
        ends(task, "the sync").await;
    }

    #[tokio::test]
    async fn the_plan_arrives_once_the_api_comes_up() {
        let carrier = Carrier::new().await;
        // A port with nothing listening yet.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let older = plan("+15559990001", None, None);
        let (plans, mut state, task) = start_sync(carrier.client(addr), Some(older.clone()), FAST);
        let s = wait_state(&mut state, "a failed attempt", |s| s.last_error.is_some()).await;
        assert!(s.last_error.unwrap().contains("unreachable"));
        assert!(s.pending && !s.refused && s.next_attempt_ms.is_some());

        // A newer plan while the API is down replaces the one being retried.
        let newer = plan("+15559990002", Some("+15559990003"), None);
        plans.send(Some(newer.clone())).unwrap();
        let (_, _server) = carrier.serve_on(addr).await;
        let s = wait_state(&mut state, "the newer plan in force", |s| {
            s.in_force.as_ref() == Some(&newer)
        })
        .await;
        assert!(!s.pending && s.last_error.is_none());
        assert_eq!(carrier.plan().await, stored(&newer));
        assert_eq!(carrier.puts_audited().await, vec![json_of(&newer)]);
        drop(plans);
        ends(task, "the sync").await;
    }

    fn report(pbx: PbxState, error: Option<&str>) -> HealthReport {
        HealthReport {
            pbx,
            servers: BTreeMap::from([
                (
                    "trunk1".to_owned(),
                    ServerReport {
                        registered: true,
                        expires_in: Some(290),
                        last_error: None,
                    },
                ),
                (
                    "trunk2".to_owned(),
                    ServerReport {
                        registered: false,
                        expires_in: None,
                        last_error: error.map(str::to_owned),
                    },
                ),
            ]),
            version: "0.1.0".into(),
        }
    }

    async fn last_report(carrier: &Carrier) -> Option<serde_json::Value> {
        let (_, text) = carrier
            .store
            .last_health_report(carrier.group)
            .await
            .unwrap()?;
        Some(serde_json::from_str(&text).unwrap())
    }

    #[tokio::test]
    async fn reports_reach_the_carrier_at_start_and_on_change() {
        let carrier = Carrier::new().await;
        let (addr, _server) = carrier.serve().await;
        let first = report(PbxState::Up, None);
        let (tx, rx) = watch::channel(first.clone());
        // No periodic report within the test: what arrives was caused by the start or a
        // change.
        let task = tokio::spawn(run_reporter(
            carrier.client(addr),
            rx,
            Duration::from_secs(3600),
            Duration::from_millis(10),
        ));
        let want = serde_json::to_value(&first).unwrap();
        assert_eq!(want["pbx"], "up");
        assert_eq!(want["servers"]["trunk1"]["expires_in"], 290);
        eventually("the first report", || async {
            last_report(&carrier).await.as_ref() == Some(&want)
        })
        .await;

        let second = report(PbxState::Down, Some("408 Request Timeout"));
        tx.send(second.clone()).unwrap();
        let want = serde_json::to_value(&second).unwrap();
        eventually("the changed report", || async {
            last_report(&carrier).await.as_ref() == Some(&want)
        })
        .await;
        assert_eq!(carrier.count(|t| &t.posts), 2);

        drop(tx);
        ends(task, "the reporter").await;
    }

    #[tokio::test]
    async fn reports_are_repeated_every_interval() {
        let carrier = Carrier::new().await;
        let (addr, _server) = carrier.serve().await;
        let (tx, rx) = watch::channel(report(PbxState::Up, None));
        let task = spawn_reporter(carrier.client(addr), rx, Duration::from_millis(100));
        eventually("three reports without a change", || async {
            carrier.count(|t| &t.posts) >= 3
        })
        .await;
        drop(tx);
        ends(task, "the reporter").await;
    }

    #[tokio::test]
    async fn reports_are_delivered_once_the_api_comes_up() {
        let carrier = Carrier::new().await;
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (tx, rx) = watch::channel(report(PbxState::Unknown, None));
        let task = spawn_reporter(carrier.client(addr), rx, Duration::from_millis(100));
        let (_, _server) = carrier.serve_on(addr).await;
        eventually("a report", || async {
            last_report(&carrier).await.is_some()
        })
        .await;
        assert_eq!(last_report(&carrier).await.unwrap()["pbx"], "unknown");
        drop(tx);
        ends(task, "the reporter").await;
    }

    /// The API over HTTPS with a certificate of a private CA: trusted through `ca_file`
    /// only.
    #[tokio::test]
    async fn https_with_a_private_ca() {
        let carrier = Carrier::new().await;
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = tokio::spawn(crate::carrier::api::serve_tls(
            listener,
            Arc::new(tls),
            carrier.state.clone(),
        ));
        let ca_file = carrier._dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.cert.pem()).unwrap();
        let config = |ca_file: Option<PathBuf>| ApiConfig {
            url: format!("https://{addr}"),
            token: carrier.token.clone(),
            ca_file,
            report_interval_ms: 60_000,
        };

        let untrusted = ApiClient::new(&config(None)).unwrap();
        let err = untrusted.trunk_group_id().await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("certificate"), "{err}");

        let client = ApiClient::new(&config(Some(ca_file))).unwrap();
        assert_eq!(client.trunk_group_id().await.unwrap(), carrier.group);
        let p = plan("+15559990001", None, None);
        client.put_failover(&p).await.unwrap();
        assert_eq!(carrier.plan().await, stored(&p));
        client
            .post_health(&report(PbxState::Up, None))
            .await
            .unwrap();
        assert!(last_report(&carrier).await.is_some());
    }

    #[test]
    fn a_bad_ca_file_is_refused_when_the_client_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let config = |ca_file: PathBuf| ApiConfig {
            url: "https://127.0.0.1:8443".into(),
            token: "t".into(),
            ca_file: Some(ca_file),
            report_interval_ms: 60_000,
        };
        let missing = dir.path().join("missing.pem");
        let err = ApiClient::new(&config(missing)).unwrap_err();
        assert!(err.to_string().contains("api.ca_file"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = ApiClient::new(&config(empty)).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn the_plan_is_sent_in_the_apis_form() {
        let mut p = plan("+15559990001", Some("+15559990002"), None);
        assert_eq!(
            json_of(&p),
            serde_json::json!({"global_number": "+15559990001", "pbx": null,
                "dids": {"+15551230001": "+15559990002"}})
        );
        p.pbx_trunk_group = Some(7);
        assert_eq!(json_of(&p)["pbx"], serde_json::json!({"trunk_group": 7}));
        p.pbx_uri = Some("sip:b.example.net".into());
        assert_eq!(
            json_of(&p)["pbx"],
            serde_json::json!({"uri": "sip:b.example.net"})
        );
    }
}
