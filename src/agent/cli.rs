//! `lifeline-agent`'s command line: `run`, `check-config`, `status`.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

use std::time::Duration;

use super::config::{AgentConfig, Settings};
use super::health::PbxState;
use super::run::{self, AgentStatus};
use super::upstream::{self, ApiClient, HealthReport, ServerReport, SyncState};
use super::watch_file;

/// Lifeline agent: keeps the PBX registered on every trunk server and watches it.
#[derive(Debug, Parser)]
#[command(name = "lifeline-agent", version = crate::VERSION)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run {
        /// TOML configuration file (its `[agent]` table).
        #[arg(long, value_name = "FILE", default_value = "/etc/lifeline/agent.toml")]
        config: PathBuf,
    },
    /// Check a configuration file and exit: 0 when it is good, 78 with the wrong key named.
    CheckConfig {
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the running agent's state: per trunk server, registered or not, expiry and last
    /// error; the PBX's health.
    Status {
        /// The agent's status socket (default: `status_socket` of the configuration).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The configuration naming the socket.
        #[arg(long, value_name = "FILE", default_value = "/etc/lifeline/agent.toml")]
        config: PathBuf,
        /// Print the state as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Exit code for a configuration refused (EX_CONFIG of sysexits.h).
pub const EXIT_CONFIG: i32 = 78;

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::CheckConfig { config } => match AgentConfig::load(&config) {
            Ok(s) => {
                println!(
                    "{}: good ({} trunk servers, PBX {} checked at {})",
                    config.display(),
                    s.servers.len(),
                    s.contact,
                    s.pbx_address
                );
                0
            }
            Err(e) => {
                eprintln!("lifeline-agent: {e}");
                EXIT_CONFIG
            }
        },
        Command::Status {
            socket,
            config,
            json,
        } => {
            let socket = match socket {
                Some(s) => s,
                None => match AgentConfig::load(&config) {
                    Ok(s) => s.raw.status_socket,
                    Err(e) => {
                        eprintln!("lifeline-agent: {e}");
                        return EXIT_CONFIG;
                    }
                },
            };
            status(&socket, json).await
        }
        Command::Run { config } => {
            let settings = match AgentConfig::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    crate::process::init_logging("info");
                    tracing::error!("configuration refused: {e}");
                    eprintln!("lifeline-agent: {e}");
                    return EXIT_CONFIG;
                }
            };
            crate::process::init_logging(&settings.raw.log_level);
            serve(config, settings).await
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM. SIGHUP, or a change of the configuration file,
/// reloads it: an invalid file is refused with the key named and the settings in force stay;
/// new failover settings are pushed; other changes restart the SIP side (registrations stay in
/// place meanwhile).
async fn serve(path: PathBuf, mut settings: Settings) -> i32 {
    let metrics_task = match settings.metrics {
        Some(addr) => match crate::metrics::serve(addr).await {
            Ok((_, task)) => Some(task),
            Err(e) => {
                tracing::error!("cannot start: {e}");
                eprintln!("lifeline-agent: {e}");
                return 1;
            }
        },
        None => None,
    };
    let (status_tx, status_rx) = watch::channel(AgentStatus::default());
    let mut running = match run::start(&settings, status_tx.clone(), PbxState::Unknown).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            eprintln!("lifeline-agent: {e}");
            return 1;
        }
    };
    let (plans, plans_rx) = watch::channel(settings.failover.clone());
    let (sync_tx, sync_rx) = watch::channel(SyncState::default());
    let mut upstream = Vec::new();
    if !settings.raw.api.url.is_empty() {
        match ApiClient::new(&settings.raw.api) {
            Ok(client) => {
                upstream.push(upstream::spawn_sync(client.clone(), plans_rx, sync_tx));
                let (reports, reports_rx) = watch::channel(report_of(&status_rx.borrow()));
                upstream.push(tokio::spawn(forward_reports(status_rx.clone(), reports)));
                upstream.push(upstream::spawn_reporter(
                    client,
                    reports_rx,
                    Duration::from_millis(settings.raw.api.report_interval_ms),
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "the carrier API cannot be used: no health reports, no settings sync")
            }
        }
    }
    let gauges = tokio::spawn(super::metrics::follow(status_rx.clone(), sync_rx.clone()));
    let status_task = match listen_status(&settings.raw.status_socket, status_rx, sync_rx) {
        Ok(task) => Some(task),
        Err(e) => {
            warn!(socket = %settings.raw.status_socket.display(), error = %e, "status socket not available: `lifeline-agent status` will not answer");
            None
        }
    };
    let mut file_changes = match watch_file::watch(&path, Duration::from_millis(300)) {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!(config = %path.display(), error = %e, "configuration file not watched: reload with SIGHUP");
            None
        }
    };
    let mut hangup = crate::process::hangup_signal();
    info!(
        servers = settings.servers.len(),
        contact = %settings.contact,
        "agent started"
    );
    let watchdog = crate::process::notify_systemd_ready();
    let shutdown = crate::process::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let why = tokio::select! {
            () = &mut shutdown => break,
            Some(()) = crate::process::recv_hangup(&mut hangup) => "SIGHUP",
            Some(()) = recv_change(&mut file_changes) => "the file changed",
        };
        let fresh = match AgentConfig::load(&path) {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!(
                    reason = why,
                    "configuration refused; the settings in force stay: {e}"
                );
                continue;
            }
        };
        if fresh == settings {
            continue;
        }
        info!(reason = why, "configuration reloaded");
        plans.send_if_modified(|p| {
            let changed = *p != fresh.failover;
            *p = fresh.failover.clone();
            changed
        });
        // What is not applied while running stays as it is in `settings`.
        let mut applied = fresh.clone();
        if fresh.raw.api != settings.raw.api
            || fresh.raw.status_socket != settings.raw.status_socket
            || fresh.raw.log_level != settings.raw.log_level
            || fresh.raw.metrics_listen != settings.raw.metrics_listen
        {
            warn!(
                "api, status_socket, log_level and metrics_listen changes take effect when the \
                 agent restarts"
            );
            applied.raw.api = settings.raw.api.clone();
            applied.raw.status_socket = settings.raw.status_socket.clone();
            applied.raw.log_level = settings.raw.log_level.clone();
            applied.raw.metrics_listen = settings.raw.metrics_listen.clone();
            applied.metrics = settings.metrics;
        }
        if sip_side(&fresh) != sip_side(&settings) {
            info!("SIP settings changed: restarting registrations");
            // The new loop starts from what the old one knew of the PBX: a reload while the
            // PBX is down must not register it again.
            let pbx = status_tx.borrow().pbx;
            running.stop().await;
            running = match run::start(&fresh, status_tx.clone(), pbx).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(
                        "cannot run with the new SIP settings ({e}); keeping the old ones"
                    );
                    let mut kept = settings.clone();
                    kept.raw.failover = applied.raw.failover.clone();
                    kept.failover = applied.failover.clone();
                    applied = kept;
                    match run::start(&settings, status_tx.clone(), pbx).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!("cannot restart with the old settings either: {e}");
                            return 1;
                        }
                    }
                }
            };
        }
        settings = applied;
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!("shutting down; registrations stay in place until they expire");
    if let Some(w) = watchdog {
        w.abort();
    }
    running.stop().await;
    // Dropping the senders lets the reporter post a last change, then end.
    drop(plans);
    drop(status_tx);
    for task in upstream {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    gauges.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(task) = status_task {
        task.abort();
        let _ = std::fs::remove_file(&settings.raw.status_socket);
    }
    0
}

