//! `lifeline-carrier admin …` end to end: the real binary against a store in a temp folder.

mod common;

use common::{Output, run_carrier};
use std::path::Path;

fn admin(data_dir: &Path, args: &[&str]) -> Output {
    let args: Vec<&str> = std::iter::once("admin")
        .chain(args.iter().copied())
        .collect();
    run_carrier(data_dir, &args)
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
    assert_eq!(fields.len(), 8, "{groups:?}");
    assert_eq!(&fields[..4], ["1", "1", "main", "acme-main"]);
    assert_eq!(&fields[6..], ["-", "-"], "no failover number or PBX yet");
    assert!(!groups.contains(password));

    assert_eq!(
        ok(&data, &["did", "add", "442071234567", "--trunk-group", "1"]),
        "+442071234567\n"
    );
    let dids = ok(&data, &["did", "list"]);
    let fields: Vec<&str> = dids.trim_end().split('\t').collect();
    assert_eq!(fields.len(), 4, "{dids:?}");
    assert_eq!(&fields[..2], ["+442071234567", "1"]);
    assert_eq!(fields[3], "-", "no failover number yet");

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

/// Splits the one line a command printed into its fields.
fn line(out: &str) -> Vec<&str> {
    assert_eq!(out.lines().count(), 1, "{out:?}");
    out.trim_end_matches('\n').split('\t').collect()
}

/// Account 1 with trunk groups 1 (`main`) and 2 (`backup`), DID +442071234567 on group 1;
/// account 2 with trunk group 3.
fn provision_failover(data: &Path) {
    let group = |account: &str, name: &str| {
        ok(
            data,
            &[
                "trunk-group",
                "add",
                "--account",
                account,
                "--name",
                name,
                "--username",
                &format!("{name}-{account}"),
                "--password",
                "pw",
            ],
        )
    };
    assert_eq!(ok(data, &["account", "add", "Acme"]), "1\n");
    assert_eq!(ok(data, &["account", "add", "Globex"]), "2\n");
    assert_eq!(group("1", "main"), "1\n");
    assert_eq!(group("1", "backup"), "2\n");
    assert_eq!(group("2", "main"), "3\n");
    assert_eq!(
        ok(data, &["did", "add", "442071234567", "--trunk-group", "1"]),
        "+442071234567\n"
    );
}

#[test]
fn trunk_group_failover_is_set_shown_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    provision_failover(&data);
    let show = || ok(&data, &["trunk-group", "failover", "1"]);
    let listed = |id: usize| {
        let all = ok(&data, &["trunk-group", "list"]);
        let l = all.lines().nth(id - 1).unwrap().to_owned();
        let f: Vec<String> = l.split('\t').map(str::to_owned).collect();
        assert_eq!(f.len(), 8, "{all:?}");
        assert_eq!(f[0], id.to_string());
        (f[6].clone(), f[7].clone())
    };

    assert_eq!(line(&show()), ["-", "-"]);

    // Number and URI at once; the answer is empty, the settings are normalised.
    assert_eq!(
        ok(
            &data,
            &[
                "trunk-group",
                "failover",
                "1",
                "--number",
                "15550002222",
                "--pbx",
                "sip:127.0.0.12:5060",
            ],
        ),
        ""
    );
    assert_eq!(line(&show()), ["+15550002222", "sip:127.0.0.12:5060"]);
    assert_eq!(
        listed(1),
        ("+15550002222".into(), "sip:127.0.0.12:5060".into())
    );
    assert_eq!(
        listed(2),
        ("-".into(), "-".into()),
        "other groups untouched"
    );

    // One setting at a time leaves the other alone.
    ok(
        &data,
        &[
            "trunk-group",
            "failover",
            "1",
            "--pbx",
            "SIP:Backup.Example.com;transport=tcp",
        ],
    );
    assert_eq!(
        line(&show()),
        ["+15550002222", "sip:backup.example.com;transport=tcp"]
    );
    ok(
        &data,
        &["trunk-group", "failover", "1", "--pbx-trunk-group", "2"],
    );
    assert_eq!(line(&show()), ["+15550002222", "trunk-group:2"]);
    assert_eq!(listed(1), ("+15550002222".into(), "trunk-group:2".into()));
    ok(
        &data,
        &["trunk-group", "failover", "1", "--number", "+15550003333"],
    );
    assert_eq!(line(&show()), ["+15550003333", "trunk-group:2"]);

    // The failover trunk group cannot be removed while in use.
    let err = refused(&data, &["trunk-group", "remove", "2"]);
    assert!(
        err.contains("trunk group 2 is the failover PBX of trunk group(s) 1"),
        "{err}"
    );

    ok(&data, &["trunk-group", "failover", "1", "--no-number"]);
    assert_eq!(line(&show()), ["-", "trunk-group:2"]);
    ok(&data, &["trunk-group", "failover", "1", "--no-pbx"]);
    assert_eq!(line(&show()), ["-", "-"]);
    assert_eq!(listed(1), ("-".into(), "-".into()));
    assert_eq!(ok(&data, &["trunk-group", "remove", "2"]), "");

    // Setting both and clearing both in one go.
    ok(
        &data,
        &[
            "trunk-group",
            "failover",
            "1",
            "--number",
            "+15550002222",
            "--pbx",
            "sips:[::1]:5061",
        ],
    );
    assert_eq!(line(&show()), ["+15550002222", "sips:[::1]:5061"]);
    ok(
        &data,
        &["trunk-group", "failover", "1", "--no-number", "--no-pbx"],
    );
    assert_eq!(line(&show()), ["-", "-"]);
}

