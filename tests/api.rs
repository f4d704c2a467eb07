//! The provisioning API against a running `lifeline-carrier` on loopback (plain HTTP), driven by
//! a hand-written HTTP client: every endpoint, the validation errors, the scopes, and that
//! another account's objects are a 404 whatever the verb. Every test runs twice, each on
//! addresses of its own: on the embedded store and on PostgreSQL (a cluster of its own).

mod common;

use std::net::SocketAddr;

use common::http::{Reply, request};
use common::postgres::Postgres;
use common::{Carrier, admin, start_carrier};
use serde_json::json;

/// A test's addresses (`PREFIX.host`) and store: embedded, or its own PostgreSQL cluster.
struct Net {
    prefix: &'static str,
    postgres: Option<Postgres>,
}

impl Net {
    fn embedded(prefix: &'static str) -> Net {
        Net {
            prefix,
            postgres: None,
        }
    }

    /// PostgreSQL listens on `PREFIX.30`.
    fn postgres(prefix: &'static str) -> Net {
        let addr = format!("{prefix}.30").parse().unwrap();
        Net {
            prefix,
            postgres: Some(Postgres::start(addr)),
        }
    }

    fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }

    /// The `store_url` line for a carrier's `[carrier]` table (none: embedded).
    fn store_line(&self) -> String {
        match &self.postgres {
            Some(pg) => format!("store_url = \"{}\"\n", pg.url()),
            None => String::new(),
        }
    }
}

/// Runs the test function `$name(Net)` on both stores.
macro_rules! on_both_stores {
    ($name:ident, $embedded:literal, $postgres:literal) => {
        mod $name {
            #[test]
            fn embedded() {
                super::$name(super::Net::embedded($embedded));
            }
            #[test]
            fn postgres() {
                super::$name(super::Net::postgres($postgres));
            }
        }
    };
}

on_both_stores!(tokens_and_accounts, "127.0.110", "127.0.111");
on_both_stores!(
    trunk_groups_dids_failover_and_audit,
    "127.0.112",
    "127.0.113"
);
on_both_stores!(
    openapi_document_matches_the_server,
    "127.0.114",
    "127.0.115"
);
on_both_stores!(
    status_presence_health_and_the_single_registration_warning,
    "127.0.116",
    "127.0.117"
);

/// A carrier at `net.ip(host)` whose API accepts failover numbers under +1555 and +44.
fn carrier(net: &Net, host: u8) -> Carrier {
    let ip = net.ip(host);
    start_carrier(
        &format!(
            "[carrier]\nsip_listen = [\"udp:{ip}:0\"]\napi_listen = \"{ip}:0\"\n\
             failover_number_prefixes = [\"+1555\", \"+44\"]\n{}",
            net.store_line()
        ),
        1,
    )
}

/// An operator token made with the admin command.
fn operator_token(c: &Carrier) -> String {
    let out = admin(
        c.dir.path(),
        &["token", "create", "--operator", "--label", "ops"],
    );
    out.trim()
        .split('\t')
        .nth(1)
        .expect("ID<TAB>SECRET")
        .to_string()
}

struct Api {
    addr: SocketAddr,
}

impl Api {
    fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> Reply {
        let body = body.map(|b| b.to_string());
        request(self.addr, method, path, Some(token), body.as_deref())
    }
    fn get(&self, path: &str, token: &str) -> Reply {
        self.call("GET", path, token, None)
    }
    fn post(&self, path: &str, token: &str, body: serde_json::Value) -> Reply {
        self.call("POST", path, token, Some(body))
    }
}

fn expect(r: &Reply, status: u16) {
    assert_eq!(r.status, status, "{} {}", r.status, r.text);
}

/// Creates an account and a token for it; returns (account id, token).
fn account(api: &Api, op: &str, name: &str) -> (i64, String) {
    let r = api.post("/v1/accounts", op, json!({"name": name}));
    expect(&r, 201);
    let id = r.json["id"].as_i64().unwrap();
    let r = api.post(
        "/v1/tokens",
        op,
        json!({"scope": {"account": id}, "label": name}),
    );
    expect(&r, 201);
    (id, r.json["token"].as_str().unwrap().to_string())
}

