//! The programs as an operator meets them: `--version` names the commit, and the systemd
//! units pass `systemd-analyze verify` with the built binaries in place of the installed ones.

use std::path::Path;
use std::process::Command;

const PROGRAMS: [(&str, &str); 2] = [
    ("lifeline-carrier", env!("CARGO_BIN_EXE_lifeline-carrier")),
    ("lifeline-agent", env!("CARGO_BIN_EXE_lifeline-agent")),
];

#[test]
fn version_names_the_package_version_and_the_commit() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git");
    assert!(head.status.success(), "the tests run from a git checkout");
    let head = String::from_utf8(head.stdout).unwrap().trim().to_string();
    for (name, bin) in PROGRAMS {
        let out = Command::new(bin).arg("--version").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text.trim(),
            format!("{name} {} (commit {head})", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bin) in PROGRAMS {
        let unit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("systemd/{name}.service")),
        )
        .unwrap();
        assert!(
            unit.contains("Type=notify") && unit.contains("WatchdogSec="),
            "{name}"
        );
        let unit = unit.replace(&format!("/usr/bin/{name}"), bin);
        std::fs::write(dir.path().join(format!("{name}.service")), unit).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("lifeline-carrier.service"))
        .arg(dir.path().join("lifeline-agent.service"))
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/test installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("lifeline"),
        "systemd-analyze complained about our units:\n{stderr}"
    );
}
