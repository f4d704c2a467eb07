//! The delivery decision (`src/carrier/delivery_rule.rs`): what the proxy computes for every
//! inbound call before the first INVITE leaves, with targets as the proxy has them
//! (`BranchTarget`: a Contact URI and a UDP flow).
//!
//! - `plan/*`: [`Plan::new`], the ordered stages from the call's facts;
//! - `first_branch/*`: the plan, then [`Delivery::with_plan`] and its actions up to the first
//!   branch (or the answer when there is nothing to try): the whole decision of a new call;
//! - `failover_after_timeout`: the PBX is registered but silent, the delivery timer fires and
//!   the failover number's branch starts.
//!
//! Cases: the PBX registered (two contacts; failover configured but not needed); not
//! registered, with a failover number (the DID's own over the global one); not registered,
//! with a failover PBX that is another trunk group (its two contacts); no failover at all, so
//! the next trunk servers.
//!
//! Each iteration clones the call's facts first (the proxy builds them anew for every call),
//! so the times include that copy of the targets.
//!
//! `cargo bench --bench delivery` (add `-- --quick` for a short run); criterion prints
//! decisions per second (elem/s).

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use bytestring::ByteString;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lifeline::carrier::delivery_rule::{
    Action, CallFacts, Delivery, DeliveryConfig, FailoverPbx, FailoverPlan, Plan, Stage, Target,
};
use lifeline::carrier::proxy::BranchTarget;
use lifeline::sip::transport::{Flow, Transport};
use lifeline::sip::uri::Uri;
use tokio::time::Instant;

/// A registered contact of a FreePBX behind NAT, as the registrar hands it to the proxy.
fn contact(user: &str, ip: &str, port: u16) -> BranchTarget {
    let text = format!("sip:{user}@{ip}:{port};transport=udp;line=x7k2q");
    let Ok(Uri::Sip(uri)) = Uri::parse(&ByteString::from(text)) else {
        panic!("the sample contact parses as a SIP URI");
    };
    BranchTarget {
        uri,
        dest: Flow {
            transport: Transport::Udp,
            local: "198.51.100.7:5060".parse().unwrap(),
            remote: SocketAddr::new(ip.parse().unwrap(), port),
            conn: None,
        },
    }
}

/// trunk1 of trunk1, trunk2, trunk3; trunk group 42; nothing configured yet.
fn facts(bindings: Vec<BranchTarget>) -> CallFacts<BranchTarget> {
    CallFacts {
        trunk_group: 42,
        bindings,
        failover: FailoverPlan::default(),
        failover_pbx_targets: None,
        server: "trunk1".into(),
        peers: vec!["trunk1".into(), "trunk2".into(), "trunk3".into()],
        tried_by: Vec::new(),
        already_diverted: false,
    }
}

fn cases() -> Vec<(&'static str, CallFacts<BranchTarget>, Stage)> {
    let pbx = vec![
        contact("acme-main", "203.0.113.10", 5060),
        contact("acme-main", "203.0.113.11", 5062),
    ];

    let mut registered = facts(pbx.clone());
    registered.failover.global_number = Some("+15557654321".into());
    registered.failover.pbx = Some(FailoverPbx::Uri("sip:192.0.2.12:5060".into()));
    registered.failover_pbx_targets = Some(vec![contact("backup", "192.0.2.12", 5060)]);

    let mut number = facts(Vec::new());
    number.failover.did_number = Some("+15557654300".into());
    number.failover.global_number = Some("+15557654321".into());

    let mut failover_pbx = facts(Vec::new());
    failover_pbx.failover.pbx = Some(FailoverPbx::TrunkGroup(43));
    failover_pbx.failover.global_number = Some("+15557654321".into());
    failover_pbx.failover_pbx_targets = Some(vec![
        contact("acme-backup", "203.0.113.20", 5060),
        contact("acme-backup", "203.0.113.21", 5060),
    ]);

    let next_server = facts(Vec::new());

    vec![
        ("pbx_registered", registered, Stage::Primary),
        (
            "unregistered_failover_number",
            number,
            Stage::FailoverNumber,
        ),
        (
            "unregistered_failover_pbx",
            failover_pbx,
            Stage::FailoverPbx,
        ),
        ("no_failover_next_server", next_server, Stage::NextServer),
    ]
}

/// The plan and the actions up to the first branch started (or the answer).
fn first_branch(now: Instant, call: CallFacts<BranchTarget>) -> Action<BranchTarget> {
    let mut d = Delivery::with_plan(now, Plan::new(call), DeliveryConfig::default());
    let mut last = None;
    while let Some(a) = d.poll_action() {
        let start = matches!(a, Action::StartBranch { .. });
        last = Some(a);
        if start {
            break;
        }
    }
    last.expect("a new call always has an action")
}

fn bench_delivery(c: &mut Criterion) {
    let now = Instant::now();
    let mut plan = c.benchmark_group("plan");
    plan.throughput(Throughput::Elements(1));
    for (name, call, stage) in cases() {
        // The sample is what it claims: its first stage with targets is the expected one.
        let p = Plan::new(call.clone());
        let first = p
            .stages()
            .iter()
            .find(|s| !s.targets.is_empty())
            .map(|s| s.stage);
        assert_eq!(first, Some(stage), "{name}: first stage with targets");
        plan.bench_function(name, |b| b.iter(|| Plan::new(black_box(call.clone()))));
    }
    plan.finish();

    let mut decide = c.benchmark_group("first_branch");
    decide.throughput(Throughput::Elements(1));
    for (name, call, stage) in cases() {
        match first_branch(now, call.clone()) {
            Action::StartBranch { target, .. } => {
                let got = match target {
                    Target::Binding(_) => Stage::Primary,
                    Target::FailoverPbx(_) => Stage::FailoverPbx,
                    Target::FailoverNumber(_) => Stage::FailoverNumber,
                    Target::NextServer(_) => Stage::NextServer,
                };
                assert_eq!(got, stage, "{name}: first branch");
            }
            other => panic!("{name}: expected a branch, got {other:?}"),
        }
        decide.bench_function(name, |b| {
            b.iter(|| first_branch(now, black_box(call.clone())))
        });
    }
    decide.finish();

    // The PBX is registered and silent: the delivery timer fires, the failover number starts.
    let (_, mut call, _) = cases().remove(0);
    call.failover = FailoverPlan {
        did_number: Some("+15557654300".into()),
        ..FailoverPlan::default()
    };
    call.failover_pbx_targets = None;
    call.bindings.truncate(1);
    let timer = DeliveryConfig::default().delivery_timer + Duration::from_millis(1);
    let walk = |call: CallFacts<BranchTarget>| {
        let mut d = Delivery::new(now, call, DeliveryConfig::default());
        while d.poll_action().is_some() {}
        d.handle_timeout(now + timer);
        let mut started = None;
        while let Some(a) = d.poll_action() {
            if let Action::StartBranch { target, .. } = a {
                started = Some(target);
            }
        }
        started
    };
    assert!(matches!(
        walk(call.clone()),
        Some(Target::FailoverNumber(n)) if n == "+15557654300"
    ));
    let mut g = c.benchmark_group("failover_after_timeout");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pbx_silent_then_number", |b| {
        b.iter(|| walk(black_box(call.clone())))
    });
    g.finish();
}

criterion_group!(benches, bench_delivery);
criterion_main!(benches);
