//! Notices when a file changes, for reloading the agent's configuration.
//!
//! The file's folder is watched, not the file: editors and configuration tools replace a file
//! by writing a new one and renaming it over the old, which a watch on the old file (its
//! inode) would not see. Events are kept for the file's name only, and a burst of them (one
//! save is several: truncate, write, close, rename) is one notification once it settles.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, MetadataKind, ModifyKind};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, warn};

/// Why a file cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{path}: not a file name")]
    NoFileName { path: PathBuf },
    #[error("cannot watch {folder}: {source}")]
    Notify {
        folder: PathBuf,
        source: notify::Error,
    },
    #[error("file watching needs a Tokio runtime")]
    NoRuntime,
}

/// A burst of events settles at the latest after this many `debounce` periods, so a file that
/// is written without pause is still reloaded now and then.
const MAX_SETTLE_PERIODS: u32 = 10;

/// Watches `path`: one `()` is sent after each change once no event about the file came for
/// `debounce` (a burst is one message; one not yet received absorbs the next). Creating,
/// writing, renaming over, renaming away and removing the file all count; reading it does not.
///
/// The folder must exist; the file need not. The watch lasts while the receiver does (a task
/// on the current Tokio runtime owns it and ends when the receiver is dropped).
pub fn watch(path: &Path, debounce: Duration) -> Result<mpsc::Receiver<()>, WatchError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| WatchError::NoRuntime)?;
    let name: OsString = path
        .file_name()
        .ok_or_else(|| WatchError::NoFileName {
            path: path.to_owned(),
        })?
        .to_owned();
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let events = Arc::new(Notify::new());
    let handler = {
        let events = events.clone();
        let name = name.clone();
        move |result: notify::Result<Event>| match result {
            Ok(event) if concerns(&event, &name) => events.notify_one(),
            Ok(_) => {}
            Err(e) => {
                // Whatever was lost may have been about the file: reread it.
                warn!(error = %e, "file watch error");
                events.notify_one();
            }
        }
    };
    let notify_error = |source| WatchError::Notify {
        folder: folder.clone(),
        source,
    };
    let mut watcher = notify::recommended_watcher(handler).map_err(notify_error)?;
    watcher
        .watch(&folder, RecursiveMode::NonRecursive)
        .map_err(notify_error)?;
    let (tx, rx) = mpsc::channel(1);
    debug!(folder = %folder.display(), file = ?name, "watching for changes");
    runtime.spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        run(events, tx, debounce).await;
    });
    Ok(rx)
}

/// Whether `event` may have changed the file named `name`.
fn concerns(event: &Event, name: &OsStr) -> bool {
    let relevant = match &event.kind {
        // Opening or reading it (the agent itself, on reload) changes nothing; closing it
        // after writing does.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        _ => true,
    };
    // A rescan (the kernel's queue overflowed) names no path: anything may have changed.
    relevant && (event.need_rescan() || event.paths.iter().any(|p| p.file_name() == Some(name)))
}

