//! `lifeline-carrier admin …` end to end: the real binary against a store in a temp folder.

use std::path::Path;
use std::process::Command;

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

fn admin(data_dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lifeline-carrier"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("admin")
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

fn ok(data_dir: &Path, args: &[&str]) -> String {
    let out = admin(data_dir, args);
    assert_eq!(out.code, 0, "{args:?} failed: {}", out.stderr);
    out.stdout
}

fn refused(data_dir: &Path, args: &[&str]) -> String {
    let out = admin(data_dir, args);
    assert_eq!(out.code, 1, "{args:?} should fail; stdout {:?}", out.stdout);
    assert!(out.stdout.is_empty(), "nothing on stdout when refused");
    out.stderr
}

#[test]
fn provisioning_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let password = "Plain-Cli-Pa55word-51e0";

    assert_eq!(ok(&data, &["account", "add", "Acme Ltd"]), "1\n");
    assert!(data.join("store.sqlite3").is_file());
    let accounts = ok(&data, &["account", "list"]);
    let fields: Vec<&str> = accounts.trim_end().split('\t').collect();
    assert_eq!(&fields[..2], ["1", "Acme Ltd"]);
    assert_eq!(fields.len(), 3);

    let tg = ok(
        &data,
        &[
            "trunk-group",
            "add",
            "--account",
            "1",
            "--name",
            "main",
            "--username",
            "acme-main",
            "--password",
            password,
        ],
    );
    assert_eq!(tg, "1\n");
    let groups = ok(&data, &["trunk-group", "list", "--account", "1"]);
    let fields: Vec<&str> = groups.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 6, "{groups:?}");
    assert_eq!(&fields[..4], ["1", "1", "main", "acme-main"]);
    assert!(!groups.contains(password));

    assert_eq!(
        ok(&data, &["did", "add", "442071234567", "--trunk-group", "1"]),
        "+442071234567\n"
    );
    assert_eq!(
        ok(&data, &["did", "list"])
            .split('\t')
            .take(2)
            .collect::<Vec<_>>(),
        ["+442071234567", "1"]
    );

    let err = refused(&data, &["account", "add", "Acme Ltd"]);
    assert!(
        err.contains("account name \"Acme Ltd\" is already taken"),
        "{err}"
    );
    let err = refused(&data, &["did", "add", "+0123", "--trunk-group", "1"]);
    assert!(err.contains("invalid phone number"), "{err}");
    let err = refused(&data, &["trunk-group", "remove", "1"]);
    assert!(err.contains("still has 1 DID(s)"), "{err}");

    assert_eq!(
        ok(&data, &["trunk-group", "set-password", "1", "other"]),
        ""
    );
    assert_eq!(ok(&data, &["did", "remove", "+442071234567"]), "");
    assert_eq!(ok(&data, &["trunk-group", "remove", "1"]), "");
    assert_eq!(ok(&data, &["account", "remove", "1"]), "");
    assert_eq!(ok(&data, &["account", "list"]), "");

    for entry in std::fs::read_dir(&data).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes
                .windows(password.len())
                .any(|w| w == password.as_bytes()),
            "the plain password is in the store"
        );
    }
}

#[test]
fn bad_arguments_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = admin(dir.path(), &["trunk-group", "add", "--account", "1"]);
    assert_eq!(out.code, 2, "clap usage error");
    assert!(out.stderr.contains("--name"), "{}", out.stderr);
    let out = admin(dir.path(), &["account", "remove", "one"]);
    assert_eq!(out.code, 2);
}
