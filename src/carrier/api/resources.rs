//! The `/v1` resources: accounts, tokens, trunk groups, their failover plans, DIDs, and the
//! audit trail.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize};

use super::error::ApiError;
use super::{ApiState, Body, Caller, Id, Params};
use crate::carrier::call_log::CallLogError;
use crate::carrier::call_record::CallRecord;
use crate::carrier::delivery_rule::FailoverPbx;
use crate::carrier::server::HEARTBEAT_INTERVAL;
use crate::carrier::store::{
    Account, AccountId, ApiToken, AuditEntry, Backend, Did, FailoverSettings, NewAuditEntry,
    StoreError, TokenId, TokenScope, TrunkGroup, TrunkGroupId, normalize_e164,
};

type Result<T> = std::result::Result<T, ApiError>;

// === Representations ===

#[derive(Serialize)]
pub struct AccountView {
    id: AccountId,
    name: String,
    created_at: i64,
}

impl From<Account> for AccountView {
    fn from(a: Account) -> Self {
        AccountView {
            id: a.id,
            name: a.name,
            created_at: a.created_at,
        }
    }
}

/// A failover PBX: `{"uri": "sip:…"}` or `{"trunk_group": 7}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum PbxView {
    Uri(String),
    TrunkGroup(TrunkGroupId),
}

impl From<FailoverPbx> for PbxView {
    fn from(p: FailoverPbx) -> Self {
        match p {
            FailoverPbx::Uri(u) => PbxView::Uri(u),
            FailoverPbx::TrunkGroup(id) => PbxView::TrunkGroup(id),
        }
    }
}

impl From<PbxView> for FailoverPbx {
    fn from(p: PbxView) -> Self {
        match p {
            PbxView::Uri(u) => FailoverPbx::Uri(u),
            PbxView::TrunkGroup(id) => FailoverPbx::TrunkGroup(id),
        }
    }
}

/// A trunk group as the API shows it: never its password or HA1 values.
#[derive(Serialize)]
pub struct TrunkGroupView {
    id: TrunkGroupId,
    account_id: AccountId,
    name: String,
    username: String,
    realm: String,
    failover_number: Option<String>,
    failover_pbx: Option<PbxView>,
    created_at: i64,
}

impl From<TrunkGroup> for TrunkGroupView {
    fn from(g: TrunkGroup) -> Self {
        TrunkGroupView {
            id: g.id,
            account_id: g.account_id,
            name: g.name.clone(),
            username: g.username.clone(),
            realm: g.realm.clone(),
            failover_number: g.failover_number.clone(),
            failover_pbx: g.failover_pbx.clone().map(PbxView::from),
            created_at: g.created_at,
        }
    }
}

#[derive(Serialize)]
pub struct DidView {
    number: String,
    trunk_group: TrunkGroupId,
    failover_number: Option<String>,
    created_at: i64,
}

impl From<Did> for DidView {
    fn from(d: Did) -> Self {
        DidView {
            number: d.number,
            trunk_group: d.trunk_group_id,
            failover_number: d.failover_number,
            created_at: d.created_at,
        }
    }
}

/// A token's scope: `"operator"`, `{"account": 1}` or `{"trunk_group": 3}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ScopeView {
    Operator,
    Account(AccountId),
    TrunkGroup(TrunkGroupId),
}

#[derive(Serialize)]
pub struct TokenView {
    id: TokenId,
    scope: ScopeView,
    label: String,
    created_at: i64,
    revoked_at: Option<i64>,
    /// Only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

impl TokenView {
    fn of(t: ApiToken, secret: Option<String>) -> TokenView {
        TokenView {
            id: t.id,
            scope: match t.scope {
                TokenScope::Operator => ScopeView::Operator,
                TokenScope::Account(a) => ScopeView::Account(a),
                TokenScope::TrunkGroup { trunk_group, .. } => ScopeView::TrunkGroup(trunk_group),
            },
            label: t.label,
            created_at: t.created_at,
            revoked_at: t.revoked_at,
            token: secret,
        }
    }
}

#[derive(Serialize)]
pub struct AuditView {
    id: i64,
    at_ms: i64,
    token: Option<TokenId>,
    action: String,
    object: String,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        AuditView {
            id: e.id,
            at_ms: e.at_ms,
            token: e.token,
            action: e.action,
            object: e.object,
            before: json(e.before),
            after: json(e.after),
        }
    }
}

/// The whole failover plan of a trunk group.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FailoverView {
    #[serde(default)]
    global_number: Option<String>,
    #[serde(default)]
    pbx: Option<PbxView>,
    /// DID → its own failover number.
    #[serde(default)]
    dids: BTreeMap<String, String>,
}

