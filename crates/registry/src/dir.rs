//! The `dir:PATH` backend: one JSON file per object, `PATH/<kind>/<name>.json`.
//!
//! Meant for one machine (a test harness running N nodes, a single-node cluster, a shared
//! filesystem): several processes may point at the same directory.
//!
//! - Writes are atomic: the value goes to a dotted temp file in the same directory, is fsynced,
//!   then renamed over `<name>.json` (and the directory fsynced), so readers see the old or the
//!   new file, never half of one.
//! - Dotfiles (including our temp files `.<name>.json.tmp.*`) are ignored; other files that are
//!   not `<valid-name>.json` are logged once and ignored.
//! - Watches use inotify (via `notify`) to notice changes within milliseconds, plus a periodic
//!   full rescan (default every 2 s) in case inotify is unavailable or misses something. Both
//!   trigger the same diffing scan against the last content seen, so each change is emitted once
//!   and unchanged files produce nothing.
//! - Revisions are a per-process counter: `watch(from)` ignores `from` and always begins with a
//!   `Reset`.
//! - If the collection directory disappears (or cannot be read) the watch reports
//!   `Status(Unreachable)` and emits no deletes; when it is back, `Status(Connected)` and a fresh
//!   `Reset` follow. `put` recreates the directory.

use crate::{check_object_name, Connectivity, Kind, RawEvent, Registry, RegistryError, Revision};
use crate::{Snapshot, WatchStream, MAX_OBJECT_BYTES};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

/// Tuning for the `dir` backend's watches.
#[derive(Debug, Clone)]
pub struct DirOptions {
    /// Full rescan period, the fallback when inotify misses a change. Default 2 s.
    pub rescan_interval: Duration,
    /// Use inotify for prompt change detection. Default true; tests turn it off to exercise the
    /// rescan fallback.
    pub inotify: bool,
    /// After an inotify event, wait this long for more before scanning. Default 25 ms.
    pub debounce: Duration,
}

impl Default for DirOptions {
    fn default() -> Self {
        DirOptions {
            rescan_interval: Duration::from_secs(2),
            inotify: true,
            debounce: Duration::from_millis(25),
        }
    }
}

/// The `dir:PATH` registry.
#[derive(Debug)]
pub struct DirRegistry {
    root: PathBuf,
    options: DirOptions,
    revision: Arc<AtomicU64>,
}

/// Distinguishes temp files written by the same process (several registries may share a pid).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn next_revision(counter: &AtomicU64) -> Revision {
    Revision(counter.fetch_add(1, Ordering::Relaxed) + 1)
}

impl DirRegistry {
    /// Opens (creating if needed) the registry rooted at `root`, with default options.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        Self::open_with(root, DirOptions::default())
    }

    pub fn open_with(root: impl Into<PathBuf>, options: DirOptions) -> Result<Self, RegistryError> {
        let root = root.into();
        for kind in Kind::ALL {
            let dir = root.join(kind.as_str());
            fs::create_dir_all(&dir).map_err(|e| RegistryError::io("creating", &dir, e))?;
        }
        Ok(DirRegistry {
            root,
            options,
            revision: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn kind_dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.as_str())
    }

    fn object_path(&self, kind: Kind, name: &str) -> Result<PathBuf, RegistryError> {
        check_object_name(kind, name)?;
        Ok(self.kind_dir(kind).join(format!("{name}.json")))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Internal(format!("blocking file task failed: {e}")))?
}

