//! `lifeline-carrier admin …`: edit the store from the command line.
//!
//! Output is for scripts: one line per object, fields separated by a tab, no header, times
//! in UTC as `YYYY-MM-DDTHH:MM:SSZ`, `-` for a setting that is not set. `add` prints only the
//! new object's key (the id, or the normalised number for a DID); `token create` prints the
//! new token's id and its secret; `remove`, `set-password`, `token revoke` and `failover` with
//! changes print nothing; `failover` without options prints the current settings. Failures go
//! to the caller as [`AdminError`], which names what was wrong; the process should exit
//! non-zero.
//!
//! Line formats:
//! - account: `ID  NAME  CREATED`
//! - trunk group: `ID  ACCOUNT_ID  NAME  USERNAME  REALM  CREATED  FAILOVER_NUMBER  FAILOVER_PBX`
//! - DID: `NUMBER  TRUNK_GROUP_ID  CREATED  FAILOVER_NUMBER`
//! - `trunk-group failover ID`: `FAILOVER_NUMBER  FAILOVER_PBX`
//! - `did failover NUMBER`: `FAILOVER_NUMBER`
//! - `token create`: `ID  SECRET`
//! - API token (`token list`): `ID  SCOPE  LABEL  CREATED  REVOKED`
//!
//! A failover number is E.164 with the `+`; a failover PBX is its normalised SIP URI, or
//! `trunk-group:ID` for another trunk group. A token's SCOPE is `operator`, `account:ID` or
//! `trunk-group:ID` (the trunk group's account is the one it belongs to); LABEL is `-` when
//! empty; REVOKED is the time it was revoked, `-` while it is live. A token SECRET is `llt_`
//! and 43 characters of URL-safe base64, printed only by `token create`: the store keeps just
//! its SHA-256. Names and labels cannot hold tabs or line breaks and URIs no white space (the
//! store refuses them), so lines always split cleanly. Passwords and HA1 values are never
//! printed.

use std::io::Write;

use clap::Subcommand;

use super::delivery_rule::FailoverPbx;
use super::store::{
    AccountId, ApiToken, Store, StoreError, StoreLocation, TokenId, TokenScope, TrunkGroupId,
    normalize_e164, normalize_failover_uri,
};

/// Edit the configuration store: accounts, trunk groups, DIDs, API tokens.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AdminCommand {
    /// Customer accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Trunk groups: a customer PBX connection and its SIP credentials.
    #[command(subcommand)]
    TrunkGroup(TrunkGroupCommand),
    /// DIDs: numbers delivered to a trunk group.
    #[command(subcommand)]
    Did(DidCommand),
    /// API tokens for the provisioning API.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `admin account …`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AccountCommand {
    /// Create an account; prints its id.
    Add {
        /// Account name, unique across the carrier.
        name: String,
    },
    /// List accounts: ID, NAME, CREATED.
    List,
    /// Remove an account that has no trunk groups.
    Remove {
        /// Account id.
        id: AccountId,
    },
}

/// `admin trunk-group …`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum TrunkGroupCommand {
    /// Create a trunk group; prints its id. The password is kept only as Digest HA1 values
    /// for the configured realm.
    Add {
        /// The account that owns it.
        #[arg(long, value_name = "ID")]
        account: AccountId,
        /// Name, unique within the account.
        #[arg(long)]
        name: String,
        /// SIP Digest username, unique across the carrier.
        #[arg(long)]
        username: String,
        /// SIP Digest password.
        #[arg(long)]
        password: String,
    },
    /// List trunk groups: ID, ACCOUNT_ID, NAME, USERNAME, REALM, CREATED, FAILOVER_NUMBER,
    /// FAILOVER_PBX.
    List {
        /// Only this account's trunk groups.
        #[arg(long, value_name = "ID")]
        account: Option<AccountId>,
    },
    /// Remove a trunk group that has no DIDs.
    Remove {
        /// Trunk group id.
        id: TrunkGroupId,
    },
    /// Replace a trunk group's password (also moves it to the configured realm).
    SetPassword {
        /// Trunk group id.
        id: TrunkGroupId,
        /// The new SIP Digest password.
        password: String,
    },
    /// Show or change a trunk group's failover settings: its global failover number (for DIDs
    /// without their own) and its failover PBX. Options given are changed, the others kept;
    /// without options, prints FAILOVER_NUMBER and FAILOVER_PBX (`-` when unset).
    Failover {
        /// Trunk group id.
        id: TrunkGroupId,
        /// Set the global failover number (E.164, with or without the leading `+`).
        #[arg(long, value_name = "E164", conflicts_with = "no_number")]
        number: Option<String>,
        /// Clear the global failover number.
        #[arg(long)]
        no_number: bool,
        /// Set the failover PBX to a SIP URI, e.g. `sip:192.0.2.12:5060` or
        /// `sip:backup.example.com;transport=tcp`.
        #[arg(long, value_name = "SIP_URI", conflicts_with_all = ["pbx_trunk_group", "no_pbx"])]
        pbx: Option<String>,
        /// Set the failover PBX to another trunk group of the same account.
        #[arg(long, value_name = "ID", conflicts_with = "no_pbx")]
        pbx_trunk_group: Option<TrunkGroupId>,
        /// Clear the failover PBX.
        #[arg(long)]
        no_pbx: bool,
    },
}