impl From<FailoverSettings> for FailoverView {
    fn from(f: FailoverSettings) -> Self {
        FailoverView {
            global_number: f.global_number,
            pbx: f.pbx.map(PbxView::from),
            dids: f.dids,
        }
    }
}

/// `Some(None)` for an explicit `null` (clear), `None` when the field is absent (keep).
fn nullable<'de, D, T>(d: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

// === Helpers ===

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

async fn audit(
    state: &ApiState,
    caller: &Caller,
    account: AccountId,
    action: &str,
    object: &str,
    before: Option<String>,
    after: Option<String>,
) {
    let entry = NewAuditEntry {
        account,
        token: Some(caller.0.id),
        action,
        object,
        before: before.as_deref(),
        after: after.as_deref(),
    };
    if let Err(e) = state.store.record_audit(&entry).await {
        tracing::error!(error = %e, action, object, "audit entry not written");
    }
}

/// A failover number as the API accepts it: E.164, and within the operator's allowed
/// prefixes.
fn check_number(state: &ApiState, field: &str, number: &str) -> Result<String> {
    let n = normalize_e164(number).map_err(|e| ApiError::store(e, field))?;
    if !state
        .failover_prefixes
        .get()
        .iter()
        .any(|p| n.starts_with(p.as_str()))
    {
        return Err(ApiError::invalid(
            field,
            "number_not_allowed",
            format!(
                "{n} is not among the destinations this carrier allows for failover \
                 (failover_number_prefixes)"
            ),
        ));
    }
    Ok(n)
}

/// A refused group-wide failover setting, named by the trunk group's field it came from.
fn group_failover_error(e: StoreError) -> ApiError {
    let field = if matches!(e, StoreError::InvalidNumber { .. }) {
        "failover_number"
    } else {
        "failover_pbx"
    };
    ApiError::store(e, field)
}

/// The trunk group if the caller may see it, else 404.
async fn visible_group(state: &ApiState, caller: &Caller, id: TrunkGroupId) -> Result<TrunkGroup> {
    match state.store.trunk_group(id).await {
        Ok(Some(g)) if caller.sees_trunk_group(&g) => Ok(g),
        Ok(_) => Err(ApiError::not_found("trunk group")),
        Err(e) => Err(ApiError::store(e, "id")),
    }
}

/// The DID and its trunk group if the caller may see them, else 404.
async fn visible_did(state: &ApiState, caller: &Caller, number: &str) -> Result<(Did, TrunkGroup)> {
    let did = match state.store.did(number).await {
        Ok(Some(d)) => d,
        Ok(None) | Err(StoreError::InvalidNumber { .. }) => {
            return Err(ApiError::not_found("DID"));
        }
        Err(e) => return Err(ApiError::store(e, "number")),
    };
    let group = visible_group(state, caller, did.trunk_group_id)
        .await
        .map_err(|_| ApiError::not_found("DID"))?;
    Ok((did, group))
}

/// The failover PBX checked for the caller: a trunk group it cannot see does not exist.
async fn check_pbx(state: &ApiState, caller: &Caller, pbx: &PbxView) -> Result<()> {
    // Any trunk group of the caller's account may be named, also by an agent's token, which
    // sees only its own group; another account's is as unknown as a missing one. (The store
    // then refuses a group of another account than the owner's, or the group itself.)
    if let PbxView::TrunkGroup(id) = pbx {
        let group = state
            .store
            .trunk_group(*id)
            .await
            .map_err(|e| ApiError::store(e, "failover_pbx"))?;
        if !group.is_some_and(|g| caller.sees_account(g.account_id)) {
            return Err(ApiError::invalid(
                "failover_pbx",
                "invalid_failover_pbx",
                "no such trunk group",
            ));
        }
    }
    Ok(())
}

// === Accounts ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    name: String,
}

