//! `lifeline-carrier calls` end to end: records written through the library, listed by the
//! real binary.

mod common;

use common::{Output, run_carrier};
use std::path::Path;
use std::time::Duration;

use lifeline::carrier::call_log::{CALLS_FILE, CallLog};
use lifeline::carrier::call_record::{AttemptRecord, CallRecord};

/// Long enough that opening the log never prunes the fixed timestamps below.
const KEEP: Duration = Duration::from_secs(100 * 365 * 86_400);

/// 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000;

fn calls(data_dir: &Path, args: &[&str]) -> Output {
    let args: Vec<&str> = std::iter::once("calls")
        .chain(args.iter().copied())
        .collect();
    run_carrier(data_dir, &args)
}

fn ok(data_dir: &Path, args: &[&str]) -> String {
    let out = calls(data_dir, args);
    assert_eq!(out.code, 0, "{args:?} failed: {}", out.stderr);
    out.stdout
}

fn attempt(
    stage: &str,
    target: &str,
    offset_ms: u64,
    duration_ms: Option<u64>,
    outcome: &str,
) -> AttemptRecord {
    AttemptRecord {
        stage: stage.to_owned(),
        target: target.to_owned(),
        offset_ms,
        duration_ms,
        outcome: outcome.to_owned(),
    }
}

fn call(call_id: &str, did: &str, started_at_ms: i64) -> CallRecord {
    CallRecord {
        call_id: call_id.to_owned(),
        did: did.to_owned(),
        trunk_group: 3,
        server: "ts1".to_owned(),
        source: "198.51.100.7:5060".to_owned(),
        from_peer: None,
        started_at_ms,
        duration_ms: 850,
        status: 200,
        outcome: "delivered".to_owned(),
        answered_by: Some("sip:pbx@192.0.2.1:5060".to_owned()),
        attempts: vec![attempt(
            "primary",
            "sip:pbx@192.0.2.1:5060",
            0,
            Some(850),
            "answered 200",
        )],
    }
}

/// The first line of each block: the calls listed, in order.
fn call_ids(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| !l.starts_with("  "))
        .map(|l| l.split('\t').nth(1).expect("a CALL_ID field"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_lists_what_the_server_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let log = CallLog::open(&data, KEEP).await.unwrap();

    let delivered = call("first@pstn", "+4930111111", T0);
    let mut failover = call("second@pstn", "+4930111111", T0 + 61_250);
    failover.status = 200;
    failover.outcome = "reached".to_owned();
    failover.answered_by = Some("+4917012345678".to_owned());
    failover.duration_ms = 41_004;
    failover.attempts = vec![
        attempt(
            "primary",
            "sip:pbx@192.0.2.1:5060",
            0,
            Some(32_000),
            "transport error",
        ),
        attempt(
            "failover PBX",
            "sip:backup@192.0.2.2",
            32_000,
            Some(4),
            "not delivered: 503",
        ),
        attempt(
            "failover number",
            "+4917012345678",
            32_004,
            Some(9_000),
            "answered 200",
        ),
    ];
    let mut failed = call("third@pstn", "+4930222222", T0 + 120_000);
    failed.status = 480;
    failed.outcome = "failed".to_owned();
    failed.answered_by = None;
    failed.duration_ms = 5;
    failed.attempts = vec![attempt(
        "primary",
        "sip:pbx@192.0.2.9:5060",
        1,
        None,
        "undecided",
    )];
    for c in [&delivered, &failover, &failed] {
        log.record(c.clone());
    }
    log.flush().await.unwrap();

    // Listed while the log is open in this process, as while a server runs.
    let all = ok(&data, &[]);
    assert_eq!(
        all,
        concat!(
            "2023-11-14T22:15:20.000Z\tthird@pstn\t+4930222222\t480\tfailed\t-\t5ms\n",
            "  +1ms\tprimary\tsip:pbx@192.0.2.9:5060\tundecided\t-\n",
            "2023-11-14T22:14:21.250Z\tsecond@pstn\t+4930111111\t200\treached\t",
            "+4917012345678\t41004ms\n",
            "  +0ms\tprimary\tsip:pbx@192.0.2.1:5060\ttransport error\t32000ms\n",
            "  +32000ms\tfailover PBX\tsip:backup@192.0.2.2\tnot delivered: 503\t4ms\n",
            "  +32004ms\tfailover number\t+4917012345678\tanswered 200\t9000ms\n",
            "2023-11-14T22:13:20.000Z\tfirst@pstn\t+4930111111\t200\tdelivered\t",
            "sip:pbx@192.0.2.1:5060\t850ms\n",
            "  +0ms\tprimary\tsip:pbx@192.0.2.1:5060\tanswered 200\t850ms\n",
        )
    );

    // --did, with or without the `+`.
    let of_did = ok(&data, &["--did", "+4930111111"]);
    assert_eq!(call_ids(&of_did), ["second@pstn", "first@pstn"]);
    assert_eq!(ok(&data, &["--did", "4930111111"]), of_did);
    assert!(
        all.ends_with(&of_did),
        "the same blocks, in the same format"
    );
    assert_eq!(
        call_ids(&ok(&data, &["--did", "4930222222"])),
        ["third@pstn"]
    );
    assert_eq!(ok(&data, &["--did", "+4930999999"]), "");

    // --limit, alone and with --did.
    assert_eq!(call_ids(&ok(&data, &["--limit", "1"])), ["third@pstn"]);
    assert_eq!(
        call_ids(&ok(&data, &["--did", "4930111111", "--limit", "1"])),
        ["second@pstn"]
    );
    assert_eq!(ok(&data, &["--limit", "0"]), "");

    // The default limit is 20.
    for i in 0..25 {
        log.record(call(
            &format!("bulk-{i}@pstn"),
            "+4930333333",
            T0 + 200_000 + i,
        ));
    }
    log.close().await.unwrap();
    let newest = ok(&data, &[]);
    let ids = call_ids(&newest);
    assert_eq!(ids.len(), 20);
    assert_eq!(ids[0], "bulk-24@pstn");
    assert_eq!(ids[19], "bulk-5@pstn");
    assert_eq!(call_ids(&ok(&data, &["--limit", "100"])).len(), 28);
}

#[test]
fn a_corrupt_call_log_is_reported_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(CALLS_FILE);
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(&file, garbage).unwrap();
    for args in [&[][..], &["--did", "4930111111"][..]] {
        let out = calls(dir.path(), args);
        assert_eq!(out.code, 1, "{args:?}: stdout {:?}", out.stdout);
        assert!(out.stdout.is_empty(), "{:?}", out.stdout);
        assert!(
            out.stderr.contains(&file.display().to_string()),
            "{:?}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{:?}", out.stderr);
    }
}

#[test]
fn a_missing_call_log_is_reported_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never-ran");
    let out = calls(&data, &[]);
    assert_eq!(out.code, 1, "stdout {:?}", out.stdout);
    assert!(
        out.stderr
            .contains(&data.join(CALLS_FILE).display().to_string()),
        "{:?}",
        out.stderr
    );
    assert!(!data.exists(), "listing creates nothing");
}
