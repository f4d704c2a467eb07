//! `lifeline-carrier` command line: everything the binary does is a call a test can make.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use super::admin::{self, AdminCommand};
use super::config::{CarrierConfig, Settings};
use super::server;

/// Lifeline trunk server: SIP registrar and failover proxy.
#[derive(Debug, Parser)]
#[command(name = "lifeline-carrier", version)]
pub struct Cli {
    /// TOML configuration file; without one the server runs on 127.0.0.1:5060 (UDP and TCP).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// State folder; overrides `data_dir` of the configuration.
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Without a command, run the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to do instead of running the server.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Edit the configuration store (accounts, trunk groups, DIDs), then exit. A running
    /// server on the same data folder picks the change up.
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// Exit code for a configuration the server refuses (EX_CONFIG of sysexits.h).
pub const EXIT_CONFIG: i32 = 78;

/// Loads the configuration named on the command line, or the loopback default.
pub fn settings(cli: &Cli) -> Result<Settings, super::config::ConfigError> {
    let mut settings = match &cli.config {
        Some(path) => CarrierConfig::load(path)?,
        None => CarrierConfig::default().check(std::path::Path::new("(defaults)"))?,
    };
    if let Some(dir) = &cli.data_dir {
        settings.raw.data_dir = dir.clone();
    }
    Ok(settings)
}

/// Text logs on standard error; the filter from `RUST_LOG`, else the configuration.
pub fn init_logging(level: &str) {
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs the server until SIGINT or SIGTERM. Returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let settings = match settings(&cli) {
        Ok(s) => s,
        Err(e) => {
            init_logging("info");
            tracing::error!("configuration refused: {e}");
            eprintln!("lifeline-carrier: {e}");
            return EXIT_CONFIG;
        }
    };
    init_logging(&settings.raw.log_level);
    if let Some(Command::Admin(cmd)) = cli.command {
        return admin::execute(cmd, &settings.raw.data_dir, &settings.raw.realm).await;
    }
    let running = match server::start(settings).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            eprintln!("lifeline-carrier: {e}");
            return 1;
        }
    };
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    0
}

async fn shutdown_signal() {
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