fn tokens_and_accounts(net: Net) {
    let c = carrier(&net, 1);
    let api = Api { addr: c.api_addr() };
    let op = operator_token(&c);
    // No token, a wrong one: 401 with a JSON error and WWW-Authenticate.
    let r = request(api.addr, "GET", "/v1/accounts", None, None);
    expect(&r, 401);
    assert_eq!(r.code(), "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    expect(&api.get("/v1/accounts", "llt_wrong"), 401);

    let (a, ta) = account(&api, &op, "acme");
    let (b, _tb) = account(&api, &op, "globex");
    // The operator sees both; an account only itself.
    assert_eq!(
        api.get("/v1/accounts", &op).json.as_array().unwrap().len(),
        2
    );
    let mine = api.get("/v1/accounts", &ta).json;
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine[0]["id"], a);
    expect(&api.get(&format!("/v1/accounts/{a}"), &ta), 200);
    expect(&api.get(&format!("/v1/accounts/{b}"), &ta), 404);
    expect(
        &api.call("DELETE", &format!("/v1/accounts/{b}"), &ta, None),
        404,
    );
    // Only the operator creates accounts; a duplicate name is a conflict naming the field.
    let r = api.post("/v1/accounts", &ta, json!({"name": "evil"}));
    expect(&r, 403);
    let r = api.post("/v1/accounts", &op, json!({"name": "acme"}));
    expect(&r, 409);
    assert_eq!(r.field(), "name");
    // Unknown fields are refused by name; malformed JSON is a JSON error too.
    let r = api.post("/v1/accounts", &op, json!({"name": "x", "colour": "red"}));
    expect(&r, 422);
    assert_eq!((r.code(), r.field()), ("invalid_body", "colour"));
    let r = request(
        api.addr,
        "POST",
        "/v1/accounts",
        Some(&op),
        Some("{\"name\":"),
    );
    assert_eq!(r.code(), "invalid_body", "{}", r.text);
    // Bodies are size-limited.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(100_000));
    let r = request(api.addr, "POST", "/v1/accounts", Some(&op), Some(&big));
    expect(&r, 413);
    // Tokens: an account token cannot make tokens for another account; listing shows no
    // secrets; a revoked token stops working.
    let r = api.post("/v1/tokens", &ta, json!({"scope": {"account": b}}));
    expect(&r, 422);
    assert_eq!(r.field(), "scope");
    let r = api.post(
        "/v1/tokens",
        &ta,
        json!({"scope": {"account": a}, "label": "second"}),
    );
    expect(&r, 201);
    let (second_id, second) = (
        r.json["id"].as_i64().unwrap(),
        r.json["token"].as_str().unwrap().to_string(),
    );
    expect(&api.get("/v1/accounts", &second), 200);
    let list = api.get("/v1/tokens", &ta);
    expect(&list, 200);
    assert!(
        list.json
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("token").is_none()),
        "{}",
        list.text
    );
    expect(
        &api.call("DELETE", &format!("/v1/tokens/{second_id}"), &ta, None),
        204,
    );
    expect(&api.get("/v1/accounts", &second), 401);
    // Operator tokens come only from the command line.
    expect(
        &api.post("/v1/tokens", &op, json!({"scope": "operator"})),
        403,
    );
    // The operator removes an account once its live tokens are revoked.
    let r = api.call("DELETE", &format!("/v1/accounts/{b}"), &op, None);
    assert_eq!((r.status, r.code()), (409, "in_use"), "{}", r.text);
    let tokens = api.get("/v1/tokens", &op).json;
    for t in tokens.as_array().unwrap() {
        if t["scope"] == json!({"account": b}) {
            expect(
                &api.call("DELETE", &format!("/v1/tokens/{}", t["id"]), &op, None),
                204,
            );
        }
    }
    expect(
        &api.call("DELETE", &format!("/v1/accounts/{b}"), &op, None),
        204,
    );
    expect(&api.get(&format!("/v1/accounts/{b}"), &op), 404);
    // Unknown paths are JSON 404s too.
    assert_eq!(api.get("/v1/nothing", &op).code(), "not_found");
    // An id that is not a number, an unknown or malformed query parameter: JSON errors
    // naming the field.
    for (path, code, field) in [
        ("/v1/accounts/abc", "invalid_path", "id"),
        ("/v1/trunk-groups/1x/failover", "invalid_path", "id"),
        (
            "/v1/trunk-groups?account_id=x",
            "invalid_query",
            "account_id",
        ),
        ("/v1/trunk-groups?colour=red", "invalid_query", "colour"),
        ("/v1/dids?trunk_group=-", "invalid_query", "trunk_group"),
        (
            &format!("/v1/accounts/{a}/audit?limit=1&limit=2x"),
            "invalid_query",
            "limit",
        ),
    ] {
        let r = api.get(path, &op);
        assert_eq!(
            (r.status, r.code(), r.field()),
            (422, code, field),
            "{path}: {}",
            r.text
        );
    }
}