/// Turns event signals into settled notifications until the receiver is dropped.
async fn run(events: Arc<Notify>, tx: mpsc::Sender<()>, debounce: Duration) {
    loop {
        tokio::select! {
            () = events.notified() => {}
            () = tx.closed() => return,
        }
        let limit = Instant::now() + debounce * MAX_SETTLE_PERIODS;
        loop {
            let quiet_until = (Instant::now() + debounce).min(limit);
            tokio::select! {
                () = events.notified() => {
                    if Instant::now() >= limit {
                        break;
                    }
                }
                () = tokio::time::sleep_until(quiet_until) => break,
                () = tx.closed() => return,
            }
        }
        match tx.try_send(()) {
            // Full: a notification not yet received covers this change too.
            Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
            Err(mpsc::error::TrySendError::Closed(())) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const DEBOUNCE: Duration = Duration::from_millis(150);
    /// Long enough for a loaded machine; waits end as soon as a message comes.
    const DEADLINE: Duration = Duration::from_secs(20);
    /// How long "nothing more" is watched for.
    const QUIET: Duration = Duration::from_millis(1000);

    async fn notified(rx: &mut mpsc::Receiver<()>, what: &str) {
        match tokio::time::timeout(DEADLINE, rx.recv()).await {
            Ok(Some(())) => {}
            Ok(None) => panic!("the watch ended before {what}"),
            Err(_) => panic!("no notification for {what}"),
        }
    }

    async fn quiet(rx: &mut mpsc::Receiver<()>, what: &str) {
        if let Ok(m) = tokio::time::timeout(QUIET, rx.recv()).await {
            panic!("unexpected notification after {what}: {m:?}");
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        fs::write(&path, "[agent]\n").unwrap();
        (dir, path)
    }

    #[tokio::test]
    async fn a_write_is_one_notification() {
        let (_dir, path) = setup();
        let mut rx = watch(&path, DEBOUNCE).unwrap();
        fs::write(&path, "[agent]\nusername = \"a\"\n").unwrap();
        notified(&mut rx, "a write").await;
        quiet(&mut rx, "one write").await;
    }

    #[tokio::test]
    async fn a_replacement_by_rename_is_noticed() {
        let (dir, path) = setup();
        let mut rx = watch(&path, DEBOUNCE).unwrap();
        let tmp = dir.path().join(".agent.toml.swp");
        fs::write(&tmp, "[agent]\nusername = \"b\"\n").unwrap();
        fs::rename(&tmp, &path).unwrap();
        notified(&mut rx, "a rename over the file").await;
        quiet(&mut rx, "one rename").await;
        // The new file (another inode) is still watched.
        fs::write(&path, "[agent]\nusername = \"c\"\n").unwrap();
        notified(&mut rx, "a write to the new file").await;
    }

    #[tokio::test]
    async fn quick_writes_are_one_notification() {
        let (_dir, path) = setup();
        // Writes 30 ms apart, received as they come: without the debounce each would be one.
        let debounce = Duration::from_millis(400);
        let mut rx = watch(&path, debounce).unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0..8 {
                fs::write(&path, format!("[agent]\n# {i}\n")).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        notified(&mut rx, "the writes").await;
        writer.join().unwrap();
        quiet(&mut rx, "a burst of writes").await;
    }

    #[tokio::test]
    async fn other_files_and_reads_are_ignored() {
        let (dir, path) = setup();
        let mut rx = watch(&path, DEBOUNCE).unwrap();
        let other = dir.path().join("agent.toml.bak");
        fs::write(&other, "x").unwrap();
        fs::rename(&other, dir.path().join("notes.txt")).unwrap();
        fs::remove_file(dir.path().join("notes.txt")).unwrap();
        // Reading the file (what a reload does) is not a change.
        assert_eq!(fs::read_to_string(&path).unwrap(), "[agent]\n");
        quiet(&mut rx, "edits to other files and a read").await;
        // The watch still works.
        fs::write(&path, "[agent]\n# changed\n").unwrap();
        notified(&mut rx, "a write after the others").await;
    }

    #[tokio::test]
    async fn a_file_created_later_and_a_removal_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let mut rx = watch(&path, DEBOUNCE).unwrap();
        fs::write(&path, "[agent]\n").unwrap();
        notified(&mut rx, "the file's creation").await;
        fs::remove_file(&path).unwrap();
        notified(&mut rx, "the file's removal").await;
    }

    #[tokio::test]
    async fn a_missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = watch(&dir.path().join("nope/agent.toml"), DEBOUNCE).unwrap_err();
        assert!(matches!(err, WatchError::Notify { .. }), "{err:?}");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn needs_a_runtime() {
        let (_dir, path) = setup();
        assert!(matches!(watch(&path, DEBOUNCE), Err(WatchError::NoRuntime)));
    }
}