pub async fn create_account(
    State(state): State<ApiState>,
    caller: Caller,
    Body(body): Body<NewAccount>,
) -> Result<(StatusCode, Json<AccountView>)> {
    if caller.scope() != TokenScope::Operator {
        return Err(ApiError::forbidden("only the operator creates accounts"));
    }
    let account = state
        .store
        .create_account(&body.name)
        .await
        .map_err(|e| ApiError::store(e, "name"))?;
    let view = AccountView::from(account);
    audit(
        &state,
        &caller,
        view.id,
        "account.create",
        &format!("account:{}", view.id),
        None,
        Some(to_json(&view)),
    )
    .await;
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn list_accounts(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<AccountView>>> {
    let all = state
        .store
        .list_accounts()
        .await
        .map_err(|e| ApiError::store(e, ""))?;
    Ok(Json(
        all.into_iter()
            .filter(|a| caller.sees_account(a.id))
            .map(AccountView::from)
            .collect(),
    ))
}

pub async fn get_account(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<AccountId>,
) -> Result<Json<AccountView>> {
    match state.store.account(id).await {
        Ok(Some(a)) if caller.sees_account(a.id) => Ok(Json(a.into())),
        Ok(_) => Err(ApiError::not_found("account")),
        Err(e) => Err(ApiError::store(e, "id")),
    }
}

pub async fn delete_account(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<AccountId>,
) -> Result<StatusCode> {
    let account = get_account(State(state.clone()), caller.clone(), Id(id))
        .await?
        .0;
    if caller.scope() != TokenScope::Operator {
        return Err(ApiError::forbidden("only the operator removes accounts"));
    }
    state
        .store
        .remove_account(id)
        .await
        .map_err(|e| ApiError::store(e, "id"))?;
    audit(
        &state,
        &caller,
        id,
        "account.delete",
        &format!("account:{id}"),
        Some(to_json(&account)),
        None,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    limit: Option<u32>,
}

pub async fn account_audit(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<AccountId>,
    Params(q): Params<AuditQuery>,
) -> Result<Json<Vec<AuditView>>> {
    if !caller.sees_account(id) || matches!(caller.scope(), TokenScope::TrunkGroup { .. }) {
        return Err(ApiError::not_found("account"));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let entries = state
        .store
        .audit(id, limit)
        .await
        .map_err(|e| ApiError::store(e, ""))?;
    Ok(Json(entries.into_iter().map(AuditView::from).collect()))
}

// === Tokens ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    scope: ScopeView,
    #[serde(default)]
    label: String,
}

pub async fn create_token(
    State(state): State<ApiState>,
    caller: Caller,
    Body(body): Body<NewToken>,
) -> Result<(StatusCode, Json<TokenView>)> {
    let scope = match body.scope {
        ScopeView::Operator => {
            return Err(ApiError::forbidden(
                "operator tokens are made with `lifeline-carrier admin token create --operator`",
            ));
        }
        ScopeView::Account(a) => {
            if !caller.manages(a) {
                return Err(ApiError::invalid(
                    "scope",
                    "invalid_scope",
                    "no such account",
                ));
            }
            if state
                .store
                .account(a)
                .await
                .map_err(|e| ApiError::store(e, "scope"))?
                .is_none()
            {
                return Err(ApiError::invalid(
                    "scope",
                    "invalid_scope",
                    "no such account",
                ));
            }
            TokenScope::Account(a)
        }
        ScopeView::TrunkGroup(id) => {
            let group = match state.store.trunk_group(id).await {
                Ok(Some(g)) if caller.manages(g.account_id) => g,
                Ok(_) => {
                    return Err(ApiError::invalid(
                        "scope",
                        "invalid_scope",
                        "no such trunk group",
                    ));
                }
                Err(e) => return Err(ApiError::store(e, "scope")),
            };
            TokenScope::TrunkGroup {
                account: group.account_id,
                trunk_group: group.id,
            }
        }
    };
    let account = match scope {
        TokenScope::Account(a) | TokenScope::TrunkGroup { account: a, .. } => a,
        TokenScope::Operator => unreachable!("refused above"),
    };
    let (token, secret) = state
        .store
        .create_token(scope, &body.label)
        .await
        .map_err(|e| ApiError::store(e, "label"))?;
    let id = token.id;
    let view = TokenView::of(token, Some(secret));
    let mut logged = serde_json::to_value(&view).unwrap_or_default();
    if let Some(o) = logged.as_object_mut() {
        o.remove("token");
    }
    audit(
        &state,
        &caller,
        account,
        "token.create",
        &format!("token:{id}"),
        None,
        Some(logged.to_string()),
    )
    .await;
    Ok((StatusCode::CREATED, Json(view)))
}

fn token_account(t: &ApiToken) -> Option<AccountId> {
    match t.scope {
        TokenScope::Operator => None,
        TokenScope::Account(a) | TokenScope::TrunkGroup { account: a, .. } => Some(a),
    }
}

pub async fn list_tokens(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<TokenView>>> {
    let account = match caller.scope() {
        TokenScope::Operator => None,
        TokenScope::Account(a) => Some(a),
        TokenScope::TrunkGroup { .. } => {
            return Err(ApiError::forbidden(
                "a trunk group's token cannot list tokens",
            ));
        }
    };
    let tokens = state
        .store
        .list_tokens(account)
        .await
        .map_err(|e| ApiError::store(e, ""))?;
    Ok(Json(
        tokens.into_iter().map(|t| TokenView::of(t, None)).collect(),
    ))
}

pub async fn revoke_token(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TokenId>,
) -> Result<StatusCode> {
    let token = match state.store.token(id).await {
        Ok(Some(t)) => t,
        Ok(None) => return Err(ApiError::not_found("token")),
        Err(e) => return Err(ApiError::store(e, "id")),
    };
    let allowed = match token_account(&token) {
        None => caller.scope() == TokenScope::Operator,
        Some(a) => caller.manages(a),
    };
    if !allowed {
        return Err(ApiError::not_found("token"));
    }
    state
        .store
        .revoke_token(id)
        .await
        .map_err(|e| ApiError::store(e, "id"))?;
    if let Some(a) = token_account(&token) {
        audit(
            &state,
            &caller,
            a,
            "token.revoke",
            &format!("token:{id}"),
            None,
            None,
        )
        .await;
    }
    Ok(StatusCode::NO_CONTENT)
}

// === Trunk groups ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTrunkGroup {
    /// Required for the operator; an account's token creates in its own account.
    account_id: Option<AccountId>,
    name: String,
    username: String,
    password: String,
    #[serde(default)]
    failover_number: Option<String>,
    #[serde(default)]
    failover_pbx: Option<PbxView>,
}

pub async fn create_trunk_group(
    State(state): State<ApiState>,
    caller: Caller,
    Body(body): Body<NewTrunkGroup>,
) -> Result<(StatusCode, Json<TrunkGroupView>)> {
    let account = match (caller.scope(), body.account_id) {
        (TokenScope::Operator, Some(a)) => a,
        (TokenScope::Operator, None) => {
            return Err(ApiError::invalid(
                "account_id",
                "missing_field",
                "the operator must name the account",
            ));
        }
        (TokenScope::Account(a), None) => a,
        (TokenScope::Account(a), Some(b)) if a == b => a,
        (TokenScope::Account(_), Some(_)) => {
            return Err(ApiError::invalid(
                "account_id",
                "invalid_account",
                "no such account",
            ));
        }
        (TokenScope::TrunkGroup { .. }, _) => {
            return Err(ApiError::forbidden(
                "a trunk group's token cannot create trunk groups",
            ));
        }
    };
    if state
        .store
        .account(account)
        .await
        .map_err(|e| ApiError::store(e, "account_id"))?
        .is_none()
    {
        return Err(ApiError::invalid(
            "account_id",
            "invalid_account",
            "no such account",
        ));
    }
    let number = match &body.failover_number {
        Some(n) => Some(check_number(&state, "failover_number", n)?),
        None => None,
    };
    if let Some(pbx) = &body.failover_pbx {
        check_pbx(&state, &caller, pbx).await?;
    }
    let group = state
        .store
        .create_trunk_group(
            account,
            &body.name,
            &body.username,
            &body.password,
            &state.realm,
        )
        .await
        .map_err(|e| {
            let field = match &e {
                StoreError::Duplicate { .. } if e.to_string().contains("username") => "username",
                _ => "name",
            };
            ApiError::store(e, field)
        })?;
    // The failover settings go in the same request; if one is refused the group is removed
    // again, so a refused request leaves nothing behind.
    let plan = FailoverSettings {
        global_number: number,
        pbx: body.failover_pbx.clone().map(FailoverPbx::from),
        ..FailoverSettings::default()
    };
    if (plan.global_number.is_some() || plan.pbx.is_some())
        && let Err(e) = state.store.set_failover_plan(group.id, &plan).await
    {
        let _ = state.store.remove_trunk_group(group.id).await;
        return Err(group_failover_error(e));
    }
    let group = state
        .store
        .trunk_group(group.id)
        .await
        .map_err(|e| ApiError::store(e, ""))?
        .ok_or_else(|| ApiError::not_found("trunk group"))?;
    let view = TrunkGroupView::from(group);
    audit(
        &state,
        &caller,
        account,
        "trunk_group.create",
        &format!("trunk_group:{}", view.id),
        None,
        Some(to_json(&view)),
    )
    .await;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFilter {
    account_id: Option<AccountId>,
}

pub async fn list_trunk_groups(
    State(state): State<ApiState>,
    caller: Caller,
    Params(q): Params<GroupFilter>,
) -> Result<Json<Vec<TrunkGroupView>>> {
    let groups = state
        .store
        .list_trunk_groups(q.account_id)
        .await
        .map_err(|e| ApiError::store(e, ""))?;
    Ok(Json(
        groups
            .into_iter()
            .filter(|g| caller.sees_trunk_group(g))
            .map(TrunkGroupView::from)
            .collect(),
    ))
}

pub async fn get_trunk_group(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TrunkGroupId>,
) -> Result<Json<TrunkGroupView>> {
    Ok(Json(visible_group(&state, &caller, id).await?.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkGroupPatch {
    #[serde(default)]
    password: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    failover_number: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    failover_pbx: Option<Option<PbxView>>,
}

pub async fn update_trunk_group(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TrunkGroupId>,
    Body(patch): Body<TrunkGroupPatch>,
) -> Result<Json<TrunkGroupView>> {
    let group = visible_group(&state, &caller, id).await?;
    if !caller.manages(group.account_id) {
        return Err(ApiError::forbidden(
            "a trunk group's token changes only its failover plan",
        ));
    }
    let before = to_json(&TrunkGroupView::from(group.clone()));
    // Everything is checked before anything is written.
    let number = match &patch.failover_number {
        Some(Some(n)) => Some(Some(check_number(&state, "failover_number", n)?)),
        Some(None) => Some(None),
        None => None,
    };
    if let Some(Some(pbx)) = &patch.failover_pbx {
        check_pbx(&state, &caller, pbx).await?;
    }
    if patch.password.as_deref() == Some("") {
        return Err(ApiError::invalid(
            "password",
            "invalid_password",
            "must not be empty",
        ));
    }
    if number.is_some() || patch.failover_pbx.is_some() {
        let mut plan = state
            .store
            .failover_plan(id)
            .await
            .map_err(|e| ApiError::store(e, ""))?;
        if let Some(n) = number {
            plan.global_number = n;
        }
        if let Some(p) = patch.failover_pbx.clone() {
            plan.pbx = p.map(FailoverPbx::from);
        }
        state
            .store
            .set_failover_plan(id, &plan)
            .await
            .map_err(group_failover_error)?;
    }
    if let Some(password) = &patch.password {
        state
            .store
            .set_trunk_group_password(id, password, &state.realm)
            .await
            .map_err(|e| ApiError::store(e, "password"))?;
    }
    let group = visible_group(&state, &caller, id).await?;
    let view = TrunkGroupView::from(group);
    let mut after = to_json(&view);
    if patch.password.is_some() {
        // The audit says the password changed, never what it is.
        after = after.replacen('{', "{\"password_changed\":true,", 1);
    }
    audit(
        &state,
        &caller,
        view.account_id,
        "trunk_group.update",
        &format!("trunk_group:{id}"),
        Some(before),
        Some(after),
    )
    .await;
    Ok(Json(view))
}

pub async fn delete_trunk_group(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TrunkGroupId>,
) -> Result<StatusCode> {
    let group = visible_group(&state, &caller, id).await?;
    if !caller.manages(group.account_id) {
        return Err(ApiError::forbidden(
            "a trunk group's token cannot remove it",
        ));
    }
    state
        .store
        .remove_trunk_group(id)
        .await
        .map_err(|e| ApiError::store(e, "id"))?;
    let before = to_json(&TrunkGroupView::from(group.clone()));
    audit(
        &state,
        &caller,
        group.account_id,
        "trunk_group.delete",
        &format!("trunk_group:{id}"),
        Some(before),
        None,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

// === Failover plans ===

pub async fn get_failover(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TrunkGroupId>,
) -> Result<Json<FailoverView>> {
    visible_group(&state, &caller, id).await?;
    let plan = state
        .store
        .failover_plan(id)
        .await
        .map_err(|e| ApiError::store(e, ""))?;
    Ok(Json(plan.into()))
}

pub async fn put_failover(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TrunkGroupId>,
    Body(body): Body<FailoverView>,
) -> Result<Json<FailoverView>> {
    let group = visible_group(&state, &caller, id).await?;
    let before = state
        .store
        .failover_plan(id)
        .await
        .map_err(|e| ApiError::store(e, ""))?;
    let global_number = match &body.global_number {
        Some(n) => Some(check_number(&state, "global_number", n)?),
        None => None,
    };
    let mut dids = BTreeMap::new();
    for (did, number) in &body.dids {
        let field = format!("dids.{did}");
        let did = normalize_e164(did).map_err(|e| ApiError::store(e, &field))?;
        let number = check_number(&state, &field, number)?;
        if number == did {
            return Err(ApiError::invalid(
                &field,
                "number_is_did",
                "a DID cannot fail over to itself",
            ));
        }
        dids.insert(did, number);
    }
    if let Some(pbx) = &body.pbx {
        check_pbx(&state, &caller, pbx).await?;
    }
    let plan = FailoverSettings {
        global_number,
        pbx: body.pbx.clone().map(FailoverPbx::from),
        dids,
    };
    let stored = state
        .store
        .set_failover_plan(id, &plan)
        .await
        .map_err(|e| {
            let field = match &e {
                StoreError::InvalidNumber { .. } => "global_number",
                StoreError::DidNotFound(_) => "dids",
                _ => "pbx",
            };
            match e {
                StoreError::DidNotFound(d) => ApiError::invalid(
                    field,
                    "unknown_did",
                    format!("{d} is not a DID of this trunk group"),
                ),
                e => ApiError::store(e, field),
            }
        })?;
    let view = FailoverView::from(stored);
    audit(
        &state,
        &caller,
        group.account_id,
        "failover.put",
        &format!("trunk_group:{id}"),
        Some(to_json(&FailoverView::from(before))),
        Some(to_json(&view)),
    )
    .await;
    Ok(Json(view))
}

// === DIDs ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDid {
    number: String,
    trunk_group: TrunkGroupId,
    #[serde(default)]
    failover_number: Option<String>,
}

pub async fn create_did(
    State(state): State<ApiState>,
    caller: Caller,
    Body(body): Body<NewDid>,
) -> Result<(StatusCode, Json<DidView>)> {
    let group = visible_group(&state, &caller, body.trunk_group)
        .await
        .map_err(|_| {
            ApiError::invalid("trunk_group", "invalid_trunk_group", "no such trunk group")
        })?;
    if !caller.manages(group.account_id) {
        return Err(ApiError::forbidden("a trunk group's token cannot add DIDs"));
    }
    let number = normalize_e164(&body.number).map_err(|e| ApiError::store(e, "number"))?;
    let failover = match &body.failover_number {
        Some(n) => {
            let n = check_number(&state, "failover_number", n)?;
            if n == number {
                return Err(ApiError::invalid(
                    "failover_number",
                    "number_is_did",
                    "a DID cannot fail over to itself",
                ));
            }
            Some(n)
        }
        None => None,
    };
    let did = state
        .store
        .create_did(&number, group.id)
        .await
        .map_err(|e| ApiError::store(e, "number"))?;
    let did = match failover {
        Some(n) => {
            if let Err(e) = state
                .store
                .set_did_failover_number(&did.number, Some(&n))
                .await
            {
                let _ = state.store.remove_did(&did.number).await;
                return Err(ApiError::store(e, "failover_number"));
            }
            state
                .store
                .did(&did.number)
                .await
                .map_err(|e| ApiError::store(e, ""))?
                .unwrap_or(did)
        }
        None => did,
    };
    let view = DidView::from(did);
    audit(
        &state,
        &caller,
        group.account_id,
        "did.create",
        &format!("did:{}", view.number),
        None,
        Some(to_json(&view)),
    )
    .await;
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DidFilter {
    trunk_group: Option<TrunkGroupId>,
}

pub async fn list_dids(
    State(state): State<ApiState>,
    caller: Caller,
    Params(q): Params<DidFilter>,
) -> Result<Json<Vec<DidView>>> {
    let groups: std::collections::HashMap<TrunkGroupId, TrunkGroup> = state
        .store
        .list_trunk_groups(None)
        .await
        .map_err(|e| ApiError::store(e, ""))?
        .into_iter()
        .map(|g| (g.id, g))
        .collect();
    let dids = state
        .store
        .list_dids(q.trunk_group)
        .await
        .map_err(|e| ApiError::store(e, ""))?;
    Ok(Json(
        dids.into_iter()
            .filter(|d| {
                groups
                    .get(&d.trunk_group_id)
                    .is_some_and(|g| caller.sees_trunk_group(g))
            })
            .map(DidView::from)
            .collect(),
    ))
}

pub async fn get_did(
    State(state): State<ApiState>,
    caller: Caller,
    Path(number): Path<String>,
) -> Result<Json<DidView>> {
    Ok(Json(visible_did(&state, &caller, &number).await?.0.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DidPatch {
    #[serde(default, deserialize_with = "nullable")]
    failover_number: Option<Option<String>>,
}

pub async fn update_did(
    State(state): State<ApiState>,
    caller: Caller,
    Path(number): Path<String>,
    Body(patch): Body<DidPatch>,
) -> Result<Json<DidView>> {
    let (did, group) = visible_did(&state, &caller, &number).await?;
    if !caller.manages(group.account_id) {
        return Err(ApiError::forbidden(
            "a trunk group's token changes DIDs through its failover plan",
        ));
    }
    let before = to_json(&DidView::from(did.clone()));
    if let Some(new) = patch.failover_number {
        let new = match new {
            Some(n) => {
                let n = check_number(&state, "failover_number", &n)?;
                if n == did.number {
                    return Err(ApiError::invalid(
                        "failover_number",
                        "number_is_did",
                        "a DID cannot fail over to itself",
                    ));
                }
                Some(n)
            }
            None => None,
        };
        state
            .store
            .set_did_failover_number(&did.number, new.as_deref())
            .await
            .map_err(|e| ApiError::store(e, "failover_number"))?;
    }
    let (did, _) = visible_did(&state, &caller, &did.number).await?;
    let view = DidView::from(did);
    audit(
        &state,
        &caller,
        group.account_id,
        "did.update",
        &format!("did:{}", view.number),
        Some(before),
        Some(to_json(&view)),
    )
    .await;
    Ok(Json(view))
}

pub async fn delete_did(
    State(state): State<ApiState>,
    caller: Caller,
    Path(number): Path<String>,
) -> Result<StatusCode> {
    let (did, group) = visible_did(&state, &caller, &number).await?;
    if !caller.manages(group.account_id) {
        return Err(ApiError::forbidden(
            "a trunk group's token cannot remove DIDs",
        ));
    }
    state
        .store
        .remove_did(&did.number)
        .await
        .map_err(|e| ApiError::store(e, "number"))?;
    let before = to_json(&DidView::from(did.clone()));
    audit(
        &state,
        &caller,
        group.account_id,
        "did.delete",
        &format!("did:{}", did.number),
        Some(before),
        None,
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

// === Health and status ===

/// What an agent reports.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthReport {
    /// The PBX as the agent sees it.
    pbx: PbxState,
    /// Per trunk server (by name), the agent's registration there.
    #[serde(default)]
    servers: BTreeMap<String, ServerRegistration>,
    /// The agent's version.
    version: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PbxState {
    Up,
    Down,
    Unknown,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerRegistration {
    registered: bool,
    #[serde(default)]
    expires_in: Option<u32>,
    #[serde(default)]
    last_error: Option<String>,
}

pub async fn post_health(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TrunkGroupId>,
    Body(report): Body<HealthReport>,
) -> Result<StatusCode> {
    visible_group(&state, &caller, id).await?;
    if report.version.len() > 100 || report.servers.len() > 32 {
        return Err(ApiError::invalid("version", "invalid_report", "too long"));
    }
    let now_ms = crate::carrier::registrar::unix_ms(std::time::SystemTime::now());
    state
        .store
        .add_health_report(id, &to_json(&report), now_ms)
        .await
        .map_err(|e| ApiError::store(e, ""))?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
pub struct ServerPresence {
    server: String,
    contacts: i64,
    updated_at_ms: i64,
}

#[derive(Serialize)]
pub struct LastHealth {
    received_at_ms: i64,
    report: serde_json::Value,
}

#[derive(Serialize)]
pub struct StatusView {
    trunk_group: TrunkGroupId,
    /// The trunk servers this carrier knows (this one and its peers).
    trunk_servers: Vec<String>,
    /// Those of them holding live registrations of the group right now (and heard from).
    registered_on: Vec<String>,
    /// Servers with registrations on record that have not written their heartbeat lately.
    silent_servers: Vec<String>,
    servers: Vec<ServerPresence>,
    failover_configured: bool,
    last_health: Option<LastHealth>,
    warnings: Vec<String>,
}

pub async fn get_status(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TrunkGroupId>,
) -> Result<Json<StatusView>> {
    visible_group(&state, &caller, id).await?;
    let store_err = |e| ApiError::store(e, "");
    let presence = state.store.presence(id).await.map_err(store_err)?;
    let heartbeats = state.store.heartbeats().await.map_err(store_err)?;
    let plan = state.store.failover_plan(id).await.map_err(store_err)?;
    let health = state
        .store
        .last_health_report(id)
        .await
        .map_err(store_err)?;
    let failover_configured =
        plan.global_number.is_some() || plan.pbx.is_some() || !plan.dids.is_empty();
    // A server's rows count while it is heard from: a stopped or crashed server's would
    // claim registrations nobody serves.
    let now_ms = crate::carrier::registrar::unix_ms(std::time::SystemTime::now());
    let stale_before = now_ms - 3 * HEARTBEAT_INTERVAL.as_millis() as i64;
    let live = |server: &str| {
        heartbeats
            .iter()
            .any(|(s, seen)| s == server && *seen >= stale_before)
    };
    let silent_servers: Vec<String> = presence
        .iter()
        .map(|(s, _, _)| s.clone())
        .filter(|s| !live(s))
        .collect();
    let registered_on: Vec<String> = presence
        .iter()
        .map(|(s, _, _)| s.clone())
        .filter(|s| live(s))
        .collect();
    let trunk_servers = state.trunk_servers.get();
    let missing: Vec<&String> = trunk_servers
        .iter()
        .filter(|s| !registered_on.contains(s))
        .collect();
    let mut warnings = Vec::new();
    for server in &silent_servers {
        warnings.push(format!(
            "{server} has not been heard from for {} s: its registrations are not counted",
            3 * HEARTBEAT_INTERVAL.as_secs()
        ));
    }
    if registered_on.is_empty() {
        warnings.push("the PBX is registered on no trunk server".to_string());
    } else if failover_configured && !missing.is_empty() {
        warnings.push(format!(
            "failover is configured but the PBX is registered on {} of {} trunk servers: \
             calls arriving at {} fail over although the PBX is up",
            registered_on.len(),
            trunk_servers.len(),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(Json(StatusView {
        trunk_group: id,
        trunk_servers: trunk_servers.to_vec(),
        registered_on,
        silent_servers,
        servers: presence
            .into_iter()
            .map(|(server, contacts, updated_at_ms)| ServerPresence {
                server,
                contacts,
                updated_at_ms,
            })
            .collect(),
        failover_configured,
        last_health: health.map(|(received_at_ms, text)| LastHealth {
            received_at_ms,
            report: serde_json::from_str(&text).unwrap_or_default(),
        }),
        warnings,
    }))
}

// === Call records ===

#[derive(Serialize)]
pub struct AttemptView {
    stage: String,
    target: String,
    offset_ms: u64,
    duration_ms: Option<u64>,
    outcome: String,
}

#[derive(Serialize)]
pub struct CallView {
    call_id: String,
    did: String,
    server: String,
    source: String,
    from_peer: Option<String>,
    started_at_ms: i64,
    duration_ms: u64,
    status: u16,
    outcome: String,
    answered_by: Option<String>,
    attempts: Vec<AttemptView>,
}

impl From<CallRecord> for CallView {
    fn from(c: CallRecord) -> Self {
        CallView {
            call_id: c.call_id,
            did: c.did,
            server: c.server,
            source: c.source,
            from_peer: c.from_peer,
            started_at_ms: c.started_at_ms,
            duration_ms: c.duration_ms,
            status: c.status,
            outcome: c.outcome,
            answered_by: c.answered_by,
            attempts: c
                .attempts
                .into_iter()
                .map(|a| AttemptView {
                    stage: a.stage,
                    target: a.target,
                    offset_ms: a.offset_ms,
                    duration_ms: a.duration_ms,
                    outcome: a.outcome,
                })
                .collect(),
        }
    }
}

/// The trunk group's newest calls that this trunk server handled, newest first, each with
/// every target tried: the path the call took. Records are this server's own (each server
/// keeps its calls in its data folder); ask each server for its share.
pub async fn trunk_group_calls(
    State(state): State<ApiState>,
    caller: Caller,
    Id(id): Id<TrunkGroupId>,
    Params(q): Params<AuditQuery>,
) -> Result<Json<Vec<CallView>>> {
    visible_group(&state, &caller, id).await?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let unavailable = |e: CallLogError| {
        tracing::warn!(error = %e, "API: call records not read");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "call_log_unavailable",
            "the call records could not be read",
        )
    };
    // Records are written behind the calls: write what is queued, so a call that just ended
    // is in the answer.
    state.call_log.flush().await.map_err(unavailable)?;
    let calls = state
        .call_log
        .recent_of_trunk_group(id, limit)
        .await
        .map_err(unavailable)?;
    Ok(Json(calls.into_iter().map(CallView::from).collect()))
}

// === This server ===

#[derive(Serialize)]
pub struct StoreView {
    /// `sqlite` (embedded) or `postgres` (shared).
    backend: &'static str,
    reachable: bool,
    /// When it stopped answering (Unix milliseconds); absent while reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    unreachable_since_ms: Option<i64>,
}

#[derive(Serialize)]
pub struct ServerStatusView {
    /// This trunk server's name.
    server: String,
    store: StoreView,
    /// The store's change counter of the configuration this server routes from.
    configuration_version: i64,
}

/// This server's own state; no token needed (it tells nothing about customers), so a load
/// balancer or monitor can ask, and it answers while the store is down: 200 when the store
/// answers, 503 when it does not (the API cannot serve then; SIP routing goes on).
pub async fn get_server(State(state): State<ApiState>) -> (StatusCode, Json<ServerStatusView>) {
    let since = state.server.store_health.unreachable_since_ms();
    let view = ServerStatusView {
        server: state.server_name.clone(),
        store: StoreView {
            backend: match state.store.backend() {
                Backend::Sqlite => "sqlite",
                Backend::Postgres => "postgres",
            },
            reachable: since.is_none(),
            unreachable_since_ms: since,
        },
        configuration_version: state.server.customers.borrow().version,
    };
    let status = if since.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(view))
}