fn trunk_groups_dids_failover_and_audit(net: Net) {
    let c = carrier(&net, 1);
    let api = Api { addr: c.api_addr() };
    let op = operator_token(&c);
    let (a, ta) = account(&api, &op, "acme");
    let (_b, tb) = account(&api, &op, "globex");

    // Trunk groups: created in the token's own account; the password is never shown.
    let r = api.post(
        "/v1/trunk-groups",
        &ta,
        json!({"name": "main", "username": "acme-main", "password": "s3cret"}),
    );
    expect(&r, 201);
    assert!(
        !r.text.contains("s3cret") && r.json.get("password").is_none(),
        "{}",
        r.text
    );
    assert_eq!(r.json["account_id"], a);
    let g = r.json["id"].as_i64().unwrap();
    let r = api.post(
        "/v1/trunk-groups",
        &ta,
        json!({"name": "backup", "username": "acme-backup", "password": "pw2"}),
    );
    expect(&r, 201);
    let g2 = r.json["id"].as_i64().unwrap();
    let r = api.post(
        "/v1/trunk-groups",
        &tb,
        json!({"name": "main", "username": "globex-main", "password": "pw"}),
    );
    expect(&r, 201);
    let other = r.json["id"].as_i64().unwrap();
    // Validation: duplicate and malformed usernames, the operator must name the account.
    let r = api.post(
        "/v1/trunk-groups",
        &ta,
        json!({"name": "x", "username": "acme-main", "password": "p"}),
    );
    expect(&r, 409);
    assert_eq!(r.field(), "username");
    let r = api.post(
        "/v1/trunk-groups",
        &ta,
        json!({"name": "x", "username": "a b", "password": "p"}),
    );
    expect(&r, 422);
    assert_eq!(r.field(), "username");
    let r = api.post(
        "/v1/trunk-groups",
        &op,
        json!({"name": "x", "username": "xx", "password": "p"}),
    );
    assert_eq!((r.status, r.field()), (422, "account_id"));
    // Another account's trunk group: 404 for every verb.
    let path = format!("/v1/trunk-groups/{other}");
    expect(&api.get(&path, &ta), 404);
    expect(
        &api.call("PATCH", &path, &ta, Some(json!({"password": "x"}))),
        404,
    );
    expect(&api.call("DELETE", &path, &ta, None), 404);
    expect(&api.get(&format!("{path}/failover"), &ta), 404);
    expect(
        &api.call("PUT", &format!("{path}/failover"), &ta, Some(json!({}))),
        404,
    );
    expect(&api.get(&format!("{path}/status"), &ta), 404);
    expect(&api.get(&format!("{path}/calls"), &ta), 404);
    expect(
        &api.post(
            &format!("{path}/health"),
            &ta,
            json!({"pbx": "up", "version": "1"}),
        ),
        404,
    );
    assert_eq!(
        api.get("/v1/trunk-groups", &ta)
            .json
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Failover numbers: E.164, within the allowed prefixes; a PBX of another account is no
    // trunk group at all.
    let path = format!("/v1/trunk-groups/{g}");
    let r = api.call(
        "PATCH",
        &path,
        &ta,
        Some(json!({"failover_number": "+19005550000"})),
    );
    assert_eq!(
        (r.status, r.code(), r.field()),
        (422, "number_not_allowed", "failover_number")
    );
    let r = api.call(
        "PATCH",
        &path,
        &ta,
        Some(json!({"failover_number": "12ab"})),
    );
    assert_eq!((r.status, r.field()), (422, "failover_number"));
    let r = api.call(
        "PATCH",
        &path,
        &ta,
        Some(json!({"failover_pbx": {"trunk_group": other}})),
    );
    assert_eq!((r.status, r.field()), (422, "failover_pbx"));
    let r = api.call(
        "PATCH",
        &path,
        &ta,
        Some(json!({"failover_pbx": {"trunk_group": g}})),
    );
    assert_eq!((r.status, r.field()), (422, "failover_pbx"), "{}", r.text);
    let r = api.call(
        "PATCH",
        &path,
        &ta,
        Some(json!({"failover_pbx": {"uri": "http://x"}})),
    );
    assert_eq!((r.status, r.field()), (422, "failover_pbx"), "{}", r.text);
    let r = api.call(
        "PATCH",
        &path,
        &ta,
        Some(json!({"failover_number": "+15550009999", "failover_pbx": {"uri": "sip:192.0.2.12:5060"}})),
    );
    expect(&r, 200);
    assert_eq!(r.json["failover_number"], "+15550009999");
    assert_eq!(
        r.json["failover_pbx"],
        json!({"uri": "sip:192.0.2.12:5060"})
    );
    // null clears, absent keeps.
    let r = api.call("PATCH", &path, &ta, Some(json!({"failover_pbx": null})));
    expect(&r, 200);
    assert_eq!(r.json["failover_pbx"], serde_json::Value::Null);
    assert_eq!(r.json["failover_number"], "+15550009999");

    // DIDs.
    let r = api.post(
        "/v1/dids",
        &ta,
        json!({"number": "15551230001", "trunk_group": g}),
    );
    expect(&r, 201);
    assert_eq!(r.json["number"], "+15551230001");
    expect(
        &api.post(
            "/v1/dids",
            &ta,
            json!({"number": "+15551230002", "trunk_group": g}),
        ),
        201,
    );
    let r = api.post(
        "/v1/dids",
        &ta,
        json!({"number": "555-1234", "trunk_group": g}),
    );
    assert_eq!((r.status, r.field()), (422, "number"));
    let r = api.post(
        "/v1/dids",
        &ta,
        json!({"number": "+15551230003", "trunk_group": other}),
    );
    assert_eq!((r.status, r.field()), (422, "trunk_group"));
    let r = api.post(
        "/v1/dids",
        &ta,
        json!({"number": "+15551230001", "trunk_group": g}),
    );
    expect(&r, 409);
    let r = api.post(
        "/v1/dids",
        &tb,
        json!({"number": "+15551239999", "trunk_group": other}),
    );
    expect(&r, 201);
    expect(&api.get("/v1/dids/+15551239999", &ta), 404);
    expect(&api.call("DELETE", "/v1/dids/+15551239999", &ta, None), 404);
    assert_eq!(api.get("/v1/dids", &ta).json.as_array().unwrap().len(), 2);
    let r = api.call(
        "PATCH",
        "/v1/dids/15551230001",
        &ta,
        Some(json!({"failover_number": "+15551230001"})),
    );
    assert_eq!((r.status, r.code()), (422, "number_is_did"));
    let r = api.call(
        "PATCH",
        "/v1/dids/15551230001",
        &ta,
        Some(json!({"failover_number": "+447700900123"})),
    );
    expect(&r, 200);
    assert_eq!(r.json["failover_number"], "+447700900123");
    expect(&api.get("/v1/dids/+15551230001", &ta), 200);

    // The whole failover plan in one write: DIDs left out lose their own number.
    let fpath = format!("/v1/trunk-groups/{g}/failover");
    let plan = json!({
        "global_number": "+15550000001",
        "pbx": {"trunk_group": g2},
        "dids": {"+15551230002": "+15550000002"}
    });
    let r = api.call("PUT", &fpath, &ta, Some(plan.clone()));
    expect(&r, 200);
    assert_eq!(r.json, plan);
    assert_eq!(api.get(&fpath, &ta).json, plan);
    // g2 is now g's failover PBX: it cannot be removed.
    let r = api.call("DELETE", &format!("/v1/trunk-groups/{g2}"), &ta, None);
    assert_eq!((r.status, r.code()), (409, "in_use"), "{}", r.text);
    assert_eq!(
        api.get("/v1/dids/+15551230001", &ta).json["failover_number"],
        serde_json::Value::Null
    );
    // A refused plan changes nothing: a DID of another group, a number outside the prefixes.
    for (bad, field) in [
        (json!({"dids": {"+15551239999": "+15550000003"}}), "dids"),
        (json!({"global_number": "+19005550000"}), "global_number"),
        (
            json!({"dids": {"+15551230002": "+15551230002"}}),
            "dids.+15551230002",
        ),
        (json!({"pbx": {"trunk_group": other}}), "failover_pbx"),
    ] {
        let r = api.call("PUT", &fpath, &ta, Some(bad.clone()));
        assert_eq!((r.status, r.field()), (422, field), "{bad}: {}", r.text);
        assert_eq!(api.get(&fpath, &ta).json, plan, "after {bad}");
    }

    // A trunk group's token (an agent's): its own group and failover plan only.
    let r = api.post(
        "/v1/tokens",
        &ta,
        json!({"scope": {"trunk_group": g}, "label": "agent"}),
    );
    expect(&r, 201);
    let agent = r.json["token"].as_str().unwrap().to_string();
    expect(&api.get(&format!("/v1/trunk-groups/{g}"), &agent), 200);
    expect(&api.get(&format!("/v1/trunk-groups/{g2}"), &agent), 404);
    assert_eq!(
        api.get("/v1/trunk-groups", &agent)
            .json
            .as_array()
            .unwrap()
            .len(),
        1
    );
    expect(
        &api.call(
            "PATCH",
            &format!("/v1/trunk-groups/{g}"),
            &agent,
            Some(json!({"password": "x"})),
        ),
        403,
    );
    expect(
        &api.post(
            "/v1/dids",
            &agent,
            json!({"number": "+15551230009", "trunk_group": g}),
        ),
        403,
    );
    let r = api.call(
        "PUT",
        &fpath,
        &agent,
        Some(json!({"global_number": "+15550000004"})),
    );
    expect(&r, 200);
    expect(&api.get(&format!("/v1/accounts/{a}/audit"), &agent), 404);

    // The audit trail: newest first, with the token and the object before and after.
    let r = api.get(&format!("/v1/accounts/{a}/audit"), &ta);
    expect(&r, 200);
    let entries = r.json.as_array().unwrap();
    assert_eq!(entries[0]["action"], "failover.put");
    assert_eq!(entries[0]["before"]["global_number"], "+15550000001");
    assert_eq!(entries[0]["after"]["global_number"], "+15550000004");
    assert!(entries[0]["token"].as_i64().is_some());
    assert!(entries.iter().any(|e| e["action"] == "trunk_group.create"));
    assert!(!r.text.contains("s3cret"), "{}", r.text);
    expect(&api.get(&format!("/v1/accounts/{a}/audit"), &tb), 404);
    // The agent may name another trunk group of its account as the failover PBX (it cannot
    // see that group otherwise), never another account's.
    let r = api.call(
        "PUT",
        &fpath,
        &agent,
        Some(json!({"global_number": "+15550000004", "pbx": {"trunk_group": g2}})),
    );
    expect(&r, 200);
    let r = api.call(
        "PUT",
        &fpath,
        &agent,
        Some(json!({"pbx": {"trunk_group": other}})),
    );
    assert_eq!((r.status, r.field()), (422, "failover_pbx"), "{}", r.text);
    let r = api.call(
        "PUT",
        &fpath,
        &agent,
        Some(json!({"global_number": "+15550000004"})),
    );
    expect(&r, 200);

    // Removal: a DID, then (once nothing refers to it) a trunk group.
    expect(&api.call("DELETE", "/v1/dids/+15551230001", &ta, None), 204);
    expect(&api.get("/v1/dids/+15551230001", &ta), 404);
    // The agent's plan had no PBX: g2 is free to go.
    expect(
        &api.call("DELETE", &format!("/v1/trunk-groups/{g2}"), &ta, None),
        204,
    );
}

/// The object keys of a JSON value.
fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

fn openapi_document_matches_the_server(net: Net) {
    let c = carrier(&net, 1);
    let api = Api { addr: c.api_addr() };
    let op = operator_token(&c);
    // Public, JSON.
    let r = request(api.addr, "GET", "/v1/openapi.json", None, None);
    expect(&r, 200);
    let doc = r.json;
    assert_eq!(doc["openapi"], "3.1.0");
    let schema_keys = |name: &str| keys(&doc["components"]["schemas"][name]["properties"]);

    // Real objects carry exactly the documented properties.
    let (a, ta) = account(&api, &op, "acme");
    let acct = api.get(&format!("/v1/accounts/{a}"), &ta).json;
    assert_eq!(keys(&acct), schema_keys("Account"));
    let r = api.post(
        "/v1/trunk-groups",
        &ta,
        json!({"name": "main", "username": "acme-main", "password": "pw", "failover_number": "+15550000001"}),
    );
    expect(&r, 201);
    assert_eq!(keys(&r.json), schema_keys("TrunkGroup"));
    let g = r.json["id"].as_i64().unwrap();
    let r = api.post(
        "/v1/dids",
        &ta,
        json!({"number": "+15551230001", "trunk_group": g, "failover_number": "+15550000002"}),
    );
    expect(&r, 201);
    assert_eq!(keys(&r.json), schema_keys("Did"));
    let r = api.post(
        "/v1/tokens",
        &ta,
        json!({"scope": {"trunk_group": g}, "label": "agent"}),
    );
    assert_eq!(keys(&r.json), schema_keys("NewTokenAnswer"));
    let tokens = api.get("/v1/tokens", &ta).json;
    assert_eq!(keys(&tokens[0]), schema_keys("Token"));
    let plan = json!({"global_number": "+15550000003", "pbx": {"uri": "sip:192.0.2.1"}, "dids": {"+15551230001": "+15550000004"}});
    let r = api.call(
        "PUT",
        &format!("/v1/trunk-groups/{g}/failover"),
        &ta,
        Some(plan),
    );
    expect(&r, 200);
    assert_eq!(keys(&r.json), schema_keys("FailoverPlan"));
    let audit = api.get(&format!("/v1/accounts/{a}/audit"), &ta).json;
    assert_eq!(keys(&audit[0]), schema_keys("AuditEntry"));
    // This server: no token needed, and it names the store it runs on.
    let r = request(api.addr, "GET", "/v1/server", None, None);
    expect(&r, 200);
    assert_eq!(keys(&r.json), schema_keys("Server"));
    let backend = if net.postgres.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(r.json["store"]["backend"], backend, "{}", r.text);
    assert_eq!(r.json["store"]["reachable"], true);
    // No call yet: an empty list of calls.
    let r = api.get(&format!("/v1/trunk-groups/{g}/calls"), &ta);
    expect(&r, 200);
    assert_eq!(r.json, json!([]));
    // Request bodies with every documented property are accepted (NewTrunkGroup above lacked
    // failover_pbx: one more with it).
    let all: Vec<String> = schema_keys("NewTrunkGroup");
    let body = json!({"account_id": a, "name": "b", "username": "acme-b", "password": "pw",
                      "failover_number": "+15550000005", "failover_pbx": {"trunk_group": g}});
    assert_eq!(keys(&body), all);
    expect(&api.post("/v1/trunk-groups", &op, body), 201);

    // Every documented operation exists; every other method on those paths is a 405.
    let paths = doc["paths"].as_object().unwrap();
    for (path, item) in paths {
        let concrete = path
            .replace("{id}", "999999")
            .replace("{number}", "+15559999999");
        for method in ["get", "post", "put", "patch", "delete"] {
            let body = matches!(method, "post" | "put" | "patch").then(|| json!({}));
            let r = api.call(&method.to_uppercase(), &concrete, &op, body);
            if item.get(method).is_some() {
                assert_ne!(r.status, 405, "{method} {path} is documented: {}", r.text);
                assert_ne!(
                    r.json["error"]["message"], "no such resource",
                    "{method} {path} is documented but not routed"
                );
            } else {
                assert_eq!(
                    r.status, 405,
                    "{method} {path} is not documented: {}",
                    r.text
                );
                assert_eq!(r.code(), "method_not_allowed");
            }
        }
    }
}

/// Status: where a trunk group is registered now (the presence this server writes when its
/// registrations change), its last health report, and the warning when failover is configured
/// but the PBX is not registered on every trunk server.
fn status_presence_health_and_the_single_registration_warning(net: Net) {
    use common::sipp::{PASSWORD, Scenario, ok, register_xml, spawn_sipp};
    let (ip, peer, pbx) = (net.ip(4), net.ip(5), net.ip(6));
    let c = start_carrier(
        &format!(
            "[carrier]\nname = \"trunk1\"\nsip_listen = [\"udp:{ip}:0\"]\napi_listen = \"{ip}:0\"\n\
             bindings_flush_ms = 50\nconfig_poll_ms = 50\nfailover_number_prefixes = [\"+1555\"]\n{}\
             [[carrier.peers]]\nname = \"trunk1\"\nuri = \"sip:{ip}:5060\"\n\
             [[carrier.peers]]\nname = \"trunk2\"\nuri = \"sip:{peer}:5060\"\n",
            net.store_line()
        ),
        1,
    );
    let api = Api { addr: c.api_addr() };
    let op = operator_token(&c);
    let (_a, ta) = account(&api, &op, "acme");
    let r = api.post(
        "/v1/trunk-groups",
        &ta,
        json!({"name": "main", "username": "acme-main", "password": PASSWORD}),
    );
    expect(&r, 201);
    let g = r.json["id"].as_i64().unwrap();
    let status = |api: &Api| api.get(&format!("/v1/trunk-groups/{g}/status"), &ta).json;
    let s = status(&api);
    assert_eq!(s["registered_on"], json!([]));
    assert_eq!(s["trunk_servers"], json!(["trunk1", "trunk2"]));
    assert!(
        s["warnings"][0]
            .as_str()
            .unwrap()
            .contains("no trunk server"),
        "{s}"
    );

    // The PBX registers here (SIPp with digest), once the SIP side has the new trunk group
    // (it polls the store every config_poll_ms).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let run = spawn_sipp(
        &pbx,
        0,
        Some(c.addr("udp").to_string()),
        Scenario::Xml(register_xml(
            "acme-main",
            &format!("<sip:acme-main@{pbx}:5071>"),
        )),
        &["-au", "acme-main", "-ap", PASSWORD],
    )
    .wait();
    ok(run, "REGISTER", &c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let s = loop {
        let s = status(&api);
        if s["registered_on"] == json!(["trunk1"]) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never registered: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(s["servers"][0]["contacts"], 1);
    // No failover: registered on one server only is fine.
    assert_eq!(s["warnings"], json!([]), "{s}");
    // With failover configured, the single registration is a warning naming trunk2.
    let r = api.call(
        "PATCH",
        &format!("/v1/trunk-groups/{g}"),
        &ta,
        Some(json!({"failover_number": "+15550000001"})),
    );
    expect(&r, 200);
    let s = status(&api);
    assert_eq!(s["failover_configured"], true);
    let w = s["warnings"][0].as_str().unwrap_or("");
    assert!(w.contains("1 of 2") && w.contains("trunk2"), "{s}");

    // A health report from the group's own token (an agent's) is kept and shown.
    let r = api.post("/v1/tokens", &ta, json!({"scope": {"trunk_group": g}}));
    let agent = r.json["token"].as_str().unwrap().to_string();
    let report = json!({"pbx": "up", "version": "0.1.0",
                        "servers": {"trunk1": {"registered": true, "expires_in": 290}, "trunk2": {"registered": false, "last_error": "timeout"}}});
    expect(
        &api.post(
            &format!("/v1/trunk-groups/{g}/health"),
            &agent,
            report.clone(),
        ),
        204,
    );
    let r = api.post(
        &format!("/v1/trunk-groups/{g}/health"),
        &agent,
        json!({"pbx": "sideways", "version": "1"}),
    );
    assert_eq!((r.status, r.code()), (422, "invalid_body"));
    let s = api
        .get(&format!("/v1/trunk-groups/{g}/status"), &agent)
        .json;
    assert_eq!(s["last_health"]["report"]["pbx"], "up");
    assert_eq!(
        s["last_health"]["report"]["servers"]["trunk2"]["last_error"],
        "timeout"
    );
    assert!(s["last_health"]["received_at_ms"].as_i64().unwrap() > 0);
}
