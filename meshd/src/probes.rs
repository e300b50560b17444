//! `--health-listen ADDR:PORT`: HTTP probes for the kubelet.
//!
//! `GET /healthz` is 200 while the control loop turns (it ticked within [`STALL`]), else 503.
//! `GET /readyz` is 200 once the TUN is up, the routes of the first reconcile are installed and
//! the registry's first complete listing arrived, else 503 naming what is missing. Anything
//! else is 404. Requests are read with a size and time limit; nothing a client sends can hold
//! the daemon up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// /healthz fails when the control loop has not ticked for this long.
pub const STALL: Duration = Duration::from_secs(30);

/// What the probes look at, set by the daemon.
#[derive(Debug, Default)]
pub struct Readiness {
    pub tun_up: AtomicBool,
    pub routes: AtomicBool,
    pub registry_synced: AtomicBool,
    /// Unix milliseconds of the control loop's last tick.
    pub last_tick_ms: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Readiness {
    pub fn tick(&self) {
        self.last_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// (HTTP status, body) for a request path.
    pub fn answer(&self, path: &str) -> (u16, String) {
        match path {
            "/healthz" | "/livez" => {
                let age = now_ms().saturating_sub(self.last_tick_ms.load(Ordering::Relaxed));
                if age <= STALL.as_millis() as u64 {
                    (200, "ok\n".into())
                } else {
                    (503, format!("the control loop has not run for {age} ms\n"))
                }
            }
            "/readyz" => {
                let missing: Vec<&str> = [
                    (&self.tun_up, "TUN not up"),
                    (&self.routes, "routes not installed"),
                    (&self.registry_synced, "registry not synced"),
                ]
                .into_iter()
                .filter(|(f, _)| !f.load(Ordering::Relaxed))
                .map(|(_, w)| w)
                .collect();
                if missing.is_empty() {
                    (200, "ok\n".into())
                } else {
                    (503, format!("{}\n", missing.join(", ")))
                }
            }
            _ => (404, "not found\n".into()),
        }
    }
}

/// Binds the probe listener (before anything else starts, so a taken port is a start-up error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves probes until the process ends.
/// Binds the address of `--FLAG`, if given; the error names the flag.
pub async fn bind_flag(
    flag: &str,
    addr: Option<SocketAddr>,
) -> anyhow::Result<Option<TcpListener>> {
    use anyhow::Context as _;
    match addr {
        Some(a) => Ok(Some(
            bind(a)
                .await
                .with_context(|| format!("binding --{flag} {a}"))?,
        )),
        None => Ok(None),
    }
}

pub fn spawn(listener: TcpListener, ready: Arc<Readiness>) -> tokio::task::JoinHandle<()> {
    serve_http(
        listener,
        Arc::new(move |path: &str, _head: &str| {
            let (status, body) = ready.answer(path);
            (status, "text/plain", body)
        }),
    )
}

/// What a GET of a path (and the request's head, for its headers) answers: status, content
/// type, body.
pub type Handler = Arc<dyn Fn(&str, &str) -> (u16, &'static str, String) + Send + Sync>;

/// A minimal HTTP/1.1 server for GET and HEAD (the probes and /metrics): requests are read
/// with a 1 KiB and 2 s limit, one answer per connection, then it is closed.
pub fn serve_http(listener: TcpListener, handler: Handler) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let mut len = 0;
                let read = tokio::time::timeout(Duration::from_secs(2), async {
                    while len < buf.len() {
                        match conn.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => len += n,
                        }
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..len]);
                let mut parts = head.split_whitespace();
                let (status, content_type, body) = match (parts.next(), parts.next()) {
                    (Some("GET" | "HEAD"), Some(path)) => {
                        handler(path.split('?').next().unwrap_or(path), &head)
                    }
                    _ => (400, "text/plain", "bad request\n".into()),
                };
                let reason = match status {
                    200 => "OK",
                    404 => "Not Found",
                    400 => "Bad Request",
                    _ => "Service Unavailable",
                };
                let resp = format!(
                    "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_missing() {
        let r = Readiness::default();
        assert_eq!(r.answer("/healthz").0, 503, "never ticked");
        r.tick();
        assert_eq!(r.answer("/healthz").0, 200);
        let (code, body) = r.answer("/readyz");
        assert_eq!(code, 503);
        assert!(
            body.contains("TUN not up") && body.contains("registry not synced"),
            "{body}"
        );
        r.tun_up.store(true, Ordering::Relaxed);
        r.routes.store(true, Ordering::Relaxed);
        r.registry_synced.store(true, Ordering::Relaxed);
        assert_eq!(r.answer("/readyz").0, 200);
        assert_eq!(r.answer("/x").0, 404);
    }

    #[tokio::test]
    async fn serves_http_and_survives_garbage() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let r = Arc::new(Readiness::default());
        r.tick();
        let _t = spawn(listener, r);
        for (req, want) in [
            (&b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"[..], "200 OK"),
            (b"GET /readyz HTTP/1.1\r\n\r\n", "503"),
            (b"\x00\x01garbage\r\n\r\n", "400"),
        ] {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            c.write_all(req).await.expect("write");
            let mut out = String::new();
            c.read_to_string(&mut out).await.expect("read");
            assert!(out.contains(want), "{out}");
        }
    }
}
