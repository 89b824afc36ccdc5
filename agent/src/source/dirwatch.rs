//! Change notifications for the manifest directory: inotify (through the `notify` crate) wakes
//! the agent when a manifest file is written, renamed into place or removed, so a change is
//! read at once instead of at the next poll.
//!
//! The notifications only say *that* the directory should be read again;
//! [`super::manifests::ManifestDir::poll`] finds out what changed. Events of files the agent does
//! not read (hidden files such as an editor's or an atomic writer's temporary file, other
//! extensions) and events that change no content (opened, read, attributes) do not wake it.
//! When the directory cannot be watched (it does not exist yet, inotify limits) or the watch is
//! lost (the directory was removed or moved away), [`DirWatch::watching`] says so and the agent
//! falls back to reading the directory periodically, trying to watch it again each time.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use notify::{
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::manifests::is_manifest_path;

/// An inotify watch of one manifest directory.
pub struct DirWatch {
    dir: PathBuf,
    watcher: Option<RecommendedWatcher>,
    wake: Arc<Notify>,
    lost: Arc<AtomicBool>,
    /// Whether the last failure to watch was logged (logged once until the watch works again).
    failure_logged: bool,
}

impl DirWatch {
    /// Starts watching `dir`; when that fails, [`Self::watching`] is false and
    /// [`Self::rewatch`] tries again.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let mut w = Self {
            dir: dir.into(),
            watcher: None,
            wake: Arc::new(Notify::new()),
            lost: Arc::new(AtomicBool::new(false)),
            failure_logged: false,
        };
        w.rewatch();
        w
    }

    /// Whether change notifications arrive (the directory is watched and the watch is intact).
    pub fn watching(&self) -> bool {
        self.watcher.is_some() && !self.lost.load(Ordering::Relaxed)
    }

    /// Watches the directory again if it is not watched; true when a new watch was set up (the
    /// caller reads the directory then: changes made while it was not watched have no event).
    pub fn rewatch(&mut self) -> bool {
        if self.watching() {
            return false;
        }
        self.watcher = None;
        self.lost.store(false, Ordering::Relaxed);
        let (wake, lost, dir) = (self.wake.clone(), self.lost.clone(), self.dir.clone());
        let made = notify::recommended_watcher(move |ev: notify::Result<Event>| match ev {
            Ok(ev) => {
                let gone = watch_lost(&dir, &ev);
                if gone {
                    lost.store(true, Ordering::Relaxed);
                }
                if gone || wakes(&ev) {
                    wake.notify_one();
                }
            }
            // An error of the backend (e.g. the event queue overflowed): read everything.
            Err(_) => wake.notify_one(),
        })
        .and_then(|mut w| w.watch(&self.dir, RecursiveMode::NonRecursive).map(|()| w));
        match made {
            Ok(w) => {
                self.watcher = Some(w);
                if self.failure_logged {
                    info!(dir = %self.dir.display(), "watching the manifest directory again");
                }
                self.failure_logged = false;
                true
            }
            Err(e) => {
                if !self.failure_logged {
                    warn!(dir = %self.dir.display(), error = %e, "cannot watch the manifest directory: reading it every --poll-interval-ms until it can be watched");
                    self.failure_logged = true;
                }
                false
            }
        }
    }

    /// Resolves when the directory changed since the last call (at once when it changed in
    /// between); never while the directory is not watched. Cancel-safe.
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether an event means the directory must be read again.
fn wakes(ev: &Event) -> bool {
    if ev.need_rescan() {
        return true;
    }
    match ev.kind {
        // A rename of any entry: also the symlink swap of a ConfigMap volume (`..data`), whose
        // manifest names stay the same while their content changes.
        EventKind::Modify(ModifyKind::Name(_)) => true,
        // Closed after writing: the usual end of a write.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => any_manifest(ev),
        EventKind::Access(_) => false,
        // Written to (still open: its close follows) or attributes: no new content yet.
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_)) => false,
        // Created or removed.
        _ => any_manifest(ev),
    }
}

fn any_manifest(ev: &Event) -> bool {
    ev.paths.iter().any(|p| is_manifest_path(p))
}

/// Whether the event says the watched directory itself went away or moved (the inotify watch
/// follows the old directory, so it must be set up again).
fn watch_lost(dir: &Path, ev: &Event) -> bool {
    matches!(ev.kind, EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)))
        && ev.paths.iter().any(|p| p == dir)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use notify::event::{CreateKind, DataChange, RemoveKind, RenameMode};

    use super::*;

    fn ev(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn which_events_wake() {
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(wakes(&ev(closed, "/m/web.yaml")));
        assert!(wakes(&ev(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "/m/web.json")));
        assert!(wakes(&ev(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "/m/..data")));
        assert!(wakes(&ev(EventKind::Remove(RemoveKind::File), "/m/web.yml")));
        assert!(wakes(&ev(EventKind::Create(CreateKind::File), "/m/web.yaml")));
        // Not yet complete, or no content change.
        assert!(!wakes(&ev(EventKind::Modify(ModifyKind::Data(DataChange::Any)), "/m/web.yaml")));
        assert!(!wakes(&ev(EventKind::Access(AccessKind::Open(AccessMode::Any)), "/m/web.yaml")));
        // Files the agent does not read.
        assert!(!wakes(&ev(closed, "/m/.web.yaml.tmp")));
        assert!(!wakes(&ev(closed, "/m/notes.txt")));
        // The queue overflowed: read everything.
        let mut rescan = Event::new(EventKind::Other);
        rescan = rescan.set_flag(notify::event::Flag::Rescan);
        assert!(wakes(&rescan));
        assert!(watch_lost(Path::new("/m"), &ev(EventKind::Remove(RemoveKind::Folder), "/m")));
        assert!(!watch_lost(
            Path::new("/m"),
            &ev(EventKind::Remove(RemoveKind::File), "/m/a.yaml")
        ));
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    async fn woken(w: &DirWatch) -> bool {
        tokio::time::timeout(Duration::from_secs(5), w.changed()).await.is_ok()
    }

    /// Real inotify: a manifest written in place and one renamed into place wake the watcher, a
    /// hidden temporary file does not; a directory that appears later is watched once it exists,
    /// and a removed directory is noticed.
    #[tokio::test]
    async fn wakes_on_real_changes() {
        let tmp =
            TempDir(std::env::temp_dir().join(format!("kproxy-dirwatch-{}", std::process::id())));
        let dir = tmp.0.join("m");
        let mut w = DirWatch::new(&dir);
        assert!(!w.watching(), "no directory yet");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(w.rewatch());
        assert!(w.watching());

        std::fs::write(dir.join(".x.tmp"), "{}").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w.changed()).await.is_err(),
            "a hidden file woke the watcher"
        );
        std::fs::rename(dir.join(".x.tmp"), dir.join("x.json")).unwrap();
        assert!(woken(&w).await, "rename into place");
        std::fs::write(dir.join("web.yaml"), "kind: List\n").unwrap();
        assert!(woken(&w).await, "written in place");

        std::fs::remove_dir_all(&dir).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while w.watching() {
            assert!(std::time::Instant::now() < deadline, "removed directory not noticed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!w.rewatch(), "nothing to watch");
    }
}