#[test]
fn bad_trunk_group_failover_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    provision_failover(&data);
    ok(
        &data,
        &[
            "trunk-group",
            "failover",
            "1",
            "--number",
            "+15550002222",
            "--pbx",
            "sip:backup.example.com",
        ],
    );
    let before = ok(&data, &["trunk-group", "list"]);

    let err = refused(
        &data,
        &["trunk-group", "failover", "1", "--pbx", "http://x"],
    );
    assert!(
        err.contains("invalid failover PBX URI \"http://x\"")
            && err.contains("only sip: and sips: URIs"),
        "{err}"
    );
    let err = refused(
        &data,
        &[
            "trunk-group",
            "failover",
            "1",
            "--pbx",
            "sip:u:pw@pbx.example.com",
        ],
    );
    assert!(err.contains("password"), "{err}");
    let err = refused(
        &data,
        &["trunk-group", "failover", "1", "--pbx-trunk-group", "3"],
    );
    assert!(
        err.contains("trunk group 3 belongs to account 2, not to account 1 of trunk group 1")
            && err.contains("same account"),
        "{err}"
    );
    let err = refused(
        &data,
        &["trunk-group", "failover", "1", "--pbx-trunk-group", "1"],
    );
    assert!(err.contains("cannot be its own failover PBX"), "{err}");
    let err = refused(
        &data,
        &["trunk-group", "failover", "1", "--pbx-trunk-group", "9"],
    );
    assert!(
        err.contains("no trunk group with id 9 to use as failover PBX"),
        "{err}"
    );
    let err = refused(
        &data,
        &["trunk-group", "failover", "1", "--number", "+0123"],
    );
    assert!(err.contains("invalid phone number \"+0123\""), "{err}");
    // A bad part refuses the whole command: the good part is not applied either.
    let err = refused(
        &data,
        &[
            "trunk-group",
            "failover",
            "1",
            "--number",
            "15559998888",
            "--pbx",
            "http://x",
        ],
    );
    assert!(err.contains("invalid failover PBX URI"), "{err}");
    let err = refused(&data, &["trunk-group", "failover", "9"]);
    assert!(err.contains("no trunk group with id 9"), "{err}");
    let err = refused(&data, &["trunk-group", "failover", "9", "--no-pbx"]);
    assert!(err.contains("no trunk group with id 9"), "{err}");

    assert_eq!(
        ok(&data, &["trunk-group", "list"]),
        before,
        "nothing changed"
    );

    // Conflicting options are usage errors.
    for args in [
        &[
            "trunk-group",
            "failover",
            "1",
            "--number",
            "15550002222",
            "--no-number",
        ][..],
        &[
            "trunk-group",
            "failover",
            "1",
            "--pbx",
            "sip:a.example.com",
            "--no-pbx",
        ],
        &[
            "trunk-group",
            "failover",
            "1",
            "--pbx",
            "sip:a.example.com",
            "--pbx-trunk-group",
            "2",
        ],
        &[
            "trunk-group",
            "failover",
            "1",
            "--pbx-trunk-group",
            "2",
            "--no-pbx",
        ],
    ] {
        let out = admin(&data, args);
        assert_eq!(out.code, 2, "{args:?}: clap usage error");
        assert!(out.stderr.contains("cannot be used with"), "{}", out.stderr);
    }
    assert_eq!(
        ok(&data, &["trunk-group", "list"]),
        before,
        "nothing changed"
    );
}

