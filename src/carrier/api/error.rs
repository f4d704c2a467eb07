//! The API's errors: a status and a JSON body naming what was wrong.
//!
//! ```json
//! {"error": {"code": "invalid_number", "message": "...", "field": "failover_number"}}
//! ```

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::carrier::store::StoreError;

/// An API error: the HTTP status, a stable code, a message for people and, for validation
/// errors, the offending field.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A refused value of `field` (422).
    pub fn invalid(field: &str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.to_string()),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
        }
    }

    /// No such object, or not one this token may see: the same answer either way.
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    /// The token may see the object but not change it this way.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid token is required: Authorization: Bearer <token>",
        )
    }

    /// A store error, with `field` named for validation errors.
    pub fn store(e: StoreError, field: &str) -> ApiError {
        use StoreError as E;
        let invalid = |code, e: &StoreError| ApiError::invalid(field, code, e.to_string());
        match &e {
            E::InvalidNumber { .. } => invalid("invalid_number", &e),
            E::InvalidUsername { .. } => {
                ApiError::invalid("username", "invalid_username", e.to_string())
            }
            E::InvalidName { .. } => invalid("invalid_name", &e),
            E::FailoverNumberIsDid(_) => invalid("number_is_did", &e),
            E::DidListedTwice(_) => invalid("duplicate_did", &e),
            E::TokenScopeMismatch { .. } => {
                ApiError::invalid("scope", "invalid_scope", e.to_string())
            }
            E::TokenNotFound(_) => ApiError::not_found("token"),
            E::EmptyPassword => ApiError::invalid("password", "invalid_password", e.to_string()),
            E::InvalidFailoverUri { .. } => invalid("invalid_uri", &e),
            E::FailoverPbxNotFound(_)
            | E::FailoverPbxIsItself(_)
            | E::FailoverPbxOtherAccount { .. } => invalid("invalid_failover_pbx", &e),
            E::Duplicate { .. } => ApiError {
                field: Some(field.to_string()),
                ..ApiError::new(StatusCode::CONFLICT, "duplicate", e.to_string())
            },
            E::AccountHasTrunkGroups { .. }
            | E::TrunkGroupHasDids { .. }
            | E::TrunkGroupIsFailoverPbx { .. }
            | E::AccountHasTokens { .. }
            | E::TrunkGroupHasTokens { .. } => {
                ApiError::new(StatusCode::CONFLICT, "in_use", e.to_string())
            }
            E::AccountNotFound(_) => ApiError::not_found("account"),
            E::TrunkGroupNotFound(_) => ApiError::not_found("trunk group"),
            E::DidNotFound(_) => ApiError::not_found("DID"),
            E::UsernameNotFound(_) => ApiError::not_found("trunk group"),
            _ => {
                tracing::warn!(error = %e, "API request failed in the store");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the configuration store could not complete the request",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
