//! The provisioning API: HTTPS (plain HTTP on loopback only) JSON under `/v1`, what a customer
//! portal, the operator's scripts and `lifeline-agent` use.
//!
//! Every request carries `Authorization: Bearer <token>`. A token is scoped to the operator,
//! one account, or one trunk group (an agent's); it sees only its own objects, and another
//! account's object is a 404 whatever the verb. Bodies are JSON, at most [`BODY_LIMIT`] bytes,
//! and unknown fields are refused. Errors are JSON with a code and the offending field
//! ([`error::ApiError`]). Every change is written to the account's audit trail with the token
//! that made it and the object before and after.

pub mod error;
pub mod openapi;
mod resources;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tracing::{info, warn};

use self::error::ApiError;
use super::call_log::CallLog;
use super::customers::{Customers, StoreHealth};
use super::store::{AccountId, ApiToken, Store, TokenScope, TrunkGroup};

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    /// This trunk server's name.
    pub server_name: String,
    /// This server's running state, for `GET /v1/server`.
    pub server: ServerView,
    /// This server's call records.
    pub call_log: CallLog,
    /// The digest realm passwords are hashed for.
    pub realm: String,
    /// E.164 prefixes failover numbers must start with (toll-fraud protection).
    pub failover_prefixes: Reloadable<Vec<String>>,
    /// The trunk servers, by name (this one and its peers): a PBX should be registered on all.
    pub trunk_servers: Reloadable<Vec<String>>,
}

/// A setting a configuration reload may replace while handlers read it.
#[derive(Debug, Clone)]
pub struct Reloadable<T>(Arc<std::sync::RwLock<Arc<T>>>);

impl<T> Reloadable<T> {
    pub fn new(value: T) -> Self {
        Reloadable(Arc::new(std::sync::RwLock::new(Arc::new(value))))
    }

    /// The value in force.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }
}

/// What the API reports of the running server: the configuration copy it routes from and
/// whether the store answers.
#[derive(Clone)]
pub struct ServerView {
    pub customers: tokio::sync::watch::Receiver<Arc<Customers>>,
    pub store_health: Arc<StoreHealth>,
}

/// The `/v1` routes.
pub fn router(state: ApiState) -> Router {
    use resources::*;
    Router::new()
        .route("/v1/accounts", post(create_account).get(list_accounts))
        .route("/v1/accounts/{id}", get(get_account).delete(delete_account))
        .route("/v1/accounts/{id}/audit", get(account_audit))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route(
            "/v1/trunk-groups",
            post(create_trunk_group).get(list_trunk_groups),
        )
        .route(
            "/v1/trunk-groups/{id}",
            get(get_trunk_group)
                .patch(update_trunk_group)
                .delete(delete_trunk_group),
        )
        .route(
            "/v1/trunk-groups/{id}/failover",
            get(get_failover).put(put_failover),
        )
        .route("/v1/trunk-groups/{id}/health", post(post_health))
        .route("/v1/trunk-groups/{id}/status", get(get_status))
        .route("/v1/trunk-groups/{id}/calls", get(trunk_group_calls))
        .route("/v1/server", get(get_server))
        .route("/v1/dids", post(create_did).get(list_dids))
        .route(
            "/v1/dids/{number}",
            get(get_did).patch(update_did).delete(delete_did),
        )
        .route(
            "/v1/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .fallback(|| async { ApiError::not_found("resource") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this resource does not take that method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Serves the API on `listener` (plain HTTP) until the task is dropped or aborted.
pub async fn serve_plain(listener: TcpListener, state: ApiState) {
    let addr = listener.local_addr().ok();
    if let Err(e) = axum::serve(listener, router(state)).await {
        warn!(?addr, error = %e, "API server stopped");
    }
}

/// Serves the API over TLS on `addr`.
pub async fn serve_tls(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: ApiState,
) {
    let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
    let server = match axum_server::from_tcp_rustls(listener, config) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "API server not started");
            return;
        }
    };
    if let Err(e) = server.serve(router(state).into_make_service()).await {
        warn!(error = %e, "API server stopped");
    }
}

