//! The OpenAPI 3.1 document of `/v1`, served at `GET /v1/openapi.json`. Written out by hand
//! next to the handlers; `tests/api.rs` checks that every documented operation exists, that
//! the answers carry exactly the documented properties, and that request bodies with the
//! documented properties are accepted.

use serde_json::{Value, json};

/// The document.
pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let errors = |codes: &[&str]| -> Value {
        let mut m = serde_json::Map::new();
        for c in codes {
            m.insert(
                (*c).to_string(),
                json!({"description": describe(c), "content": {"application/json": {"schema": error}}}),
            );
        }
        Value::Object(m)
    };
    let ok = |status: &str, schema: Value, extra: &[&str]| -> Value {
        let mut r = errors(extra);
        r.as_object_mut().unwrap().insert(
            status.to_string(),
            json!({"description": "success", "content": {"application/json": {"schema": schema}}}),
        );
        r
    };
    let empty = |extra: &[&str]| -> Value {
        let mut r = errors(extra);
        r.as_object_mut()
            .unwrap()
            .insert("204".into(), json!({"description": "done"}));
        r
    };
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let r = |schema: &str| json!({"$ref": format!("#/components/schemas/{schema}")});
    let list = |schema: &str| json!({"type": "array", "items": r(schema)});
    let id = |name: &str| json!([{"name": name, "in": "path", "required": true, "schema": {"type": "integer"}}]);
    let number = json!([{"name": "number", "in": "path", "required": true, "schema": {"type": "string"}, "description": "E.164, with or without the +"}]);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Lifeline carrier provisioning API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Accounts, trunk groups, DIDs and their failover settings. Every request carries `Authorization: Bearer <token>`; another account's objects answer 404 whatever the verb. Bodies are JSON (at most 64 KiB); unknown fields are refused."
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/accounts": {
                "get": {"summary": "The accounts this token sees", "responses": ok("200", list("Account"), &["401"])},
                "post": {"summary": "Create an account (operator only)", "requestBody": body("NewAccount"), "responses": ok("201", r("Account"), &["401", "403", "409", "413", "422"])}
            },
            "/v1/accounts/{id}": {
                "parameters": id("id"),
                "get": {"summary": "One account", "responses": ok("200", r("Account"), &["401", "404"])},
                "delete": {"summary": "Remove an account without trunk groups or live tokens (operator only)", "responses": empty(&["401", "403", "404", "409"])}
            },
            "/v1/accounts/{id}/audit": {
                "parameters": id("id"),
                "get": {
                    "summary": "The account's audit trail, newest first",
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}],
                    "responses": ok("200", list("AuditEntry"), &["401", "404"])
                }
            },
            "/v1/tokens": {
                "get": {"summary": "Tokens of this token's account (all for the operator); never their secrets", "responses": ok("200", list("Token"), &["401", "403"])},
                "post": {"summary": "Create an account or trunk group token; the answer carries its secret, once", "requestBody": body("NewToken"), "responses": ok("201", r("NewTokenAnswer"), &["401", "403", "422"])}
            },
            "/v1/tokens/{id}": {
                "parameters": id("id"),
                "delete": {"summary": "Revoke a token", "responses": empty(&["401", "404"])}
            },
            "/v1/trunk-groups": {
                "get": {
                    "summary": "The trunk groups this token sees",
                    "parameters": [{"name": "account_id", "in": "query", "schema": {"type": "integer"}}],
                    "responses": ok("200", list("TrunkGroup"), &["401"])
                },
                "post": {"summary": "Create a trunk group", "requestBody": body("NewTrunkGroup"), "responses": ok("201", r("TrunkGroup"), &["401", "403", "409", "422"])}
            },
            "/v1/trunk-groups/{id}": {
                "parameters": id("id"),
                "get": {"summary": "One trunk group", "responses": ok("200", r("TrunkGroup"), &["401", "404"])},
                "patch": {"summary": "Change the password or the group-wide failover settings (null clears)", "requestBody": body("TrunkGroupPatch"), "responses": ok("200", r("TrunkGroup"), &["401", "403", "404", "422"])},
                "delete": {"summary": "Remove a trunk group without DIDs", "responses": empty(&["401", "403", "404", "409"])}
            },
            "/v1/trunk-groups/{id}/failover": {
                "parameters": id("id"),
                "get": {"summary": "The trunk group's whole failover plan", "responses": ok("200", r("FailoverPlan"), &["401", "404"])},
                "put": {"summary": "Replace the whole failover plan in one write (DIDs left out lose their own number)", "requestBody": body("FailoverPlan"), "responses": ok("200", r("FailoverPlan"), &["401", "404", "422"])}
            },
            "/v1/trunk-groups/{id}/health": {
                "parameters": id("id"),
                "post": {"summary": "An agent's health report, kept with the time received", "requestBody": body("HealthReport"), "responses": empty(&["401", "404", "422"])}
            },
            "/v1/trunk-groups/{id}/status": {
                "parameters": id("id"),
                "get": {"summary": "Where the group is registered now, its last health report, and warnings (failover configured but not registered on every trunk server)", "responses": ok("200", r("Status"), &["401", "404"])}
            },
            "/v1/trunk-groups/{id}/calls": {
                "parameters": id("id"),
                "get": {
                    "summary": "The group's newest calls handled by this trunk server, newest first, each with every target tried (the path it took); each server keeps its own",
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}}],
                    "responses": ok("200", list("Call"), &["401", "404", "503"])
                }
            },
            "/v1/server": {
                "get": {"summary": "This trunk server: its name, whether its configuration store answers, and the configuration version it routes from (no token needed)", "security": [], "responses": ok("200", r("Server"), &["503"])}
            },
            "/v1/dids": {
                "get": {
                    "summary": "The DIDs this token sees",
                    "parameters": [{"name": "trunk_group", "in": "query", "schema": {"type": "integer"}}],
                    "responses": ok("200", list("Did"), &["401"])
                },
                "post": {"summary": "Add a DID to a trunk group", "requestBody": body("NewDid"), "responses": ok("201", r("Did"), &["401", "403", "409", "422"])}
            },
            "/v1/dids/{number}": {
                "parameters": number,
                "get": {"summary": "One DID", "responses": ok("200", r("Did"), &["401", "404"])},
                "patch": {"summary": "Set or clear (null) the DID's own failover number", "requestBody": body("DidPatch"), "responses": ok("200", r("Did"), &["401", "403", "404", "422"])},
                "delete": {"summary": "Remove a DID", "responses": empty(&["401", "403", "404"])}
            },
            "/v1/openapi.json": {
                "get": {"summary": "This document", "security": [], "responses": {"200": {"description": "the OpenAPI document"}}}
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas()
        }
    })
}