/// `admin did …`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum DidCommand {
    /// Add a DID to a trunk group; prints the number in E.164 with `+`.
    Add {
        /// E.164 number, with or without the leading `+`.
        number: String,
        /// The trunk group calls to this number are delivered to.
        #[arg(long, value_name = "ID")]
        trunk_group: TrunkGroupId,
    },
    /// List DIDs: NUMBER, TRUNK_GROUP_ID, CREATED, FAILOVER_NUMBER.
    List {
        /// Only this trunk group's DIDs.
        #[arg(long, value_name = "ID")]
        trunk_group: Option<TrunkGroupId>,
    },
    /// Remove a DID.
    Remove {
        /// E.164 number, with or without the leading `+`.
        number: String,
    },
    /// Show or change a DID's own failover number (when unset, its trunk group's global one
    /// applies). Without options, prints FAILOVER_NUMBER (`-` when unset).
    Failover {
        /// The DID: E.164, with or without the leading `+`.
        number: String,
        /// Set the DID's failover number (E.164, with or without the leading `+`).
        #[arg(long = "number", value_name = "E164", conflicts_with = "no_number")]
        failover_number: Option<String>,
        /// Clear the DID's failover number.
        #[arg(long)]
        no_number: bool,
    },
}

/// `admin token …`
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum TokenCommand {
    /// Create an API token; prints ID and SECRET. The secret is shown this once: only its
    /// SHA-256 is stored.
    #[command(group(
        clap::ArgGroup::new("scope")
            .required(true)
            .args(["operator", "account", "trunk_group"])
    ))]
    Create {
        /// The operator's token: everything, and the only scope that creates accounts.
        #[arg(long)]
        operator: bool,
        /// A token for one account and everything in it.
        #[arg(long, value_name = "ID")]
        account: Option<AccountId>,
        /// A token for one trunk group (what an agent gets).
        #[arg(long, value_name = "ID")]
        trunk_group: Option<TrunkGroupId>,
        /// What or who the token is for.
        #[arg(long, value_name = "TEXT", default_value = "")]
        label: String,
    },
    /// List API tokens, revoked ones included: ID, SCOPE, LABEL, CREATED, REVOKED.
    List {
        /// Only this account's tokens (scoped to it or to one of its trunk groups).
        #[arg(long, value_name = "ID")]
        account: Option<AccountId>,
    },
    /// Revoke an API token: it stops working at once. Revoking it again is not an error.
    Revoke {
        /// Token id.
        id: TokenId,
    },
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The store refused the change or failed; the message says which and why.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output could not be written.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs one admin command against `store`, writing its output to `out`. `realm` is the
/// configured Digest realm, used when a password is set.
pub async fn run(
    cmd: AdminCommand,
    store: &Store,
    realm: &str,
    out: &mut impl Write,
) -> Result<(), AdminError> {
    match cmd {
        AdminCommand::Account(cmd) => match cmd {
            AccountCommand::Add { name } => {
                let account = store.create_account(&name).await?;
                writeln!(out, "{}", account.id)?;
            }
            AccountCommand::List => {
                for a in store.list_accounts().await? {
                    writeln!(out, "{}\t{}\t{}", a.id, a.name, utc(a.created_at))?;
                }
            }
            AccountCommand::Remove { id } => store.remove_account(id).await?,
        },
        AdminCommand::TrunkGroup(cmd) => match cmd {
            TrunkGroupCommand::Add {
                account,
                name,
                username,
                password,
            } => {
                let group = store
                    .create_trunk_group(account, &name, &username, &password, realm)
                    .await?;
                writeln!(out, "{}", group.id)?;
            }
            TrunkGroupCommand::List { account } => {
                for g in store.list_trunk_groups(account).await? {
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        g.id,
                        g.account_id,
                        g.name,
                        g.username,
                        g.realm,
                        utc(g.created_at),
                        or_dash(g.failover_number.as_deref()),
                        pbx_field(g.failover_pbx.as_ref()),
                    )?;
                }
            }
            TrunkGroupCommand::Remove { id } => store.remove_trunk_group(id).await?,
            TrunkGroupCommand::SetPassword { id, password } => {
                store.set_trunk_group_password(id, &password, realm).await?
            }
            TrunkGroupCommand::Failover {
                id,
                number,
                no_number,
                pbx,
                pbx_trunk_group,
                no_pbx,
            } => {
                let number = match (number, no_number) {
                    (Some(n), _) => Some(Some(n)),
                    (None, true) => Some(None),
                    (None, false) => None,
                };
                let pbx = match (pbx, pbx_trunk_group, no_pbx) {
                    (Some(uri), _, _) => Some(Some(FailoverPbx::Uri(uri))),
                    (None, Some(group), _) => Some(Some(FailoverPbx::TrunkGroup(group))),
                    (None, None, true) => Some(None),
                    (None, None, false) => None,
                };
                if number.is_none() && pbx.is_none() {
                    let Some(g) = store.trunk_group(id).await? else {
                        return Err(StoreError::TrunkGroupNotFound(id).into());
                    };
                    writeln!(
                        out,
                        "{}\t{}",
                        or_dash(g.failover_number.as_deref()),
                        pbx_field(g.failover_pbx.as_ref())
                    )?;
                } else {
                    // Check what needs no look-up first, then make the change that may still
                    // be refused (the PBX), so a refusal leaves everything as it was.
                    if let Some(Some(n)) = &number {
                        normalize_e164(n)?;
                    }
                    if let Some(Some(FailoverPbx::Uri(uri))) = &pbx {
                        normalize_failover_uri(uri)?;
                    }
                    if let Some(pbx) = pbx {
                        store.set_trunk_group_failover_pbx(id, pbx.as_ref()).await?;
                    }
                    if let Some(n) = number {
                        store
                            .set_trunk_group_failover_number(id, n.as_deref())
                            .await?;
                    }
                }
            }
        },
        AdminCommand::Did(cmd) => match cmd {
            DidCommand::Add {
                number,
                trunk_group,
            } => {
                let did = store.create_did(&number, trunk_group).await?;
                writeln!(out, "{}", did.number)?;
            }
            DidCommand::List { trunk_group } => {
                for d in store.list_dids(trunk_group).await? {
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}",
                        d.number,
                        d.trunk_group_id,
                        utc(d.created_at),
                        or_dash(d.failover_number.as_deref()),
                    )?;
                }
            }
            DidCommand::Remove { number } => store.remove_did(&number).await?,
            DidCommand::Failover {
                number,
                failover_number,
                no_number,
            } => {
                if let Some(n) = failover_number {
                    store.set_did_failover_number(&number, Some(&n)).await?;
                } else if no_number {
                    store.set_did_failover_number(&number, None).await?;
                } else {
                    let Some(did) = store.did(&number).await? else {
                        return Err(StoreError::DidNotFound(normalize_e164(&number)?).into());
                    };
                    writeln!(out, "{}", or_dash(did.failover_number.as_deref()))?;
                }
            }
        },
        AdminCommand::Token(cmd) => match cmd {
            TokenCommand::Create {
                operator,
                account,
                trunk_group,
                label,
            } => {
                let scope = match (operator, account, trunk_group) {
                    (_, Some(account), _) => TokenScope::Account(account),
                    (_, None, Some(trunk_group)) => {
                        let Some(group) = store.trunk_group(trunk_group).await? else {
                            return Err(StoreError::TrunkGroupNotFound(trunk_group).into());
                        };
                        TokenScope::TrunkGroup {
                            account: group.account_id,
                            trunk_group,
                        }
                    }
                    // clap requires exactly one of the three.
                    (_, None, None) => TokenScope::Operator,
                };
                let (token, secret) = store.create_token(scope, &label).await?;
                writeln!(out, "{}\t{secret}", token.id)?;
            }
            TokenCommand::List { account } => {
                for t in store.list_tokens(account).await? {
                    writeln!(out, "{}", token_line(&t))?;
                }
            }
            TokenCommand::Revoke { id } => store.revoke_token(id).await?,
        },
    }
    out.flush()?;
    Ok(())
}