/// Writes `value` to `path` atomically: temp file in the same directory, fsync, rename, fsync dir.
fn atomic_write(dir: &Path, name: &str, path: &Path, value: &[u8]) -> Result<(), RegistryError> {
    fs::create_dir_all(dir).map_err(|e| RegistryError::io("creating", dir, e))?;
    let tmp = dir.join(format!(
        ".{name}.json.tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| RegistryError::io("creating", &tmp, e))?;
        f.write_all(value)
            .map_err(|e| RegistryError::io("writing", &tmp, e))?;
        f.sync_all()
            .map_err(|e| RegistryError::io("syncing", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| RegistryError::io("renaming into place", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir);
    Ok(())
}

/// Makes a rename or unlink durable. Failure only costs durability across a crash, so it is
/// logged rather than returned.
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        debug!(dir = %dir.display(), error = %e, "fsync of registry directory failed");
    }
}

/// Reads a file and the metadata of the very file read. `Ok(None)` if it does not exist.
fn read_object(path: &Path) -> io::Result<Option<(FileId, Vec<u8>)>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_OBJECT_BYTES as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} bytes, more than the limit of {MAX_OBJECT_BYTES}",
                meta.len()
            ),
        ));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // Read one byte past the limit so a file that grew after fstat is still caught.
    f.take(MAX_OBJECT_BYTES as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > MAX_OBJECT_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "file too large"));
    }
    Ok(Some((FileId::of(&meta), buf)))
}

/// What a file name in a collection directory means.
enum Entry {
    /// `<valid-name>.json`
    Object(String),
    /// Dotfiles, including our temp files: silently ignored.
    Hidden,
    /// Anything else: logged once, ignored.
    Foreign(String),
}

fn classify(kind: Kind, file_name: &std::ffi::OsStr) -> Entry {
    let Some(s) = file_name.to_str() else {
        return Entry::Foreign(file_name.to_string_lossy().into_owned());
    };
    if s.starts_with('.') {
        return Entry::Hidden;
    }
    match s.strip_suffix(".json") {
        Some(stem) if check_object_name(kind, stem).is_ok() => Entry::Object(stem.to_string()),
        _ => Entry::Foreign(s.to_string()),
    }
}

/// The lock file of a collection directory taken by [`Registry::put_if_unchanged`] (hidden, so
/// never taken for an object).
const LOCK_FILE: &str = ".lock";

/// A digest of a listing (names and contents) for [`Snapshot`]: 64-bit FNV-1a over the
/// length-prefixed names and values, the same in every process and build.
fn listing_digest(items: &[(String, Vec<u8>)]) -> Snapshot {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (name, value) in items {
        eat(name.as_bytes());
        eat(value);
    }
    Snapshot(h)
}

/// Lists a collection directory: every valid object with its content.
fn list_dir(kind: Kind, dir: &Path) -> Result<Vec<(String, Vec<u8>)>, RegistryError> {
    let rd = fs::read_dir(dir).map_err(|e| RegistryError::io("listing", dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| RegistryError::io("listing", dir, e))?;
        let Entry::Object(name) = classify(kind, &entry.file_name()) else {
            continue;
        };
        match read_object(&entry.path()) {
            Ok(Some((_, value))) => out.push((name, value)),
            Ok(None) => {} // deleted since the listing
            Err(e) => {
                warn!(file = %entry.path().display(), error = %e, "skipping unreadable registry file")
            }
        }
    }
    out.sort();
    Ok(out)
}

#[async_trait::async_trait]
impl Registry for DirRegistry {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    fn location(&self, kind: Kind, name: &str) -> String {
        self.kind_dir(kind)
            .join(format!("{name}.json"))
            .display()
            .to_string()
    }

