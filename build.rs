//! Re-embeds the SQL migrations when they change (sqlx::migrate! reads them at compile time),
//! and gives `--version` the git commit it was built from (`unknown` outside a checkout).
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8(out.stdout).ok())
        .flatten()
        .map(|s| s.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LIFELINE_COMMIT={commit}");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        // A path that does not exist would make cargo rebuild every time.
        for file in ["HEAD", "refs", "packed-refs"] {
            let path = format!("{dir}/{file}");
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
