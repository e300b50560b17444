//! The node's private key file: `STATE_DIR/private.key`, created 0600 (under umask 077) in a
//! 0700 directory if absent, reused on restart. The key never leaves this file and the process.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use weft_core::PrivateKey;

pub const KEY_FILE: &str = "private.key";

/// Loads the key, or creates one. A key file readable by others is tightened to 0600.
/// When the key file was last written (unix seconds; 0 if unknown): the key's age.
pub fn created_at(state_dir: &Path) -> u64 {
    std::fs::metadata(state_dir.join(KEY_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

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
}