    async fn put(&self, kind: Kind, name: &str, value: &[u8]) -> Result<Revision, RegistryError> {
        let path = self.object_path(kind, name)?;
        if value.len() > MAX_OBJECT_BYTES {
            return Err(RegistryError::TooLarge {
                kind,
                name: name.to_string(),
                size: value.len(),
            });
        }
        let dir = self.kind_dir(kind);
        let (name_owned, value) = (name.to_string(), value.to_vec());
        blocking(move || atomic_write(&dir, &name_owned, &path, &value)).await?;
        Ok(next_revision(&self.revision))
    }

    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let path = self.object_path(kind, name)?;
        blocking(move || {
            read_object(&path)
                .map(|o| o.map(|(_, v)| v))
                .map_err(|e| RegistryError::io("reading", &path, e))
        })
        .await
    }

    async fn delete(&self, kind: Kind, name: &str) -> Result<bool, RegistryError> {
        let path = self.object_path(kind, name)?;
        let dir = self.kind_dir(kind);
        let existed = blocking(move || match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&dir);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RegistryError::io("deleting", &path, e)),
        })
        .await?;
        if existed {
            next_revision(&self.revision);
        }
        Ok(existed)
    }

    async fn list(&self, kind: Kind) -> Result<(Vec<(String, Vec<u8>)>, Revision), RegistryError> {
        let dir = self.kind_dir(kind);
        let items = blocking(move || list_dir(kind, &dir)).await?;
        Ok((items, next_revision(&self.revision)))
    }

    async fn list_for_update(
        &self,
        kind: Kind,
    ) -> Result<(Vec<(String, Vec<u8>)>, Snapshot), RegistryError> {
        let dir = self.kind_dir(kind);
        let items = blocking(move || list_dir(kind, &dir)).await?;
        let snapshot = listing_digest(&items);
        Ok((items, snapshot))
    }

    async fn put_if_unchanged(
        &self,
        kind: Kind,
        name: &str,
        value: &[u8],
        snapshot: Snapshot,
    ) -> Result<bool, RegistryError> {
        let path = self.object_path(kind, name)?;
        if value.len() > MAX_OBJECT_BYTES {
            return Err(RegistryError::TooLarge {
                kind,
                name: name.to_string(),
                size: value.len(),
            });
        }
        let dir = self.kind_dir(kind);
        let (name_owned, value) = (name.to_string(), value.to_vec());
        let written = blocking(move || {
            // Every writer of this path takes the collection's lock, so list + compare + write
            // is one step for all processes sharing the directory.
            let lock_path = dir.join(LOCK_FILE);
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| RegistryError::io("opening", &lock_path, e))?;
            lock.lock()
                .map_err(|e| RegistryError::io("locking", &lock_path, e))?;
            if listing_digest(&list_dir(kind, &dir)?) != snapshot {
                return Ok(false);
            }
            atomic_write(&dir, &name_owned, &path, &value)?;
            Ok(true)
        })
        .await?;
        if written {
            next_revision(&self.revision);
        }
        Ok(written)
    }

    async fn watch(
        &self,
        kind: Kind,
        _from: Option<Revision>,
    ) -> Result<WatchStream, RegistryError> {
        let (tx, rx) = mpsc::channel(64);
        let poke = Arc::new(Notify::new());
        let scanner = Arc::new(Mutex::new(Scanner::new(
            kind,
            self.kind_dir(kind),
            self.revision.clone(),
        )));
        // Arm inotify before the first scan so nothing written in between is missed.
        let fs_watch = if self.options.inotify {
            FsWatch::arm(&self.kind_dir(kind), &poke)
        } else {
            None
        };
        let first = rescan(&scanner).await?;
        for ev in first {
            // The receiver is still ours, so this cannot fail; ignore it if it somehow does.
            let _ = tx.send(ev).await;
        }
        info!(registry = %self.describe(), %kind, inotify = fs_watch.is_some(), "watching registry");
        tokio::spawn(run_watch(
            scanner,
            tx,
            poke,
            fs_watch,
            self.options.clone(),
            self.kind_dir(kind),
        ));
        Ok(WatchStream::new(rx))
    }
}

async fn rescan(scanner: &Arc<Mutex<Scanner>>) -> Result<Vec<RawEvent>, RegistryError> {
    let s = scanner.clone();
    tokio::task::spawn_blocking(move || {
        // A panic in an earlier scan poisons the lock; the cache is still consistent enough to
        // continue (at worst an event is repeated), which beats ending the watch.
        let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
        guard.rescan()
    })
    .await
    .map_err(|e| RegistryError::Internal(format!("registry scan task failed: {e}")))
}

