//! The WireGuard userspace API socket (`--wg-uapi-dir`, default `/var/run/wireguard`): `wg show`,
//! `wg showconf` and every exporter built on wgctrl read a weft node as they read wireguard-go.
//!
//! In: connections on `DIR/IFNAME.sock` and a snapshot function over the node's shards. Out:
//! `get=1` replies in wireguard-go's format (weft-core's `uapi`: no private key, no PSK), and
//! `errno=-1` (-EPERM) for every `set=1`, logged: the registry is the source of truth.
//!
//! The socket is made 0600 under umask 077 in a 0755 directory; an existing socket file is
//! replaced only when nothing answers on it (else meshd refuses to start); it is removed on
//! exit. A client gets 5 s per request, lines of at most 4 KiB and requests of at most 64 KiB;
//! at most 64 clients are served at once (the others wait in the listen backlog). Snapshots
//! take each shard's lock as briefly as `meshd status` does.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use weft_core::uapi::{parse_request, render_errno, render_get, Device, Parsed, Request};

/// Time a client has to send one whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once.
const MAX_CLIENTS: usize = 64;

/// Makes the device snapshot a `get=1` answers with.
pub type Snapshot = Arc<dyn Fn() -> Device + Send + Sync>;

/// The socket's path for `ifname` in `dir`.
pub fn socket_path(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("{ifname}.sock"))
}

/// Binds `path`: 0600 under umask 077, the directory 0755; a stale socket (nothing answers) is
/// replaced, a live one is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting mode 0755 on {}", dir.display()))?;
    }
    crate::daemon::bind_unix_socket(path)
}

/// Serves the socket until the task is dropped.
pub async fn serve(listener: UnixListener, snapshot: Snapshot) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let refusals = Arc::new(Mutex::new(weft_core::repeats::Repeats::new(
        Duration::from_secs(60),
    )));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "accepting a UAPI client");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let snapshot = snapshot.clone();
        let refusals = refusals.clone();
        tokio::spawn(async move {
            client(stream, snapshot, refusals).await;
            drop(permit);
        });
    }
}

/// One client: requests one after another (as wireguard-go allows) until it closes, sends
/// something that is not a request, or takes too long.
async fn client(
    mut stream: UnixStream,
    snapshot: Snapshot,
    refusals: Arc<Mutex<weft_core::repeats::Repeats>>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    let mut deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        match parse_request(&buf) {
            Ok(Parsed::Done { request, len }) => {
                buf.drain(..len);
                let reply = match request {
                    Request::Get => render_get(&snapshot()),
                    Request::Set => {
                        let held = refusals
                            .lock()
                            .ok()
                            .and_then(|mut r| r.hit("uapi_set_refused", "", Instant::now()));
                        if let Some(repeated) = held {
                            tracing::warn!(
                                event = "uapi_set_refused",
                                repeated,
                                "refused a WireGuard UAPI set (wg set / wg setconf): weft's \
                                 peers come from the registry; use keyctl"
                            );
                        }
                        render_errno(weft_core::uapi::ERRNO_EPERM)
                    }
                };
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
                continue;
            }
            Ok(Parsed::NeedMore) => {}
            Err(e) => {
                tracing::debug!(error = %e, "bad WireGuard UAPI request");
                let _ = stream.write_all(render_errno(e.errno()).as_bytes()).await;
                return;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The snapshot of the node's shards as the API shows it.
pub fn device(
    peers: Vec<weft_core::node::PeerStatus>,
    listen_port: u16,
    keepalive: u16,
    now_unix: f64,
) -> Device {
    use weft_core::uapi::{handshake_time, PeerInfo};
    let peers = peers
        .into_iter()
        .filter_map(|p| {
            let key = p.traffic_public_key.as_deref().unwrap_or(&p.public_key);
            let public_key = *key.parse::<weft_core::PublicKey>().ok()?.as_bytes();
            Some(PeerInfo {
                public_key,
                endpoint: p.endpoint.as_deref().and_then(|e| e.parse().ok()),
                last_handshake: handshake_time(now_unix, p.latest_handshake_secs_ago),
                tx_bytes: p.tx_bytes,
                rx_bytes: p.rx_bytes,
                persistent_keepalive: p.keepalive_secs.unwrap_or(keepalive),
                allowed_ips: p
                    .allowed_ips
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect(),
            })
        })
        .collect();
    Device {
        listen_port,
        fwmark: 0,
        peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ask(path: &Path, req: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.expect("connect");
        // meshd may answer and close before a long request is all written.
        let _ = s.write_all(req).await;
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => {
                    out.extend_from_slice(&b[..n]);
                    if out.ends_with(b"\n\n") {
                        break;
                    }
                }
                _ => break,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn answers_get_refuses_set_and_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(dir.path(), "weft0");
        let l = bind(&path).expect("bind");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let snap: Snapshot = Arc::new(|| Device {
            listen_port: 51820,
            ..Default::default()
        });
        let task = tokio::spawn(serve(l, snap));
        let get = ask(&path, b"get=1\n\n").await;
        assert!(get.ends_with("listen_port=51820\nerrno=0\n\n"), "{get}");
        assert_eq!(
            ask(&path, b"set=1\nlisten_port=1\n\n").await,
            "errno=-1\n\n"
        );
        assert_eq!(ask(&path, b"what=1\n").await, "errno=-22\n\n");
        let long = vec![b'x'; 1 << 20];
        assert_eq!(ask(&path, &long).await, "errno=-22\n\n");
        // Two requests on one connection.
        let two = ask(&path, b"get=1\n\nget=1\n\n").await;
        assert!(two.starts_with("private_key="), "{two}");
        // A live socket is not replaced.
        assert!(bind(&path).is_err());
        task.abort();
        let _ = task.await;
    }
}
