//! What both programs need of the process they run in: logging (journald under systemd,
//! text on a terminal), systemd readiness and watchdog, and the stop signals.

use tracing_subscriber::EnvFilter;

/// Logs: to journald, with every event field as a journal field (`CALL_ID`, `DID`, …), when
/// systemd connected standard error to the journal (`JOURNAL_STREAM`); otherwise readable text
/// on standard error. The filter comes from `RUST_LOG`, else the configuration.
pub fn init_logging(level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // sqlx logs every statement at debug: keep it quiet unless asked for by name.
    let quiet = |f: &str| {
        if f.contains("sqlx") {
            f.to_string()
        } else {
            format!("{f},sqlx=warn")
        }
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(quiet(&f)).ok())
        .or_else(|| EnvFilter::try_new(quiet(level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(tracing_journald::layer)
        .and_then(Result::ok)
        // Fields as they are named (`CALL_ID`), not `F_CALL_ID`.
        .map(|layer| layer.with_field_prefix(None));
    match journald {
        Some(journald) => {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .try_init();
        }
        None => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .try_init();
        }
    }
}

/// Under systemd (`Type=notify`): says the service is ready, and feeds the watchdog at half
/// its interval when `WatchdogSec` is set, from the runtime that serves the program (a stuck
/// runtime stops the pings). Elsewhere it does nothing.
pub fn notify_systemd_ready() -> Option<tokio::task::JoinHandle<()>> {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "systemd readiness not sent");
    }
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = std::time::Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }))
}

/// SIGHUP, which asks for the configuration to be read again; `None` (logged) when it cannot
/// be handled.
pub fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP not handled");
            None
        }
    }
}

/// The next SIGHUP; never, without a handler.
pub async fn recv_hangup(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Returns on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