/// An inotify watch on one directory. It dies with the directory (which may come back with the
/// same inode number), so the watch loop re-arms it when an event concerns the directory itself
/// or the directory's identity changes.
struct FsWatch {
    _watcher: notify::RecommendedWatcher,
    dir_id: (u64, u64),
    /// Set by the event handler when the directory itself was removed, moved or changed.
    stale: Arc<AtomicBool>,
}

fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

impl FsWatch {
    fn arm(dir: &Path, poke: &Arc<Notify>) -> Option<FsWatch> {
        use notify::{EventKind, RecursiveMode, Watcher};
        let dir_id = dir_identity(dir)?;
        let stale = Arc::new(AtomicBool::new(false));
        let (p, st, d) = (poke.clone(), stale.clone(), dir.to_path_buf());
        let handler = move |res: notify::Result<notify::Event>| {
            match &res {
                // Our own scans open and read files; those must not trigger more scans.
                Ok(ev) if matches!(ev.kind, EventKind::Access(_)) => return,
                Ok(ev) if ev.paths.contains(&d) => st.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(_) => st.store(true, Ordering::Relaxed),
            }
            p.notify_one();
        };
        let result = notify::recommended_watcher(handler)
            .and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|()| w));
        match result {
            Ok(w) => Some(FsWatch {
                _watcher: w,
                dir_id,
                stale,
            }),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "inotify unavailable; relying on periodic rescans");
                None
            }
        }
    }
}

/// Re-arms inotify if it is missing or its directory is gone. `check_identity` also stats the
/// directory (done on the periodic tick only).
fn maintain_fs_watch(
    fs_watch: &mut Option<FsWatch>,
    dir: &Path,
    poke: &Arc<Notify>,
    check_identity: bool,
) {
    let needed = match fs_watch {
        None => check_identity,
        Some(w) => {
            w.stale.load(Ordering::Relaxed)
                || (check_identity && dir_identity(dir) != Some(w.dir_id))
        }
    };
    if needed && dir_identity(dir).is_some() {
        debug!(dir = %dir.display(), "re-arming inotify on registry directory");
        *fs_watch = FsWatch::arm(dir, poke);
    }
}

async fn run_watch(
    scanner: Arc<Mutex<Scanner>>,
    tx: mpsc::Sender<RawEvent>,
    poke: Arc<Notify>,
    mut fs_watch: Option<FsWatch>,
    options: DirOptions,
    dir: PathBuf,
) {
    let mut tick = tokio::time::interval(options.rescan_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the initial scan is already done
    loop {
        let periodic = tokio::select! {
            _ = tx.closed() => break,
            _ = poke.notified() => {
                tokio::time::sleep(options.debounce).await;
                false
            }
            _ = tick.tick() => true,
        };
        if options.inotify {
            maintain_fs_watch(&mut fs_watch, &dir, &poke, periodic);
        }
        let events = match rescan(&scanner).await {
            Ok(events) => events,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "registry scan failed; retrying on next tick");
                continue;
            }
        };
        for ev in events {
            if tx.send(ev).await.is_err() {
                debug!(dir = %dir.display(), "registry watch dropped; stopping");
                return;
            }
        }
    }
    debug!(dir = %dir.display(), "registry watch dropped; stopping");
}

/// Identity of one version of a file. Atomic writes create a new inode, so any change shows up
/// here; content is still compared before an event is emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(m: &fs::Metadata) -> Self {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone)]
struct Cached {
    id: FileId,
    value: Vec<u8>,
}

/// The diffing scanner behind a watch: each [`Scanner::rescan`] compares the directory with what
/// the previous one saw and returns the events for the difference.
#[derive(Debug)]
pub(crate) struct Scanner {
    kind: Kind,
    dir: PathBuf,
    revision: Arc<AtomicU64>,
    cache: BTreeMap<String, Cached>,
    /// False until the first `Reset` has been produced.
    started: bool,
    reachable: bool,
    /// Foreign file names already warned about (warned again only after they disappear).
    warned_foreign: HashSet<String>,
    /// Per object, the last read error logged, so each is logged once.
    warned_unreadable: HashMap<String, String>,
}

