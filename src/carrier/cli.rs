//! `lifeline-carrier` command line: everything the binary does is a call a test can make.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use super::admin::{self, AdminCommand};
use super::call_log::{self, CallLogReader};
use super::config::{CarrierConfig, Settings};
use super::server;
use crate::process::{
    hangup_signal, init_logging, notify_systemd_ready, recv_hangup, shutdown_signal,
};

/// Lifeline trunk server: SIP registrar and failover proxy.
#[derive(Debug, Parser)]
#[command(name = "lifeline-carrier", version = crate::VERSION)]
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
    /// List the calls this server handled, newest first, then exit.
    ///
    /// One block per call, fields separated by tabs. First the call:
    /// `STARTED  CALL_ID  DID  STATUS  OUTCOME  ANSWERED_BY  DURATION`
    /// (UTC with milliseconds; `-` if no one answered; `1234ms`), then one line per target
    /// tried, indented by two spaces:
    /// `+OFFSET  STAGE  TARGET  OUTCOME  DURATION`
    /// (`+120ms`; `800ms`, or `-` if undecided). Reads `<data_dir>/calls.sqlite3` read-only:
    /// safe while the server runs.
    Calls {
        /// Only the calls to this DID (with or without the `+`).
        #[arg(long, value_name = "NUMBER")]
        did: Option<String>,
        /// At most this many calls.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: u32,
    },
    /// Print how a call to a DID would be routed right now on this server (its bindings here,
    /// its failover settings and the ordered targets of the delivery rule), then exit.
    Explain {
        /// The DID, with or without the `+`.
        did: String,
    },
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

/// Runs the server until SIGINT or SIGTERM; SIGHUP reloads the configuration file (see
/// [`server::RunningCarrier::reload`]). `loaded` is [`settings`]`(&cli)`, read once by the
/// binary (it sizes the runtime). Returns the process exit code.
pub async fn run(mut cli: Cli, loaded: Result<Settings, super::config::ConfigError>) -> i32 {
    let settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            init_logging("info");
            tracing::error!("configuration refused: {e}");
            eprintln!("lifeline-carrier: {e}");
            return EXIT_CONFIG;
        }
    };
    init_logging(&settings.raw.log_level);
    match cli.command.take() {
        Some(Command::Admin(cmd)) => {
            return admin::execute(cmd, &settings.store_location(), &settings.raw.realm).await;
        }
        Some(Command::Calls { did, limit }) => {
            return calls(&settings.raw.data_dir, did.as_deref(), limit).await;
        }
        Some(Command::Explain { did }) => {
            let mut out = std::io::stdout().lock();
            return match super::explain::explain(&settings, &did, &mut out).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("lifeline-carrier: {e}");
                    1
                }
            };
        }
        None => {}
    }
    // Handled before start: a reload queued behind the start (systemd sends it once we say
    // READY) must not meet SIGHUP's default action, which ends the process.
    let mut hangup = hangup_signal();
    let mut running = match server::start(settings).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            eprintln!("lifeline-carrier: {e}");
            return 1;
        }
    };
    let watchdog = notify_systemd_ready();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = recv_hangup(&mut hangup) => reload(&cli, &mut running),
        }
    }
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if let Some(w) = watchdog {
        w.abort();
    }
    running.stop().await;
    0
}

/// SIGHUP: reads the configuration file again and puts it in force. A file that is refused
/// changes nothing; the error names the key.
fn reload(cli: &Cli, running: &mut server::RunningCarrier) {
    let Some(path) = &cli.config else {
        tracing::warn!("SIGHUP: there is no configuration file to reload (no --config)");
        return;
    };
    let fresh = match settings(cli) {
        Ok(fresh) => fresh,
        Err(e) => {
            tracing::error!(config = %path.display(), "configuration refused; the settings in force stay: {e}");
            return;
        }
    };
    match running.reload(fresh, path) {
        Ok(pending) if pending.is_empty() => {
            tracing::info!(config = %path.display(), "configuration reloaded");
        }
        Ok(pending) => tracing::warn!(
            config = %path.display(),
            restart_needed = %pending.join(", "),
            "configuration reloaded, except keys that take effect at the next restart"
        ),
        Err(e) => tracing::error!(
            config = %path.display(),
            "configuration refused; the settings in force stay: {e}"
        ),
    }
}

/// `lifeline-carrier calls`: prints the newest calls (format in [`call_log`]). Returns the
/// process exit code: 0, or 1 with a message naming the file when it cannot be read.
pub async fn calls(data_dir: &Path, did: Option<&str>, limit: u32) -> i32 {
    let log = match CallLogReader::open(data_dir).await {
        Ok(log) => log,
        Err(e) => {
            eprintln!("lifeline-carrier: {e}");
            return 1;
        }
    };
    let result = log.recent(did, limit).await;
    log.close().await;
    let calls = match result {
        Ok(calls) => calls,
        Err(e) => {
            eprintln!("lifeline-carrier: {e}");
            return 1;
        }
    };
    let out: String = calls.iter().map(call_log::format_call).collect();
    let printed = {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
    };
    match printed {
        Ok(()) => 0,
        // A reader that stopped early (`| head`) is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("lifeline-carrier: cannot print the calls: {e}");
            1
        }
    }
}