/// The component schemas (`json!`s of their own: one would exceed the macro recursion limit).
fn schemas() -> Value {
    let mut all = configuration_schemas();
    if let (Some(all), Value::Object(more)) = (all.as_object_mut(), running_schemas()) {
        all.extend(more);
    }
    all
}

/// What the running server reports: calls and itself.
fn running_schemas() -> Value {
    json!({
        "Call": {"type": "object", "properties": {
            "call_id": {"type": "string"}, "did": {"type": "string"}, "server": {"type": "string", "description": "the trunk server that handled it"},
            "source": {"type": "string"}, "from_peer": {"type": ["string", "null"]},
            "started_at_ms": {"type": "integer"}, "duration_ms": {"type": "integer"}, "status": {"type": "integer", "description": "the final status the caller got"},
            "outcome": {"type": "string"}, "answered_by": {"type": ["string", "null"]},
            "attempts": {"type": "array", "items": {"type": "object", "properties": {
                "stage": {"type": "string", "description": "primary, failover PBX, failover number or next trunk server"},
                "target": {"type": "string"}, "offset_ms": {"type": "integer"}, "duration_ms": {"type": ["integer", "null"]}, "outcome": {"type": "string"}}}}}},
        "Server": {"type": "object", "properties": {
            "server": {"type": "string"},
            "store": {"type": "object", "properties": {"backend": {"enum": ["sqlite", "postgres"]}, "reachable": {"type": "boolean"}, "unreachable_since_ms": {"type": "integer"}}},
            "configuration_version": {"type": "integer"}}}
    })
}