impl Scanner {
    pub(crate) fn new(kind: Kind, dir: PathBuf, revision: Arc<AtomicU64>) -> Self {
        Scanner {
            kind,
            dir,
            revision,
            cache: BTreeMap::new(),
            started: false,
            reachable: true,
            warned_foreign: HashSet::new(),
            warned_unreadable: HashMap::new(),
        }
    }

    /// Scans the directory and returns what changed since the last scan (a `Reset` on the first
    /// scan and after the directory was unreachable).
    pub(crate) fn rescan(&mut self) -> Vec<RawEvent> {
        let listing = match self.read_listing() {
            Ok(l) => l,
            Err(e) => {
                let reason = if e.kind() == io::ErrorKind::NotFound {
                    format!("registry directory {} does not exist", self.dir.display())
                } else {
                    format!("cannot read registry directory {}: {e}", self.dir.display())
                };
                if self.reachable || !self.started {
                    warn!(%reason, "registry unreachable; keeping the last known records");
                    self.reachable = false;
                    self.started = true;
                    return vec![RawEvent::Status(Connectivity::Unreachable(reason))];
                }
                return Vec::new();
            }
        };

        let mut next: BTreeMap<String, Cached> = BTreeMap::new();
        for (name, path, id) in listing {
            match self.cache.get(&name) {
                Some(c) if c.id == id => {
                    next.insert(name, c.clone());
                    continue;
                }
                _ => {}
            }
            match read_object(&path) {
                Ok(Some((id, value))) => {
                    self.warned_unreadable.remove(&name);
                    next.insert(name, Cached { id, value });
                }
                Ok(None) => {} // deleted between listing and reading
                Err(e) => {
                    let msg = e.to_string();
                    if self.warned_unreadable.get(&name) != Some(&msg) {
                        warn!(file = %path.display(), error = %msg, "cannot read registry file; keeping its previous version");
                        self.warned_unreadable.insert(name.clone(), msg);
                    }
                    if let Some(c) = self.cache.get(&name) {
                        next.insert(name, c.clone());
                    }
                }
            }
        }
        self.warned_unreadable.retain(|n, _| next.contains_key(n));

        let mut events = Vec::new();
        let resync = !self.started || !self.reachable;
        if !self.reachable {
            info!(dir = %self.dir.display(), "registry reachable again; resyncing");
            events.push(RawEvent::Status(Connectivity::Connected));
        }
        if resync {
            let items = next
                .iter()
                .map(|(n, c)| (n.clone(), c.value.clone()))
                .collect();
            events.push(RawEvent::Reset {
                items,
                revision: next_revision(&self.revision),
            });
        } else {
            for (name, c) in &next {
                if self.cache.get(name).map(|o| &o.value) != Some(&c.value) {
                    events.push(RawEvent::Upsert {
                        name: name.clone(),
                        value: c.value.clone(),
                        revision: next_revision(&self.revision),
                    });
                }
            }
            for name in self.cache.keys() {
                if !next.contains_key(name) {
                    events.push(RawEvent::Delete {
                        name: name.clone(),
                        revision: next_revision(&self.revision),
                    });
                }
            }
        }
        self.cache = next;
        self.started = true;
        self.reachable = true;
        events
    }

    /// Valid object files with their current metadata. Logs foreign files once.
    fn read_listing(&mut self) -> io::Result<Vec<(String, PathBuf, FileId)>> {
        let mut out = Vec::new();
        let mut foreign_now = HashSet::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            match classify(self.kind, &entry.file_name()) {
                Entry::Hidden => {}
                Entry::Foreign(f) => {
                    if !self.warned_foreign.contains(&f) {
                        warn!(file = %entry.path().display(), "ignoring registry file: not named <lowercase-dns-name>.json");
                    }
                    foreign_now.insert(f);
                }
                Entry::Object(name) => {
                    let path = entry.path();
                    match fs::metadata(&path) {
                        Ok(m) => out.push((name, path, FileId::of(&m))),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        // Let read_object report it (and keep the previous version).
                        Err(_) => out.push((
                            name,
                            path,
                            FileId {
                                dev: 0,
                                ino: 0,
                                size: u64::MAX,
                                mtime: (0, 0),
                                ctime: (0, 0),
                            },
                        )),
                    }
                }
            }
        }
        self.warned_foreign = foreign_now;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanner(dir: &Path) -> Scanner {
        Scanner::new(Kind::Nodes, dir.to_path_buf(), Arc::new(AtomicU64::new(0)))
    }

