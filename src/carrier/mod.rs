//! The trunk server.