/// Logs where the API listens (tests read the port from this line).
pub fn log_listening(addr: SocketAddr, tls: bool) {
    info!(
        scheme = %if tls { "https" } else { "http" },
        addr = %addr,
        "API listening"
    );
}

// === Authentication ===

/// The token a request was made with.
#[derive(Debug, Clone)]
pub struct Caller(pub ApiToken);

impl Caller {
    pub fn scope(&self) -> TokenScope {
        self.0.scope
    }

    /// Whether this token may see `account`'s objects.
    pub fn sees_account(&self, account: AccountId) -> bool {
        match self.0.scope {
            TokenScope::Operator => true,
            TokenScope::Account(a) => a == account,
            TokenScope::TrunkGroup { account: a, .. } => a == account,
        }
    }

    /// Whether this token may see a trunk group (an agent's token: only its own).
    pub fn sees_trunk_group(&self, group: &TrunkGroup) -> bool {
        match self.0.scope {
            TokenScope::Operator => true,
            TokenScope::Account(a) => a == group.account_id,
            TokenScope::TrunkGroup { trunk_group, .. } => trunk_group == group.id,
        }
    }

    /// Whether this token may change the account's objects beyond the failover plan and
    /// health (a trunk group's token may not).
    pub fn manages(&self, account: AccountId) -> bool {
        match self.0.scope {
            TokenScope::Operator => true,
            TokenScope::Account(a) => a == account,
            TokenScope::TrunkGroup { .. } => false,
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let secret = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        match state.store.token_by_secret(secret).await {
            Ok(Some(token)) => Ok(Caller(token)),
            Ok(None) => Err(ApiError::unauthorized()),
            Err(e) => Err(ApiError::store(e, "authorization")),
        }
    }
}

// === JSON bodies ===

/// A JSON body whose refusal (malformed, unknown field, too large) is a JSON error too.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<ApiState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        use axum::extract::rejection::JsonRejection;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(JsonRejection::JsonDataError(e)) => {
                let message = e.body_text();
                let field = unknown_field(&message);
                Err(ApiError {
                    field,
                    ..ApiError::new(
                        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_body",
                        message,
                    )
                })
            }
            Err(e) => Err(ApiError::new(e.status(), "invalid_body", e.body_text())),
        }
    }
}

// === Path and query parameters ===

/// A numeric id from the path; one that is not a number is a JSON error naming `id`.
pub struct Id<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<ApiState> for Id<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Id(v)),
            Err(e) => Err(ApiError::invalid("id", "invalid_path", e.body_text())),
        }
    }
}

/// Query parameters; an unknown or malformed one is a JSON error naming it.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<ApiState> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &ApiState) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        match serde_urlencoded::from_str::<T>(query) {
            Ok(v) => Ok(Params(v)),
            Err(e) => {
                let message = e.to_string();
                // serde names an unknown key but not the key whose value it could not read:
                // the first key that fails on its own is the one.
                let field = unknown_field(&message).or_else(|| {
                    query
                        .split('&')
                        .find(|pair| serde_urlencoded::from_str::<T>(pair).is_err())
                        .map(|pair| pair.split('=').next().unwrap_or(pair).to_string())
                });
                Err(ApiError {
                    field,
                    ..ApiError::new(
                        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_query",
                        format!("query string: {message}"),
                    )
                })
            }
        }
    }
}

/// The field serde complained about: "unknown field `x`" or "... at line 1 column 5" with a
/// path like "dids.+1555: ...".
fn unknown_field(message: &str) -> Option<String> {
    let start = message.find("unknown field `")? + "unknown field `".len();
    let end = message[start..].find('`')?;
    Some(message[start..start + end].to_string())
}