#[test]
fn did_failover_is_set_shown_and_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    provision_failover(&data);
    let show = || ok(&data, &["did", "failover", "+442071234567"]);
    let listed = || {
        let all = ok(&data, &["did", "list"]);
        let f = line(&all).iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(f.len(), 4, "{all:?}");
        f[3].clone()
    };

    assert_eq!(show(), "-\n");
    assert_eq!(
        ok(
            &data,
            &["did", "failover", "442071234567", "--number", "15550001111"]
        ),
        ""
    );
    assert_eq!(show(), "+15550001111\n");
    assert_eq!(listed(), "+15550001111");

    let err = refused(
        &data,
        &["did", "failover", "442071234567", "--number", "12"],
    );
    assert!(
        err.contains("invalid phone number \"12\": E.164 numbers have 8 to 15 digits"),
        "{err}"
    );
    let err = refused(
        &data,
        &["did", "failover", "+15559999999", "--number", "15550001111"],
    );
    assert!(err.contains("no DID +15559999999"), "{err}");
    let err = refused(&data, &["did", "failover", "+15559999999"]);
    assert!(err.contains("no DID +15559999999"), "{err}");
    let err = refused(&data, &["did", "failover", "oops"]);
    assert!(err.contains("invalid phone number \"oops\""), "{err}");
    assert_eq!(show(), "+15550001111\n", "refusals changed nothing");

    let out = admin(
        &data,
        &[
            "did",
            "failover",
            "442071234567",
            "--number",
            "15550001111",
            "--no-number",
        ],
    );
    assert_eq!(out.code, 2, "clap usage error");

    ok(&data, &["did", "failover", "442071234567", "--no-number"]);
    assert_eq!(show(), "-\n");
    assert_eq!(listed(), "-");
}

/// `ID<TAB>SECRET` from `token create`.
fn created_token(out: &str) -> (String, String) {
    let f = line(out);
    assert_eq!(f.len(), 2, "{out:?}");
    let secret = f[1];
    let body = secret.strip_prefix("llt_").expect("llt_ prefix");
    assert_eq!(body.len(), 43, "{secret}");
    assert!(
        body.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "URL-safe base64: {secret}"
    );
    (f[0].to_owned(), secret.to_owned())
}

/// A UTC time as the admin prints it.
fn is_utc(field: &str) -> bool {
    field.len() == 20 && field.ends_with('Z') && field.as_bytes()[10] == b'T'
}