    fn names(events: &[RawEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                RawEvent::Reset { items, .. } => format!(
                    "reset[{}]",
                    items
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                RawEvent::Upsert { name, .. } => format!("upsert {name}"),
                RawEvent::Delete { name, .. } => format!("delete {name}"),
                RawEvent::Status(Connectivity::Connected) => "connected".into(),
                RawEvent::Status(Connectivity::Unreachable(_)) => "unreachable".into(),
            })
            .collect()
    }

    /// The rescan that backs up inotify: changes made with no watch at all are found, each once.
    #[test]
    fn rescan_diffs_against_last_content() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nodes");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("a.json"), b"1").expect("write");
        let mut s = scanner(&dir);
        assert_eq!(names(&s.rescan()), ["reset[a]"]);
        assert!(s.rescan().is_empty(), "nothing changed, nothing emitted");

        fs::write(dir.join("b.json"), b"2").expect("write");
        fs::write(dir.join("a.json"), b"1bis").expect("write");
        assert_eq!(names(&s.rescan()), ["upsert a", "upsert b"]);
        assert!(s.rescan().is_empty());

        // Rewritten with the same content (new inode, new mtime): no event.
        fs::remove_file(dir.join("b.json")).expect("rm");
        fs::write(dir.join("b.json"), b"2").expect("write");
        assert!(s.rescan().is_empty());

        fs::remove_file(dir.join("a.json")).expect("rm");
        assert_eq!(names(&s.rescan()), ["delete a"]);
        assert!(s.rescan().is_empty());
    }

    #[test]
    fn hidden_temp_and_foreign_files_ignored() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nodes");
        fs::create_dir_all(&dir).expect("mkdir");
        for f in [
            ".a.json.tmp.1.2",
            ".hidden",
            "README",
            "Upper.json",
            "x..y.json",
            "good.json.bak",
        ] {
            fs::write(dir.join(f), b"junk").expect("write");
        }
        fs::create_dir(dir.join("sub.json")).expect("mkdir");
        fs::write(dir.join("good.json"), b"{}").expect("write");
        let mut s = scanner(&dir);
        assert_eq!(names(&s.rescan()), ["reset[good]"]);
        assert!(s.rescan().is_empty());
        assert!(s.warned_foreign.contains("README"));
    }

    #[test]
    fn missing_directory_is_unreachable_not_deleted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nodes");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("a.json"), b"1").expect("write");
        let mut s = scanner(&dir);
        assert_eq!(names(&s.rescan()), ["reset[a]"]);
        fs::remove_dir_all(&dir).expect("rm -r");
        assert_eq!(names(&s.rescan()), ["unreachable"]);
        assert!(s.rescan().is_empty(), "unreachable is reported once");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("b.json"), b"2").expect("write");
        assert_eq!(names(&s.rescan()), ["connected", "reset[b]"]);
        assert!(s.rescan().is_empty());
    }

    #[test]
    fn oversized_file_keeps_previous_version() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nodes");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("a.json"), b"1").expect("write");
        let mut s = scanner(&dir);
        assert_eq!(names(&s.rescan()), ["reset[a]"]);
        fs::write(dir.join("a.json"), vec![b' '; MAX_OBJECT_BYTES + 1]).expect("write");
        assert!(s.rescan().is_empty());
        assert!(s.rescan().is_empty());
        fs::write(dir.join("a.json"), b"3").expect("write");
        assert_eq!(names(&s.rescan()), ["upsert a"]);
    }
}