/// A token as `token list` prints it: `ID  SCOPE  LABEL  CREATED  REVOKED`.
fn token_line(t: &ApiToken) -> String {
    let scope = match t.scope {
        TokenScope::Operator => "operator".to_owned(),
        TokenScope::Account(id) => format!("account:{id}"),
        TokenScope::TrunkGroup { trunk_group, .. } => format!("trunk-group:{trunk_group}"),
    };
    let label = if t.label.is_empty() { "-" } else { &t.label };
    let revoked = t.revoked_at.map_or_else(|| "-".to_owned(), utc);
    format!(
        "{}\t{scope}\t{label}\t{}\t{revoked}",
        t.id,
        utc(t.created_at)
    )
}

/// The whole `admin` invocation for the binary: opens the store at `location`, runs `cmd`,
/// prints its output on standard output and any failure on standard error. Returns the
/// process exit code: 0 on success, 1 on any failure.
pub async fn execute(cmd: AdminCommand, location: &StoreLocation, realm: &str) -> i32 {
    let store = match Store::connect(location).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("lifeline-carrier: {e}");
            return 1;
        }
    };
    let mut out = Vec::new();
    let result = run(cmd, &store, realm, &mut out).await;
    store.close().await;
    let printed = {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&out).and_then(|()| stdout.flush())
    };
    match result.and(printed.map_err(AdminError::from)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lifeline-carrier: {e}");
            1
        }
    }
}