/// Accounts, tokens, trunk groups, DIDs, failover, health and audit.
fn configuration_schemas() -> Value {
    let r = |schema: &str| json!({"$ref": format!("#/components/schemas/{schema}")});
    json!({
        "Error": {"type": "object", "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}}},
        "Account": {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "created_at": {"type": "integer", "description": "Unix seconds"}}},
        "NewAccount": {"type": "object", "additionalProperties": false, "required": ["name"], "properties": {"name": {"type": "string"}}},
        "Scope": {"oneOf": [
            {"const": "operator"},
            {"type": "object", "additionalProperties": false, "required": ["account"], "properties": {"account": {"type": "integer"}}},
            {"type": "object", "additionalProperties": false, "required": ["trunk_group"], "properties": {"trunk_group": {"type": "integer"}}}
        ]},
        "Token": {"type": "object", "properties": {"id": {"type": "integer"}, "scope": r("Scope"), "label": {"type": "string"}, "created_at": {"type": "integer"}, "revoked_at": {"type": ["integer", "null"]}}},
        "NewTokenAnswer": {"type": "object", "properties": {"id": {"type": "integer"}, "scope": r("Scope"), "label": {"type": "string"}, "created_at": {"type": "integer"}, "revoked_at": {"type": ["integer", "null"]}, "token": {"type": "string", "description": "the secret, shown only here"}}},
        "NewToken": {"type": "object", "additionalProperties": false, "required": ["scope"], "properties": {"scope": r("Scope"), "label": {"type": "string"}}},
        "FailoverPbx": {"oneOf": [
            {"type": "object", "additionalProperties": false, "required": ["uri"], "properties": {"uri": {"type": "string", "description": "sip: or sips: URI, IP address or FQDN (RFC 3263)"}}},
            {"type": "object", "additionalProperties": false, "required": ["trunk_group"], "properties": {"trunk_group": {"type": "integer", "description": "another trunk group of the same account"}}}
        ]},
        "TrunkGroup": {"type": "object", "properties": {
            "id": {"type": "integer"}, "account_id": {"type": "integer"}, "name": {"type": "string"},
            "username": {"type": "string"}, "realm": {"type": "string"},
            "failover_number": {"type": ["string", "null"], "description": "global failover number, E.164"},
            "failover_pbx": {"oneOf": [r("FailoverPbx"), {"type": "null"}]},
            "created_at": {"type": "integer"}}},
        "NewTrunkGroup": {"type": "object", "additionalProperties": false, "required": ["name", "username", "password"], "properties": {
            "account_id": {"type": "integer", "description": "required for the operator"},
            "name": {"type": "string"}, "username": {"type": "string"}, "password": {"type": "string", "writeOnly": true},
            "failover_number": {"type": "string"}, "failover_pbx": r("FailoverPbx")}},
        "TrunkGroupPatch": {"type": "object", "additionalProperties": false, "properties": {
            "password": {"type": "string", "writeOnly": true},
            "failover_number": {"type": ["string", "null"]},
            "failover_pbx": {"oneOf": [r("FailoverPbx"), {"type": "null"}]}}},
        "FailoverPlan": {"type": "object", "additionalProperties": false, "properties": {
            "global_number": {"type": ["string", "null"]},
            "pbx": {"oneOf": [r("FailoverPbx"), {"type": "null"}]},
            "dids": {"type": "object", "additionalProperties": {"type": "string"}, "description": "DID -> its own failover number"}}},
        "Did": {"type": "object", "properties": {"number": {"type": "string"}, "trunk_group": {"type": "integer"}, "failover_number": {"type": ["string", "null"]}, "created_at": {"type": "integer"}}},
        "NewDid": {"type": "object", "additionalProperties": false, "required": ["number", "trunk_group"], "properties": {"number": {"type": "string"}, "trunk_group": {"type": "integer"}, "failover_number": {"type": "string"}}},
        "DidPatch": {"type": "object", "additionalProperties": false, "properties": {"failover_number": {"type": ["string", "null"]}}},
        "HealthReport": {"type": "object", "additionalProperties": false, "required": ["pbx", "version"], "properties": {
            "pbx": {"enum": ["up", "down", "unknown"]},
            "servers": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": false, "required": ["registered"], "properties": {
                "registered": {"type": "boolean"}, "expires_in": {"type": ["integer", "null"]}, "last_error": {"type": ["string", "null"]}}}},
            "version": {"type": "string"}}},
        "Status": {"type": "object", "properties": {
            "trunk_group": {"type": "integer"},
            "trunk_servers": {"type": "array", "items": {"type": "string"}},
            "registered_on": {"type": "array", "items": {"type": "string"}},
            "silent_servers": {"type": "array", "items": {"type": "string"}, "description": "servers with registrations on record but no recent heartbeat: not counted"},
            "servers": {"type": "array", "items": {"type": "object", "properties": {"server": {"type": "string"}, "contacts": {"type": "integer"}, "updated_at_ms": {"type": "integer"}}}},
            "failover_configured": {"type": "boolean"},
            "last_health": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {"received_at_ms": {"type": "integer"}, "report": r("HealthReport")}}]},
            "warnings": {"type": "array", "items": {"type": "string"}}}},
        "AuditEntry": {"type": "object", "properties": {
            "id": {"type": "integer"}, "at_ms": {"type": "integer"}, "token": {"type": ["integer", "null"]},
            "action": {"type": "string"}, "object": {"type": "string"},
            "before": {"description": "the object before, as the API shows it"}, "after": {"description": "the object after"}}}
    })
}

fn describe(code: &str) -> &'static str {
    match code {
        "401" => "no valid token",
        "403" => "the token may see this but not do it",
        "404" => "no such object, or another account's",
        "409" => "a duplicate, or the object is still in use",
        "413" => "the body is too large",
        "422" => "a field was refused (the error names it)",
        "503" => "the store (or this server's call records) could not be read",
        _ => "error",
    }
}