async fn recv_change(rx: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The settings the SIP side runs on: all but the API, the failover plan, the status socket
/// and the log level.
fn sip_side(s: &Settings) -> Settings {
    let mut s = s.clone();
    s.raw.api = Default::default();
    s.raw.failover = Default::default();
    s.raw.status_socket = Default::default();
    s.raw.log_level = Default::default();
    s.failover = None;
    s
}

/// The health report for a status.
fn report_of(status: &AgentStatus) -> HealthReport {
    HealthReport {
        pbx: status.pbx,
        servers: status
            .servers
            .iter()
            .map(|s| {
                (
                    s.server.clone(),
                    ServerReport {
                        registered: s.registered,
                        expires_in: s.expires_in,
                        last_error: s.last_error.clone(),
                    },
                )
            })
            .collect(),
        ..HealthReport::default()
    }
}

/// Turns every change of the status into a health report.
async fn forward_reports(
    mut status: watch::Receiver<AgentStatus>,
    reports: watch::Sender<HealthReport>,
) {
    while status.changed().await.is_ok() {
        let report = report_of(&status.borrow_and_update());
        reports.send_if_modified(|r| {
            let changed = *r != report;
            *r = report;
            changed
        });
    }
}

/// Answers every connection to `path` with the status as one JSON document: the SIP side's
/// state and the settings sync's.
fn listen_status(
    path: &Path,
    status: watch::Receiver<AgentStatus>,
    sync: watch::Receiver<SyncState>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent answers on it",
            ));
        }
        // Left by an agent that did not stop cleanly.
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let mut doc = serde_json::to_value(&*status.borrow()).unwrap_or_default();
            doc["sync"] = serde_json::to_value(&*sync.borrow()).unwrap_or_default();
            let body = doc.to_string().into_bytes();
            tokio::spawn(async move {
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
        }
    }))
}

/// `lifeline-agent status`.
async fn status(socket: &Path, json: bool) -> i32 {
    let read = async {
        let mut stream = UnixStream::connect(socket).await?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = match tokio::time::timeout(std::time::Duration::from_secs(5), read).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            eprintln!(
                "lifeline-agent: no running agent at {}: {e}",
                socket.display()
            );
            return 1;
        }
        Err(_) => {
            eprintln!("lifeline-agent: {} did not answer", socket.display());
            return 1;
        }
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return 0;
    }
    let Ok(s) = serde_json::from_slice::<serde_json::Value>(&body) else {
        eprintln!(
            "lifeline-agent: unreadable status from {}",
            socket.display()
        );
        return 1;
    };
    println!("PBX\t{}", s["pbx"].as_str().unwrap_or("?"));
    for server in s["servers"].as_array().into_iter().flatten() {
        let state = if server["registered"] == true {
            format!(
                "registered (expires in {} s)",
                server["expires_in"].as_u64().unwrap_or(0)
            )
        } else if server["withdrawn"] == true {
            "withdrawn (PBX down)".to_string()
        } else {
            "not registered".to_string()
        };
        let error = server["last_error"]
            .as_str()
            .map(|e| format!("\tlast error: {e}"))
            .unwrap_or_default();
        println!(
            "{}\t{state}{error}",
            server["server"].as_str().unwrap_or("?")
        );
    }
    let sync = &s["sync"];
    let sync_line = if sync["enabled"] != true {
        "off (the portal keeps the failover settings)".to_string()
    } else {
        let mut line = match sync["last_success_ms"].as_i64() {
            Some(ms) => format!("last pushed {}", crate::carrier::admin::utc(ms / 1000)),
            None => "never pushed".to_string(),
        };
        if sync["pending"] == true {
            line.push_str(", a change is waiting");
        }
        if let Some(e) = sync["last_error"].as_str() {
            line.push_str(&format!(", last error: {e}"));
        }
        line
    };
    println!("settings sync\t{sync_line}");
    0
}
