#!/usr/bin/env python3
"""Bulk-generates a carrier's state for the benchmarks, straight into its SQLite files.

Provisioning a million DIDs through `lifeline-carrier admin` would take hours, so this writes
the rows with SQL, against the schema the carrier itself created (its migrations in
migrations/sqlite/ and migrations/bindings/ have run before: see `prepare_data_dir` in
harness.py), in one transaction per file. It respects every column and constraint:

- accounts, trunk_groups, dids as `Store` writes them: names non-empty and unique, usernames
  unique RFC 3261 tokens, HA1 = MD5 / SHA-256 of "username:realm:password" in lowercase hex
  under the carrier's realm, E.164 numbers ("+" and 8-15 digits, no leading 0), a failover PBX
  that is either a normalised sip: URI or another trunk group of the same account (never both,
  never itself), a DID never failing over to its own number; foreign keys are on while
  inserting, so SQLite checks them too;
- config_version: the schema's triggers stay in place and bump it once per inserted row,
  exactly as the admin command line would have;
- bindings (bindings.sqlite3): one UDP contact per trunk group for the first BINDINGS groups,
  unexpired (expires in an hour), in the columns' formats (`remote`/`local` as Rust writes
  socket addresses, `transport` the Via token).

Usage (also a module: `generate(...)`):
  bench/genstore.py DATA_DIR --accounts A --trunk-groups G --dids D --bindings B
      [--realm lifeline] [--local 127.0.216.1:5060] [--pbx-net 127.0.216]
The data folder must hold a store.sqlite3 made by the carrier with exactly one account (id 1)
and nothing else, and, when B > 0, a bindings.sqlite3 made by the carrier.
"""
import argparse
import hashlib
import os
import sqlite3
import sys
import time


def ha1(alg, username, realm, password):
    return alg(f"{username}:{realm}:{password}".encode()).hexdigest()


def username(j):
    """Trunk group j's SIP username; its password is password(j)."""
    return f"bench{j}"


def password(j):
    return f"pw{j}"


def did_number(n):
    """The n-th DID (n from 0): +1800 and 7 digits, up to 10 million."""
    return f"+1800{n:07d}"


