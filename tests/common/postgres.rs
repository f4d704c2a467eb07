//! A private, throw-away PostgreSQL cluster for one test: its own temporary folder, its own
//! address and port, trust authentication for the user `lifeline`, and a database `lifeline`.
//! Run as root, every PostgreSQL program runs as the `postgres` system user (`runuser`).
//! Anything that goes wrong is a panic: a test that needs PostgreSQL fails, never skips.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs the server programs, one folder per major version.
const PG_LIB: &str = "/usr/lib/postgresql";
/// How many times `start` picks a new port when the chosen one got taken meanwhile.
const PORT_ATTEMPTS: usize = 5;
/// The longest any one PostgreSQL program may run (`timeout`), in seconds.
const COMMAND_TIMEOUT_SECS: u32 = 120;
/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_WAIT_SECS: u32 = 60;
/// How long the server has to accept connections (`pg_isready`) once `pg_ctl` is done.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A PostgreSQL cluster in a temporary folder, stopped (`-m immediate`) when dropped.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    addr: Ipv4Addr,
    port: u16,
    running: bool,
}

impl Postgres {
    /// Creates a cluster (`initdb`) and starts it, listening only on `addr` (a loopback IPv4
    /// address) at a free port, then creates the database `lifeline` owned by `lifeline`.
    pub fn start(addr: Ipv4Addr) -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("create a temporary folder for PostgreSQL");
        if as_root() {
            run_checked(
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:")
                    .arg(dir.path()),
                "chown the temporary folder to the `postgres` user (it comes with the Debian \
                 package `postgresql`)",
            );
        }
        let mut pg = Postgres {
            dir,
            bin,
            addr,
            port: 0,
            running: false,
        };
        let data = pg.data_dir();
        let mut initdb = pg.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "lifeline", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        run_checked(&mut initdb, "initdb");
        // Clients on other loopback addresses too (the source address is not always 127.0.0.1).
        let hba = data.join("pg_hba.conf");
        let mut rules =
            std::fs::read_to_string(&hba).unwrap_or_else(|e| panic!("read {}: {e}", hba.display()));
        rules.push_str("\nhost all all 127.0.0.0/8 trust\n");
        std::fs::write(&hba, rules).unwrap_or_else(|e| panic!("write {}: {e}", hba.display()));

        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            pg.port = free_port(addr);
            match pg.pg_ctl_start() {
                Ok(()) => break,
                Err(StartError::PortTaken(log)) => failures.push(log),
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        assert!(
            pg.running,
            "PostgreSQL could not start on {addr}: every one of {PORT_ATTEMPTS} free ports was \
             taken before it bound it; last log:\n{}",
            failures.last().map(String::as_str).unwrap_or("")
        );
        pg.wait_ready();

        let mut createdb = pg.command("createdb");
        createdb
            .args(["-h", &addr.to_string(), "-p", &pg.port.to_string()])
            .args(["-U", "lifeline", "lifeline"]);
        run_checked(&mut createdb, "createdb");
        pg
    }

    /// `postgres://lifeline@ADDR:PORT/lifeline`.
    pub fn url(&self) -> String {
        format!("postgres://lifeline@{}:{}/lifeline", self.addr, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary folder: `data/` (the cluster), `postgres.log`, and the unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Stops the server (`pg_ctl stop -m fast`) and waits until it is gone.
    pub fn stop(&mut self) {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", &PG_CTL_WAIT_SECS.to_string()])
            .args(["-m", "fast", "stop"]);
        let out = run(&mut cmd);
        if !out.status.success() {
            panic!("{}\nserver log:\n{}", failure(&cmd, &out), self.log());
        }
        self.running = false;
    }

    /// Starts the same cluster again on the same address and port, and waits until it accepts
    /// connections.
    pub fn restart(&mut self) {
        match self.pg_ctl_start() {
            Ok(()) => {}
            Err(StartError::PortTaken(log)) => panic!(
                "PostgreSQL could not start again: {}:{} got taken while it was stopped; \
                 log:\n{log}",
                self.addr, self.port
            ),
            Err(StartError::Failed(msg)) => panic!("{msg}"),
        }
        self.wait_ready();
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The PostgreSQL program `program`, as the `postgres` user when we are root, in the
    /// temporary folder, with no `PG…` variables of ours, bounded by `timeout`.
    fn command(&self, program: &str) -> Command {
        let mut cmd = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "timeout"]);
            c
        } else {
            Command::new("timeout")
        };
        cmd.args(["-k", "5", &COMMAND_TIMEOUT_SECS.to_string()])
            .arg(self.bin.join(program))
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PG") {
                cmd.env_remove(name);
            }
        }
        cmd
    }

    /// `pg_ctl start` on `self.addr` and `self.port`; sets `running` when it succeeded.
    fn pg_ctl_start(&mut self) -> Result<(), StartError> {
        let log_before = self.log().len();
        // pg_ctl hands `-o` to a shell: the folder is quoted.
        let options = format!(
            "-c listen_addresses={} -p {} -k '{}' -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off",
            self.addr,
            self.port,
            self.dir.path().display()
        );
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", &PG_CTL_WAIT_SECS.to_string()])
            .arg("-o")
            .arg(options)
            .arg("start");
        let out = run(&mut cmd);
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        // It may still be starting (timed out): make sure nothing is left behind.
        self.kill();
        let log = self.log();
        let new = log.get(log_before..).unwrap_or(&log).to_string();
        if new.contains("could not bind") && new.contains("Address already in use") {
            return Err(StartError::PortTaken(new));
        }
        Err(StartError::Failed(format!(
            "{}\nserver log:\n{log}",
            failure(&cmd, &out)
        )))
    }

    /// Waits (bounded) until `pg_isready` says the server accepts connections.
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut cmd = self.command("pg_isready");
            cmd.args(["-h", &self.addr.to_string(), "-p", &self.port.to_string()])
                .args(["-U", "lifeline", "-t", "5"]);
            let out = run(&mut cmd);
            if out.status.success() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "PostgreSQL did not accept connections within {READY_TIMEOUT:?}: {}\n\
                     server log:\n{}",
                    failure(&cmd, &out),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `pg_ctl stop -m immediate`, ignoring errors.
    fn kill(&mut self) {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "20", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
        self.running = false;
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            self.kill();
        }
    }
}

enum StartError {
    /// Someone else bound the port first; the new part of the server log.
    PortTaken(String),
    /// Anything else, described for a panic.
    Failed(String),
}

/// The `bin` folder of the highest PostgreSQL version under `/usr/lib/postgresql`.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(PG_LIB)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|n| n.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is missing: no {PG_LIB}/<version>/bin/initdb; `scripts/test` installs \
             it (Debian package `postgresql`)"
        ),
    }
}

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A port of `addr` that was free a moment ago.
fn free_port(addr: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((addr, 0))
        .unwrap_or_else(|e| panic!("bind {addr}:0 to find a free port: {e}"));
    listener.local_addr().unwrap().port()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// Runs `cmd` and panics (naming `what`) unless it succeeds.
fn run_checked(cmd: &mut Command, what: &str) -> Output {
    let out = run(cmd);
    if !out.status.success() {
        panic!("{what} failed: {}", failure(cmd, &out));
    }
    out
}

/// The command, its exit status (124 is `timeout`'s) and what it printed.
fn failure(cmd: &Command, out: &Output) -> String {
    format!(
        "{cmd:?} exited with {} (124: timed out)\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
