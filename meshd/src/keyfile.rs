//! The node's private key file: `STATE_DIR/private.key`, created 0600 (under umask 077) in a
//! 0700 directory if absent, reused on restart. The key never leaves this file and the process.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use weft_core::PrivateKey;

pub const KEY_FILE: &str = "private.key";

/// `STATE_DIR/next.key`: the key this node is rotating to, while it rotates (0600). It becomes
/// `private.key` (a rename) when the rotation finishes.
pub const NEXT_KEY_FILE: &str = "next.key";

/// When the key file was last written (unix seconds; 0 if unknown): the key's age.
pub fn created_at(state_dir: &Path) -> u64 {
    std::fs::metadata(state_dir.join(KEY_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads the key, or creates one. A key file readable by others is tightened to 0600.
pub fn load_or_create(state_dir: &Path) -> Result<(PrivateKey, bool)> {
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o077) };
    let r = load_or_create_inner(state_dir);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    r
}

fn load_or_create_inner(state_dir: &Path) -> Result<(PrivateKey, bool)> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    let path = state_dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let meta = fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "private key was readable by others; setting mode 0600");
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("chmod 0600 {}", path.display()))?;
            }
            let key = PrivateKey::from_base64(text.trim()).map_err(|e| {
                anyhow::anyhow!("{}: not a WireGuard private key: {e}", path.display())
            })?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate();
            let tmp = state_dir.join(format!(".{KEY_FILE}.tmp{}", std::process::id()));
            {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                f.write_all(format!("{}\n", key.to_base64_secret()).as_bytes())?;
                f.sync_all()?;
            }
            fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
            Ok((key, true))
        }
        Err(e) => bail!("reading {}: {e}", path.display()),
    }
}

/// Writes `key` to `STATE_DIR/name` atomically, mode 0600 from the start.
fn write_key(state_dir: &Path, name: &str, key: &PrivateKey) -> Result<()> {
    let path = state_dir.join(name);
    let tmp = state_dir.join(format!(".{name}.tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(format!("{}\n", key.to_base64_secret()).as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Ok(d) = fs::File::open(state_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Makes and stores a next key (for a rotation).
pub fn create_next(state_dir: &Path) -> Result<PrivateKey> {
    let key = PrivateKey::generate();
    write_key(state_dir, NEXT_KEY_FILE, &key)?;
    Ok(key)
}

/// The next key of a rotation in progress, if any (a bad file is an error: it must not be
/// silently replaced, the registry may already announce its public key).
pub fn load_next(state_dir: &Path) -> Result<Option<PrivateKey>> {
    let path = state_dir.join(NEXT_KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => PrivateKey::from_base64(text.trim())
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: not a WireGuard private key: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => bail!("reading {}: {e}", path.display()),
    }
}

/// Finishes a rotation on disk: `next.key` replaces `private.key` (one rename, so a crash
/// leaves one or the other, never neither).
pub fn promote_next(state_dir: &Path) -> Result<()> {
    let from = state_dir.join(NEXT_KEY_FILE);
    let to = state_dir.join(KEY_FILE);
    fs::rename(&from, &to)
        .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
    if let Ok(d) = fs::File::open(state_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Drops a rotation's next key (rollback).
pub fn remove_next(state_dir: &Path) {
    let _ = fs::remove_file(state_dir.join(NEXT_KEY_FILE));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path().join("state");
        let (k1, created) = load_or_create(&state).expect("create");
        assert!(created);
        let mode = fs::metadata(state.join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (k2, created) = load_or_create(&state).expect("load");
        assert!(!created);
        assert_eq!(k1.public_key(), k2.public_key());
        fs::set_permissions(state.join(KEY_FILE), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        load_or_create(&state).expect("load");
        let mode = fs::metadata(state.join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(state.join(KEY_FILE), "garbage").expect("write");
        assert!(load_or_create(&state).is_err());
    }

    #[test]
    fn next_key_0600_and_promoted_by_rename() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path();
        let (k1, _) = load_or_create(state).expect("create");
        assert!(load_next(state).expect("none").is_none());
        let k2 = create_next(state).expect("next");
        let mode = fs::metadata(state.join(NEXT_KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_next(state).expect("load").map(|k| k.public_key()),
            Some(k2.public_key())
        );
        promote_next(state).expect("promote");
        let (now, _) = load_or_create(state).expect("load");
        assert_eq!(now.public_key(), k2.public_key());
        assert_ne!(now.public_key(), k1.public_key());
        assert!(load_next(state).expect("none").is_none());
        let mode = fs::metadata(state.join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