def generate(data_dir, accounts, trunk_groups, dids, bindings, realm="lifeline",
             local="127.0.216.1:5060", pbx_net="127.0.216", failover_mix=True):
    """Fills the store (and the bindings file when `bindings` > 0). Returns a dict of counts
    and the seconds it took."""
    if trunk_groups < 1 or accounts < 1 or accounts > trunk_groups:
        raise ValueError("need 1 <= accounts <= trunk_groups")
    if bindings > trunk_groups:
        raise ValueError("at most one binding per trunk group")
    if dids > 10_000_000:
        raise ValueError("at most 10 million DIDs")
    started = time.monotonic()
    now = int(time.time())
    now_ms = int(time.time() * 1000)
    per_account = -(-trunk_groups // accounts)  # ceiling

    db = sqlite3.connect(os.path.join(data_dir, "store.sqlite3"), isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 5000")
    (existing_accounts,) = db.execute("SELECT count(*) FROM accounts").fetchone()
    (existing_groups,) = db.execute("SELECT count(*) FROM trunk_groups").fetchone()
    if existing_accounts != 1 or existing_groups != 0:
        raise RuntimeError(f"{data_dir}: expected a fresh store with one account, found "
                           f"{existing_accounts} accounts and {existing_groups} trunk groups")
    (version_before,) = db.execute("SELECT version FROM config_version WHERE id = 1").fetchone()
    db.execute("BEGIN IMMEDIATE")
    try:
        # Account 1 exists (the carrier made the store with it); the others follow.
        db.executemany("INSERT INTO accounts (id, name, created_at) VALUES (?, ?, ?)",
                       ((a, f"bench-account-{a}", now) for a in range(2, accounts + 1)))

        def account_of(j):
            return (j - 1) // per_account + 1

        def group_rows():
            for j in range(1, trunk_groups + 1):
                user = username(j)
                number = uri = fallback_group = None
                if failover_mix:
                    # Half the groups have a global failover number; one in five a failover PBX
                    # by address; one in five (the one after it, same account) another trunk group.
                    if j % 2 == 0:
                        number = f"+1555{j:07d}"
                    if j % 5 == 1:
                        uri = f"sip:192.0.2.{j % 250 + 1}:5060"
                    elif j % 5 == 2 and account_of(j - 1) == account_of(j):
                        fallback_group = j - 1
                yield (j, account_of(j), f"tg{j}", user, realm,
                       ha1(hashlib.md5, user, realm, password(j)),
                       ha1(hashlib.sha256, user, realm, password(j)), now,
                       number, uri, fallback_group)

        # Insert in id order: a group's failover PBX group (j - 1) always exists already.
        db.executemany(
            "INSERT INTO trunk_groups (id, account_id, name, username, realm, ha1_md5, ha1_sha256, "
            "created_at, failover_number, failover_pbx_uri, failover_pbx_trunk_group) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", group_rows())

        def did_rows():
            for n in range(dids):
                # Spread evenly: DID n belongs to group n % G + 1; one in ten has its own
                # failover number (never its own number: +1666... is not a DID).
                own = f"+1666{n:07d}" if failover_mix and n % 10 == 0 else None
                yield (did_number(n), n % trunk_groups + 1, now, own)

        db.executemany("INSERT INTO dids (number, trunk_group_id, created_at, failover_number) "
                       "VALUES (?, ?, ?, ?)", did_rows())
        problems = db.execute("PRAGMA foreign_key_check").fetchall()
        if problems:
            raise RuntimeError(f"foreign key check failed: {problems[:5]}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    (version_after,) = db.execute("SELECT version FROM config_version WHERE id = 1").fetchone()
    expected = version_before + (accounts - 1) + trunk_groups + dids
    if version_after != expected:
        raise RuntimeError(f"config_version is {version_after}, expected {expected}")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()

    if bindings:
        bdb = sqlite3.connect(os.path.join(data_dir, "bindings.sqlite3"), isolation_level=None)
        bdb.execute("PRAGMA busy_timeout = 5000")
        expires = now_ms + 3600 * 1000

        def binding_rows():
            for j in range(1, bindings + 1):
                # Contacts spread over 240 addresses and 400 ports of the case's own /24.
                addr = f"{pbx_net}.{10 + j % 240}:{10000 + (j // 240) % 400}"
                yield (j, f"sip:{username(j)}@{addr}", "", None, expires, f"bench-{j}@genstore", 2,
                       "UDP", addr, local, "lifeline-bench", now_ms)

        bdb.execute("BEGIN IMMEDIATE")
        try:
            bdb.executemany(
                "INSERT INTO bindings (trunk_group, contact, contact_params, q, expires_at_ms, "
                "call_id, cseq, transport, remote, local, user_agent, registered_at_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", binding_rows())
            bdb.execute("COMMIT")
        except BaseException:
            bdb.execute("ROLLBACK")
            raise
        bdb.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        bdb.close()
    return {"accounts": accounts, "trunk_groups": trunk_groups, "dids": dids,
            "bindings": bindings, "config_version": version_after,
            "seconds": time.monotonic() - started}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir")
    p.add_argument("--accounts", type=int, default=1)
    p.add_argument("--trunk-groups", type=int, required=True)
    p.add_argument("--dids", type=int, default=0)
    p.add_argument("--bindings", type=int, default=0)
    p.add_argument("--realm", default="lifeline")
    p.add_argument("--local", default="127.0.216.1:5060")
    p.add_argument("--pbx-net", default="127.0.216")
    p.add_argument("--no-failover", action="store_true", help="no failover settings at all")
    a = p.parse_args()
    done = generate(a.data_dir, a.accounts, a.trunk_groups, a.dids, a.bindings, a.realm,
                    a.local, a.pbx_net, not a.no_failover)
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in done.items()))


if __name__ == "__main__":
    sys.exit(main())
