//! Helpers shared by the integration tests: running the real `lifeline-carrier` binary, and
//! moving a test into a private network namespace.
#![allow(dead_code)]

pub mod dns;
pub mod http;
pub mod postgres;
pub mod sipp;
pub mod uas;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// A running `lifeline-carrier` process, killed on drop.
pub struct Carrier {
    pub child: Child,
    /// `(transport, address)` as the carrier logged them.
    pub bound: Vec<(String, SocketAddr)>,
    /// Everything it has logged so far.
    pub log: Arc<Mutex<String>>,
    pub dir: tempfile::TempDir,
}

impl Carrier {
    /// The bound address of `transport` (`udp`, `tcp`, `tls`).
    pub fn addr(&self, transport: &str) -> SocketAddr {
        self.bound
            .iter()
            .find(|(t, _)| t == transport)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {transport} listener in {:?}", self.bound))
    }

    /// Where the provisioning API listens, as logged (`API listening scheme=http addr=…`).
    pub fn api_addr(&self) -> SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(addr) = log.lines().find_map(|l| {
                let rest = &l[l.find("API listening ")?..];
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))?
                    .parse()
                    .ok()
            }) {
                return addr;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the carrier never logged its API address:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn carrier_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lifeline-carrier"))
}

/// Starts the carrier with `config` (the text of a TOML file) and waits until it has logged
/// `listeners` bound addresses.
pub fn start_carrier(config: &str, listeners: usize) -> Carrier {
    start_carrier_in(tempfile::tempdir().unwrap(), config, listeners)
}

/// Starts the carrier with its config and data folder (`data/`) in `dir`: a data folder that
/// [`admin`] provisioned, or that an earlier carrier left (restart tests).
pub fn start_carrier_in(dir: tempfile::TempDir, config: &str, listeners: usize) -> Carrier {
    let path = dir.path().join("carrier.toml");
    std::fs::write(&path, with_free_api_port(config)).unwrap();
    let data = dir.path().join("data");
    let mut cmd = Command::new(carrier_bin());
    cmd.arg("--config").arg(&path).arg("--data-dir").arg(&data);
    spawn(cmd, listeners, dir)
}

/// Tests run many carriers at once: unless the config names one, the API gets a free port
/// (`api_listen` goes first in the `[carrier]` table, before any `[[carrier.peers]]`).
pub fn with_free_api_port(config: &str) -> String {
    if config.contains("api_listen") {
        return config.to_string();
    }
    if config.contains("[carrier]\n") {
        config.replacen(
            "[carrier]\n",
            "[carrier]\napi_listen = \"127.0.0.1:0\"\n",
            1,
        )
    } else {
        format!("[carrier]\napi_listen = \"127.0.0.1:0\"\n{config}")
    }
}

/// What a command-line run of `lifeline-carrier` printed, and its exit code.
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `lifeline-carrier --data-dir DATA_DIR ARGS…` (with `RUST_LOG` unset).
pub fn run_carrier(data_dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(carrier_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("runs lifeline-carrier");
    Output {
        code: out.status.code().expect("exits"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// Runs `lifeline-carrier admin ARGS` on the data folder `dir/data` (with `dir/carrier.toml`
/// when a carrier was started there) and returns its standard output; panics with its error
/// output when it fails.
pub fn admin(dir: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(carrier_bin());
    cmd.arg("admin").arg("--data-dir").arg(dir.join("data"));
    // A started carrier's config may name a shared store (`store_url`): use the same.
    let config = dir.join("carrier.toml");
    if config.exists() {
        cmd.arg("--config").arg(config);
    }
    let out = cmd.args(args).output().expect("run lifeline-carrier admin");
    assert!(
        out.status.success(),
        "admin {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Provisions an account with one trunk group (username, password) and returns the trunk
/// group's id.
pub fn provision_trunk_group(dir: &Path, username: &str, password: &str) -> String {
    let account = admin(dir, &["account", "add", &format!("acct-{username}")]);
    admin(
        dir,
        &[
            "trunk-group",
            "add",
            "--account",
            account.trim(),
            "--name",
            username,
            "--username",
            username,
            "--password",
            password,
        ],
    )
    .trim()
    .to_string()
}

/// Stops the carrier with SIGTERM (a clean shutdown that writes pending bindings) and waits.
pub fn terminate(mut carrier: Carrier) -> tempfile::TempDir {
    let pid = carrier.child.id().to_string();
    let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(st.success());
    let start = std::time::Instant::now();
    while carrier.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "carrier did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = tempfile::tempdir().unwrap();
    std::mem::replace(&mut carrier.dir, dir)
}

/// Starts the carrier as `cmd` says and waits for `listeners` "listening" lines.
pub fn spawn(mut cmd: Command, listeners: usize, dir: tempfile::TempDir) -> Carrier {
    cmd.env("RUST_LOG", "debug,sqlx=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start lifeline-carrier");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(b) = parse_listening(&line) {
                let _ = tx.send(b);
            }
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let mut bound = Vec::new();
    while bound.len() < listeners {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(b) => bound.push(b),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "carrier did not report {listeners} listeners; log:\n{}",
                    log.lock().unwrap()
                );
            }
        }
    }
    Carrier {
        child,
        bound,
        log,
        dir,
    }
}

/// Reads `… listening transport=udp addr=127.0.0.1:5060`.
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find("listening transport=")? + "listening transport=".len()..];
    let (transport, rest) = rest.split_once(' ')?;
    let addr = rest.strip_prefix("addr=")?.split_whitespace().next()?;
    Some((transport.to_string(), addr.parse().ok()?))
}

/// Runs the calling test again inside a new network namespace with only loopback up, so that
/// nothing it sends can leave the machine. Returns true when already inside (go on with the
/// test), false after the child run passed (the outer run has nothing more to do).
pub fn in_private_netns(test_name: &str) -> bool {
    if std::env::var_os("LIFELINE_IN_NETNS").is_some() {
        let st = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("run `ip` (Debian package iproute2)");
        assert!(st.success(), "ip link set lo up failed");
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .arg("-n")
        .arg("--")
        .arg(&exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env("LIFELINE_IN_NETNS", "1")
        .output()
        .expect("run `unshare -n` (util-linux; needs root or user namespaces)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "test failed inside the namespace:\n{text}"
    );
    assert!(
        text.contains("1 passed"),
        "the namespaced run did not run the test:\n{text}"
    );
    false
}

/// Reads a corpus file of RFC 4475.
pub fn rfc4475(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/testdata/rfc4475")
        .join(format!("{name}.dat"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The status code of a response, read without the project's parser.
pub fn status_of(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    if parts.next()? != "SIP/2.0" {
        return None;
    }
    parts.next()?.parse().ok()
}

/// The value of the first header called `name` (case-insensitive, no compact forms).
pub fn header_of<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}