/// A setting as printed: its value, or `-` when unset.
fn or_dash(value: Option<&str>) -> &str {
    value.unwrap_or("-")
}

/// A failover PBX as printed: the URI, `trunk-group:ID`, or `-` when unset.
fn pbx_field(pbx: Option<&FailoverPbx>) -> String {
    match pbx {
        None => "-".to_owned(),
        Some(FailoverPbx::Uri(uri)) => uri.clone(),
        Some(FailoverPbx::TrunkGroup(id)) => format!("trunk-group:{id}"),
    }
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn utc(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: AdminCommand,
    }

    fn parse(args: &[&str]) -> AdminCommand {
        let mut argv = vec!["admin"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parses").cmd
    }

    async fn run_ok(store: &Store, args: &[&str]) -> String {
        let mut out = Vec::new();
        run(parse(args), store, "lifeline", &mut out)
            .await
            .expect("command succeeds");
        String::from_utf8(out).expect("utf-8")
    }

    async fn run_err(store: &Store, args: &[&str]) -> AdminError {
        let mut out = Vec::new();
        let err = run(parse(args), store, "lifeline", &mut out)
            .await
            .expect_err("command fails");
        assert!(out.is_empty(), "no output on failure");
        err
    }

    fn fields(line: &str) -> Vec<&str> {
        line.split('\t').collect()
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_706_703), "2026-11-26T15:25:03Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse(&["account", "add", "Acme Ltd"]),
            AdminCommand::Account(AccountCommand::Add {
                name: "Acme Ltd".into()
            })
        );
        assert_eq!(
            parse(&[
                "trunk-group",
                "add",
                "--account",
                "3",
                "--name",
                "main",
                "--username",
                "acme-main",
                "--password",
                "s3cret",
            ]),
            AdminCommand::TrunkGroup(TrunkGroupCommand::Add {
                account: 3,
                name: "main".into(),
                username: "acme-main".into(),
                password: "s3cret".into(),
            })
        );
        assert_eq!(
            parse(&["trunk-group", "list", "--account", "3"]),
            AdminCommand::TrunkGroup(TrunkGroupCommand::List { account: Some(3) })
        );
        assert_eq!(
            parse(&["trunk-group", "set-password", "4", "n3w"]),
            AdminCommand::TrunkGroup(TrunkGroupCommand::SetPassword {
                id: 4,
                password: "n3w".into()
            })
        );
        assert_eq!(
            parse(&["did", "add", "+442071234567", "--trunk-group", "4"]),
            AdminCommand::Did(DidCommand::Add {
                number: "+442071234567".into(),
                trunk_group: 4
            })
        );
        assert_eq!(
            parse(&["did", "remove", "442071234567"]),
            AdminCommand::Did(DidCommand::Remove {
                number: "442071234567".into()
            })
        );
        assert_eq!(
            parse(&["trunk-group", "failover", "4"]),
            AdminCommand::TrunkGroup(TrunkGroupCommand::Failover {
                id: 4,
                number: None,
                no_number: false,
                pbx: None,
                pbx_trunk_group: None,
                no_pbx: false,
            })
        );
        assert_eq!(
            parse(&[
                "trunk-group",
                "failover",
                "4",
                "--number",
                "+15550002222",
                "--pbx",
                "sip:backup.example.com",
            ]),
            AdminCommand::TrunkGroup(TrunkGroupCommand::Failover {
                id: 4,
                number: Some("+15550002222".into()),
                no_number: false,
                pbx: Some("sip:backup.example.com".into()),
                pbx_trunk_group: None,
                no_pbx: false,
            })
        );
        assert_eq!(
            parse(&[
                "trunk-group",
                "failover",
                "4",
                "--no-number",
                "--pbx-trunk-group",
                "5"
            ]),
            AdminCommand::TrunkGroup(TrunkGroupCommand::Failover {
                id: 4,
                number: None,
                no_number: true,
                pbx: None,
                pbx_trunk_group: Some(5),
                no_pbx: false,
            })
        );
        assert_eq!(
            parse(&["did", "failover", "442071234567", "--number", "15550001111"]),
            AdminCommand::Did(DidCommand::Failover {
                number: "442071234567".into(),
                failover_number: Some("15550001111".into()),
                no_number: false,
            })
        );
        assert_eq!(
            parse(&["did", "failover", "442071234567", "--no-number"]),
            AdminCommand::Did(DidCommand::Failover {
                number: "442071234567".into(),
                failover_number: None,
                no_number: true,
            })
        );
        for conflicting in [
            &[
                "trunk-group",
                "failover",
                "1",
                "--number",
                "15550001111",
                "--no-number",
            ][..],
            &[
                "trunk-group",
                "failover",
                "1",
                "--pbx",
                "sip:a.example",
                "--no-pbx",
            ],
            &[
                "trunk-group",
                "failover",
                "1",
                "--pbx-trunk-group",
                "2",
                "--no-pbx",
            ],
            &[
                "trunk-group",
                "failover",
                "1",
                "--pbx",
                "sip:a.example",
                "--pbx-trunk-group",
                "2",
            ],
            &[
                "did",
                "failover",
                "15550001111",
                "--number",
                "15550002222",
                "--no-number",
            ],
        ] {
            let mut argv = vec!["admin"];
            argv.extend_from_slice(conflicting);
            let err = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{conflicting:?}"
            );
        }
        assert!(Cli::try_parse_from(["admin", "account", "remove", "x"]).is_err());
        assert!(Cli::try_parse_from(["admin", "trunk-group", "add", "--account", "1"]).is_err());
    }

    #[tokio::test]
    async fn a_whole_provisioning_round() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();

        let account = run_ok(&store, &["account", "add", "Acme Ltd"]).await;
        assert_eq!(account, "1\n");
        let listed = run_ok(&store, &["account", "list"]).await;
        let f = fields(listed.trim_end());
        assert_eq!(&f[..2], ["1", "Acme Ltd"]);
        assert!(f[2].ends_with('Z') && f[2].len() == 20, "{listed:?}");

        let tg = run_ok(
            &store,
            &[
                "trunk-group",
                "add",
                "--account",
                "1",
                "--name",
                "main office",
                "--username",
                "acme-main",
                "--password",
                "s3cret-pw",
            ],
        )
        .await;
        assert_eq!(tg, "1\n");
        let listed = run_ok(&store, &["trunk-group", "list"]).await;
        assert_eq!(listed.lines().count(), 1);
        let f = fields(listed.trim_end());
        assert_eq!(&f[..5], ["1", "1", "main office", "acme-main", "lifeline"]);
        assert!(!listed.contains("s3cret-pw"));
        assert_eq!(
            run_ok(&store, &["trunk-group", "list", "--account", "2"]).await,
            ""
        );

        assert_eq!(
            run_ok(
                &store,
                &["did", "add", "442071234567", "--trunk-group", "1"]
            )
            .await,
            "+442071234567\n"
        );
        let listed = run_ok(&store, &["did", "list"]).await;
        assert_eq!(&fields(listed.trim_end())[..2], ["+442071234567", "1"]);

        assert_eq!(
            run_ok(&store, &["trunk-group", "set-password", "1", "other"]).await,
            ""
        );

        let err = run_err(&store, &["trunk-group", "remove", "1"]).await;
        assert!(
            matches!(
                err,
                AdminError::Store(StoreError::TrunkGroupHasDids { id: 1, count: 1 })
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "trunk group 1 still has 1 DID(s); remove them first"
        );

        assert_eq!(
            run_ok(&store, &["did", "remove", "+442071234567"]).await,
            ""
        );
        assert_eq!(run_ok(&store, &["trunk-group", "remove", "1"]).await, "");
        assert_eq!(run_ok(&store, &["account", "remove", "1"]).await, "");
        assert_eq!(run_ok(&store, &["account", "list"]).await, "");
    }

    #[tokio::test]
    async fn failover_settings_are_set_shown_listed_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let acme = store.create_account("Acme").await.unwrap();
        let main = store
            .create_trunk_group(acme.id, "main", "acme-main", "pw", "lifeline")
            .await
            .unwrap();
        let backup = store
            .create_trunk_group(acme.id, "backup", "acme-backup", "pw", "lifeline")
            .await
            .unwrap();
        store.create_did("+442071234567", main.id).await.unwrap();
        let id = main.id.to_string();
        let show = async |store: &Store| run_ok(store, &["trunk-group", "failover", &id]).await;

        assert_eq!(show(&store).await, "-\t-\n");
        assert_eq!(
            run_ok(
                &store,
                &[
                    "trunk-group",
                    "failover",
                    &id,
                    "--number",
                    "15550002222",
                    "--pbx",
                    "SIP:Backup.Example.COM;transport=tcp",
                ]
            )
            .await,
            ""
        );
        assert_eq!(
            show(&store).await,
            "+15550002222\tsip:backup.example.com;transport=tcp\n"
        );
        let listed = run_ok(&store, &["trunk-group", "list"]).await;
        let first = fields(listed.lines().next().unwrap());
        assert_eq!(first.len(), 8, "{listed:?}");
        assert_eq!(
            &first[6..],
            ["+15550002222", "sip:backup.example.com;transport=tcp"]
        );
        let second = fields(listed.lines().nth(1).unwrap());
        assert_eq!(&second[6..], ["-", "-"]);

        // Only what is given changes.
        let backup_id = backup.id.to_string();
        run_ok(
            &store,
            &[
                "trunk-group",
                "failover",
                &id,
                "--pbx-trunk-group",
                &backup_id,
            ],
        )
        .await;
        assert_eq!(
            show(&store).await,
            format!("+15550002222\ttrunk-group:{backup_id}\n")
        );
        run_ok(&store, &["trunk-group", "failover", &id, "--no-number"]).await;
        assert_eq!(show(&store).await, format!("-\ttrunk-group:{backup_id}\n"));

        // A refused change leaves everything as it was, even the part that was fine.
        let err = run_err(
            &store,
            &[
                "trunk-group",
                "failover",
                &id,
                "--number",
                "15550003333",
                "--pbx",
                "http://x",
            ],
        )
        .await;
        assert!(
            matches!(
                err,
                AdminError::Store(StoreError::InvalidFailoverUri { .. })
            ),
            "{err:?}"
        );
        let err = run_err(
            &store,
            &["trunk-group", "failover", &id, "--number", "12", "--no-pbx"],
        )
        .await;
        assert!(
            matches!(err, AdminError::Store(StoreError::InvalidNumber { .. })),
            "{err:?}"
        );
        assert_eq!(show(&store).await, format!("-\ttrunk-group:{backup_id}\n"));

        run_ok(&store, &["trunk-group", "failover", &id, "--no-pbx"]).await;
        assert_eq!(show(&store).await, "-\t-\n");
        let err = run_err(&store, &["trunk-group", "failover", "99"]).await;
        assert_eq!(err.to_string(), "no trunk group with id 99");
        let err = run_err(&store, &["trunk-group", "failover", "99", "--no-pbx"]).await;
        assert_eq!(err.to_string(), "no trunk group with id 99");

        // DIDs.
        assert_eq!(
            run_ok(&store, &["did", "failover", "442071234567"]).await,
            "-\n"
        );
        run_ok(
            &store,
            &["did", "failover", "442071234567", "--number", "15550001111"],
        )
        .await;
        assert_eq!(
            run_ok(&store, &["did", "failover", "+442071234567"]).await,
            "+15550001111\n"
        );
        let listed = run_ok(&store, &["did", "list"]).await;
        let f = fields(listed.trim_end());
        assert_eq!(f.len(), 4, "{listed:?}");
        assert_eq!([f[0], f[1], f[3]], ["+442071234567", &id, "+15550001111"]);
        run_ok(&store, &["did", "failover", "442071234567", "--no-number"]).await;
        assert_eq!(
            run_ok(&store, &["did", "failover", "442071234567"]).await,
            "-\n"
        );
        let err = run_err(&store, &["did", "failover", "+15559999999"]).await;
        assert_eq!(err.to_string(), "no DID +15559999999");
        let err = run_err(&store, &["did", "failover", "15559999999", "--no-number"]).await;
        assert_eq!(err.to_string(), "no DID +15559999999");
    }

    #[tokio::test]
    async fn execute_returns_the_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let add = parse(&["account", "add", "Acme"]);
        assert_eq!(
            execute(
                add.clone(),
                &StoreLocation::Embedded(dir.path().to_owned()),
                "lifeline"
            )
            .await,
            0
        );
        assert_eq!(
            execute(
                add,
                &StoreLocation::Embedded(dir.path().to_owned()),
                "lifeline"
            )
            .await,
            1
        );
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.list_accounts().await.unwrap().len(), 1);
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            execute(
                parse(&["account", "list"]),
                &StoreLocation::Embedded(file.clone()),
                "lifeline"
            )
            .await,
            1
        );
    }

    #[tokio::test]
    async fn failures_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        run_ok(&store, &["account", "add", "Acme"]).await;
        let err = run_err(&store, &["account", "add", "Acme"]).await;
        assert_eq!(err.to_string(), "account name \"Acme\" is already taken");
        let err = run_err(&store, &["did", "add", "12", "--trunk-group", "1"]).await;
        assert_eq!(
            err.to_string(),
            "invalid phone number \"12\": E.164 numbers have 8 to 15 digits"
        );
        let err = run_err(
            &store,
            &["did", "add", "+15551234567", "--trunk-group", "9"],
        )
        .await;
        assert_eq!(err.to_string(), "no trunk group with id 9");
        let err = run_err(&store, &["account", "remove", "7"]).await;
        assert_eq!(err.to_string(), "no account with id 7");
    }

    #[test]
    fn parses_the_token_commands() {
        assert_eq!(
            parse(&["token", "create", "--operator"]),
            AdminCommand::Token(TokenCommand::Create {
                operator: true,
                account: None,
                trunk_group: None,
                label: String::new(),
            })
        );
        assert_eq!(
            parse(&[
                "token",
                "create",
                "--trunk-group",
                "4",
                "--label",
                "agent pbx1"
            ]),
            AdminCommand::Token(TokenCommand::Create {
                operator: false,
                account: None,
                trunk_group: Some(4),
                label: "agent pbx1".into(),
            })
        );
        assert_eq!(
            parse(&["token", "create", "--account", "3"]),
            AdminCommand::Token(TokenCommand::Create {
                operator: false,
                account: Some(3),
                trunk_group: None,
                label: String::new(),
            })
        );
        assert_eq!(
            parse(&["token", "list"]),
            AdminCommand::Token(TokenCommand::List { account: None })
        );
        assert_eq!(
            parse(&["token", "list", "--account", "3"]),
            AdminCommand::Token(TokenCommand::List { account: Some(3) })
        );
        assert_eq!(
            parse(&["token", "revoke", "5"]),
            AdminCommand::Token(TokenCommand::Revoke { id: 5 })
        );
        for (args, kind) in [
            (
                &["token", "create", "--operator", "--account", "1"][..],
                clap::error::ErrorKind::ArgumentConflict,
            ),
            (
                &["token", "create", "--account", "1", "--trunk-group", "2"],
                clap::error::ErrorKind::ArgumentConflict,
            ),
            (
                &["token", "create", "--label", "x"],
                clap::error::ErrorKind::MissingRequiredArgument,
            ),
            (
                &["token", "revoke", "x"],
                clap::error::ErrorKind::ValueValidation,
            ),
        ] {
            let mut argv = vec!["admin"];
            argv.extend_from_slice(args);
            assert_eq!(
                Cli::try_parse_from(argv).unwrap_err().kind(),
                kind,
                "{args:?}"
            );
        }
    }

    #[tokio::test]
    async fn tokens_are_created_listed_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let acme = store.create_account("Acme").await.unwrap();
        let globex = store.create_account("Globex").await.unwrap();
        let main = store
            .create_trunk_group(globex.id, "main", "globex-main", "pw", "lifeline")
            .await
            .unwrap();

        let created = |out: String| {
            let f: Vec<String> = fields(out.strip_suffix('\n').unwrap())
                .into_iter()
                .map(str::to_owned)
                .collect();
            assert_eq!(f.len(), 2, "{out:?}");
            assert!(f[1].starts_with("llt_") && f[1].len() == 47, "{out:?}");
            (f[0].parse::<TokenId>().unwrap(), f[1].clone())
        };
        let (op, op_secret) = created(run_ok(&store, &["token", "create", "--operator"]).await);
        let (acct, _) = created(
            run_ok(
                &store,
                &[
                    "token",
                    "create",
                    "--account",
                    &acme.id.to_string(),
                    "--label",
                    "portal",
                ],
            )
            .await,
        );
        let (agent, agent_secret) = created(
            run_ok(
                &store,
                &[
                    "token",
                    "create",
                    "--trunk-group",
                    &main.id.to_string(),
                    "--label",
                    "pbx 1",
                ],
            )
            .await,
        );
        assert_eq!(
            store
                .token_by_secret(&op_secret)
                .await
                .unwrap()
                .unwrap()
                .scope,
            TokenScope::Operator
        );
        assert_eq!(
            store
                .token_by_secret(&agent_secret)
                .await
                .unwrap()
                .unwrap()
                .scope,
            TokenScope::TrunkGroup {
                account: globex.id,
                trunk_group: main.id
            }
        );

        let listed = run_ok(&store, &["token", "list"]).await;
        let lines: Vec<Vec<&str>> = listed.lines().map(fields).collect();
        assert_eq!(lines.len(), 3, "{listed:?}");
        assert_eq!(lines[0][..3], [&*op.to_string(), "operator", "-"]);
        assert_eq!(
            lines[1][..3],
            [
                &*acct.to_string(),
                &*format!("account:{}", acme.id),
                "portal"
            ]
        );
        assert_eq!(
            lines[2][..3],
            [
                &*agent.to_string(),
                &*format!("trunk-group:{}", main.id),
                "pbx 1"
            ]
        );
        for l in &lines {
            assert_eq!(l.len(), 5);
            assert!(l[3].ends_with('Z') && l[3].len() == 20, "{l:?}");
            assert_eq!(l[4], "-");
        }
        assert!(!listed.contains("llt_"), "secrets are never listed");
        let theirs = run_ok(
            &store,
            &["token", "list", "--account", &globex.id.to_string()],
        )
        .await;
        assert_eq!(fields(theirs.trim_end())[0], agent.to_string());

        assert_eq!(
            run_ok(&store, &["token", "revoke", &agent.to_string()]).await,
            ""
        );
        assert_eq!(
            run_ok(&store, &["token", "revoke", &agent.to_string()]).await,
            ""
        );
        assert_eq!(store.token_by_secret(&agent_secret).await.unwrap(), None);
        let theirs = run_ok(
            &store,
            &["token", "list", "--account", &globex.id.to_string()],
        )
        .await;
        let f = fields(theirs.trim_end());
        assert!(f[4].ends_with('Z') && f[4].len() == 20, "{theirs:?}");

        let err = run_err(&store, &["token", "revoke", "99"]).await;
        assert_eq!(err.to_string(), "no API token with id 99");
        let err = run_err(&store, &["token", "create", "--trunk-group", "99"]).await;
        assert_eq!(err.to_string(), "no trunk group with id 99");
        let err = run_err(&store, &["token", "create", "--account", "99"]).await;
        assert_eq!(err.to_string(), "no account with id 99");
        let err = run_err(
            &store,
            &["token", "create", "--operator", "--label", "a\tb"],
        )
        .await;
        assert!(
            matches!(err, AdminError::Store(StoreError::InvalidName { .. })),
            "{err:?}"
        );
        assert_eq!(store.list_tokens(None).await.unwrap().len(), 3);
    }
}