#[test]
fn api_tokens_are_created_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    provision_failover(&data);

    let (op, op_secret) = created_token(&ok(&data, &["token", "create", "--operator"]));
    let (acme, acme_secret) = created_token(&ok(
        &data,
        &[
            "token",
            "create",
            "--account",
            "1",
            "--label",
            "Acme portal",
        ],
    ));
    let (agent, agent_secret) = created_token(&ok(
        &data,
        &[
            "token",
            "create",
            "--trunk-group",
            "3",
            "--label",
            "globex pbx",
        ],
    ));
    assert_eq!([op.as_str(), &acme, &agent], ["1", "2", "3"]);
    assert!(op_secret != acme_secret && acme_secret != agent_secret);

    let all = ok(&data, &["token", "list"]);
    let lines: Vec<Vec<&str>> = all.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 3, "{all:?}");
    assert_eq!(lines[0][..3], ["1", "operator", "-"]);
    assert_eq!(lines[1][..3], ["2", "account:1", "Acme portal"]);
    assert_eq!(lines[2][..3], ["3", "trunk-group:3", "globex pbx"]);
    for l in &lines {
        assert_eq!(l.len(), 5, "{all:?}");
        assert!(is_utc(l[3]), "{all:?}");
        assert_eq!(l[4], "-", "live");
    }
    for secret in [&op_secret, &acme_secret, &agent_secret] {
        assert!(
            !all.contains(secret.as_str()),
            "secrets are shown once only"
        );
    }
    // Per account: Globex (2) has the trunk group token only.
    assert_eq!(
        line(&ok(&data, &["token", "list", "--account", "2"]))[0],
        "3"
    );
    assert_eq!(
        line(&ok(&data, &["token", "list", "--account", "1"]))[0],
        "2"
    );
    assert_eq!(ok(&data, &["token", "list", "--account", "9"]), "");

    // The secrets are nowhere in the store's files.
    for entry in std::fs::read_dir(&data).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for secret in [&op_secret, &acme_secret, &agent_secret] {
            let body = &secret.as_bytes()[4..];
            assert!(
                !bytes.windows(body.len()).any(|w| w == body),
                "a token secret is in the store"
            );
        }
    }

    // A trunk group or account with a live token stays.
    let err = refused(&data, &["trunk-group", "remove", "3"]);
    assert!(
        err.contains("trunk group 3 still has live API token(s) 3; revoke them first"),
        "{err}"
    );

    assert_eq!(ok(&data, &["token", "revoke", "3"]), "");
    assert_eq!(ok(&data, &["token", "revoke", "3"]), "", "idempotent");
    let globex = line(&ok(&data, &["token", "list", "--account", "2"]))
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    assert!(is_utc(&globex[4]), "revoked: {globex:?}");
    let err = refused(&data, &["token", "revoke", "9"]);
    assert!(err.contains("no API token with id 9"), "{err}");

    // Its revoked token goes with the trunk group.
    assert_eq!(ok(&data, &["trunk-group", "remove", "3"]), "");
    assert_eq!(ok(&data, &["token", "list", "--account", "2"]), "");
    assert_eq!(ok(&data, &["token", "list"]).lines().count(), 2);

    let err = refused(&data, &["token", "create", "--trunk-group", "3"]);
    assert!(err.contains("no trunk group with id 3"), "{err}");
    let err = refused(&data, &["token", "create", "--account", "9"]);
    assert!(err.contains("no account with id 9"), "{err}");
    let err = refused(
        &data,
        &["token", "create", "--operator", "--label", "line\nbreak"],
    );
    assert!(err.contains("invalid token label"), "{err}");
    assert_eq!(ok(&data, &["token", "list"]).lines().count(), 2);
}

#[test]
fn token_scope_options_are_usage_errors_when_wrong() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["token", "create"][..],
        &["token", "create", "--label", "x"],
        &["token", "create", "--operator", "--account", "1"],
        &["token", "create", "--account", "1", "--trunk-group", "1"],
        &["token", "revoke", "one"],
        &["token", "list", "--account", "one"],
    ] {
        let out = admin(dir.path(), args);
        assert_eq!(out.code, 2, "{args:?}: clap usage error");
        assert!(out.stdout.is_empty());
    }
    let out = admin(dir.path(), &["token", "create"]);
    assert!(
        out.stderr.contains("--operator") && out.stderr.contains("--trunk-group"),
        "{}",
        out.stderr
    );
}
