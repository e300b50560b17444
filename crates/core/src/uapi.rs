//! The WireGuard cross-platform userspace API (wireguard.com/xplatform), as `wg` and wgctrl speak
//! it on `/var/run/wireguard/IFNAME.sock`: the request parser and the `get=1` reply.
//!
//! In: the bytes a client sent so far ([`parse_request`]), and a [`Device`] snapshot of the
//! node. Out: what the client asked ([`Request`], or why it is refused), and the reply text,
//! byte for byte in wireguard-go's format ([`render_get`], [`render_errno`]).
//!
//! What the reply never holds: the node's private key and any preshared key. `private_key` is
//! all zeros (a value `wg` accepts; `wg show` then says "private key: (hidden)" and prints the
//! public key of the zero key, not the node's: the node's key is in `meshd status`), and
//! `preshared_key` is all zeros (which `wg` shows as no PSK; the PSK generation is in `meshd
//! status`). `set=1` is refused: the registry is the source of truth.
//!
//! Sans-IO: no sockets; the caller reads, writes and owns the clock.

use ipnet::IpNet;
use std::fmt::Write as _;
use std::net::SocketAddr;

/// Longest line accepted (wireguard-go's longest valid line is well under 200 bytes).
pub const MAX_LINE: usize = 4096;
/// Longest request accepted (a `set=1` with many peers would be longer; it is refused anyway).
pub const MAX_REQUEST: usize = 64 * 1024;
/// `-EPERM`: the answer to every `set=1`.
pub const ERRNO_EPERM: i32 = -1;
/// `-EINVAL`: a request that is neither `get=1` nor `set=1`.
pub const ERRNO_EINVAL: i32 = -22;

/// What a client asked, once its request is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `get=1\n\n`: the device and its peers.
    Get,
    /// `set=1\n` ... `\n`: refused with [`ERRNO_EPERM`].
    Set,
}

/// Why a request is refused (the connection is then answered with an errno and closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("a request longer than {MAX_REQUEST} bytes")]
    RequestTooLong,
    #[error("unknown operation {0:?} (want get=1 or set=1)")]
    UnknownOperation(String),
    #[error("get=1 must be followed by an empty line, got {0:?}")]
    GetNotTerminated(String),
    #[error("a line that is not key=value: {0:?}")]
    NotKeyValue(String),
}

impl UapiError {
    /// The errno to answer with.
    pub fn errno(&self) -> i32 {
        ERRNO_EINVAL
    }
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    NeedMore,
    /// A whole request of `len` bytes (the rest belongs to the next request).
    Done { request: Request, len: usize },
}

/// Looks at the bytes a client sent so far. A request is its operation line (`get=1` or
/// `set=1`), then for `set=1` any `key=value` lines, then an empty line.
pub fn parse_request(buf: &[u8]) -> Result<Parsed, UapiError> {
    let mut pos = 0;
    let mut op: Option<Request> = None;
    loop {
        let rest = &buf[pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > MAX_LINE {
                return Err(UapiError::LineTooLong);
            }
            if buf.len() > MAX_REQUEST {
                return Err(UapiError::RequestTooLong);
            }
            return Ok(Parsed::NeedMore);
        };
        if nl > MAX_LINE {
            return Err(UapiError::LineTooLong);
        }
        let line = &rest[..nl];
        pos += nl + 1;
        if pos > MAX_REQUEST {
            return Err(UapiError::RequestTooLong);
        }
        let text = String::from_utf8_lossy(line);
        match op {
            None => {
                op = Some(match text.as_ref() {
                    "get=1" => Request::Get,
                    "set=1" => Request::Set,
                    other => return Err(UapiError::UnknownOperation(shorten(other))),
                });
            }
            Some(Request::Get) => {
                if line.is_empty() {
                    return Ok(Parsed::Done {
                        request: Request::Get,
                        len: pos,
                    });
                }
                return Err(UapiError::GetNotTerminated(shorten(&text)));
            }
            Some(Request::Set) => {
                if line.is_empty() {
                    return Ok(Parsed::Done {
                        request: Request::Set,
                        len: pos,
                    });
                }
                if !text.contains('=') {
                    return Err(UapiError::NotKeyValue(shorten(&text)));
                }
            }
        }
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// One peer as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer key of the pair carrying traffic (the record's key while none has a session).
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    /// Unix time of the last handshake (seconds, nanoseconds); `(0, 0)`: none.
    pub last_handshake: (u64, u32),
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Seconds; 0: off.
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}

/// The device as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    pub listen_port: u16,
    /// 0: none (then the line is left out, as wireguard-go does).
    pub fwmark: u32,
    pub peers: Vec<PeerInfo>,
}

fn hex(out: &mut String, key: &[u8; 32]) {
    for b in key {
        let _ = write!(out, "{b:02x}");
    }
}

/// The reply to `get=1`: wireguard-go's lines in its order, then `errno=0` and an empty line.
pub fn render_get(dev: &Device) -> String {
    let mut out = String::with_capacity(128 + dev.peers.len() * 320);
    out.push_str("private_key=");
    hex(&mut out, &[0u8; 32]);
    out.push('\n');
    if dev.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", dev.listen_port);
    }
    if dev.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", dev.fwmark);
    }
    for p in &dev.peers {
        out.push_str("public_key=");
        hex(&mut out, &p.public_key);
        out.push_str("\npreshared_key=");
        hex(&mut out, &[0u8; 32]);
        out.push_str("\nprotocol_version=1\n");
        if let Some(e) = p.endpoint {
            // SocketAddr prints `[v6]:port` for IPv6, as wireguard-go's DstToString does.
            let _ = writeln!(out, "endpoint={e}");
        }
        let _ = writeln!(out, "last_handshake_time_sec={}", p.last_handshake.0);
        let _ = writeln!(out, "last_handshake_time_nsec={}", p.last_handshake.1);
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={}/{}", ip.network(), ip.prefix_len());
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// The reply that refuses a request: `errno=N` and an empty line.
pub fn render_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

/// Unix time (seconds, nanoseconds) of a handshake `secs_ago` before `now_unix` (a Unix time
/// in seconds with a fraction); `(0, 0)` for none.
pub fn handshake_time(now_unix: f64, secs_ago: Option<f64>) -> (u64, u32) {
    match secs_ago {
        Some(ago) if ago.is_finite() && ago >= 0.0 && now_unix > ago => {
            let t = now_unix - ago;
            let secs = t.trunc();
            let nanos = ((t - secs) * 1e9).round().clamp(0.0, 999_999_999.0);
            (secs as u64, nanos as u32)
        }
        _ => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_set_requests() {
        assert_eq!(parse_request(b""), Ok(Parsed::NeedMore));
        assert_eq!(parse_request(b"get=1"), Ok(Parsed::NeedMore));
        assert_eq!(parse_request(b"get=1\n"), Ok(Parsed::NeedMore));
        assert_eq!(
            parse_request(b"get=1\n\nget=1\n\n"),
            Ok(Parsed::Done {
                request: Request::Get,
                len: 7
            })
        );
        assert_eq!(
            parse_request(b"set=1\nprivate_key=00\nlisten_port=1\n\n"),
            Ok(Parsed::Done {
                request: Request::Set,
                len: 36
            })
        );
        assert_eq!(
            parse_request(b"set=1\nreplace_peers=true\n"),
            Ok(Parsed::NeedMore)
        );
        assert!(matches!(
            parse_request(b"get=1\nx=1\n\n"),
            Err(UapiError::GetNotTerminated(_))
        ));
        assert!(matches!(
            parse_request(b"hello\n"),
            Err(UapiError::UnknownOperation(_))
        ));
        assert!(matches!(
            parse_request(b"set=1\nnonsense\n\n"),
            Err(UapiError::NotKeyValue(_))
        ));
        assert_eq!(
            parse_request(b"hello\n").map_err(|e| e.errno()),
            Err(ERRNO_EINVAL)
        );
    }

    #[test]
    fn long_lines_and_requests_are_refused_early() {
        let long = vec![b'a'; MAX_LINE + 1];
        assert_eq!(parse_request(&long), Err(UapiError::LineTooLong));
        let mut set = b"set=1\n".to_vec();
        while set.len() <= MAX_REQUEST {
            set.extend_from_slice(b"allowed_ip=10.0.0.0/8\n");
        }
        assert_eq!(parse_request(&set), Err(UapiError::RequestTooLong));
        // Not UTF-8: an unknown operation, no panic.
        assert!(matches!(
            parse_request(b"\xff\xfe\n\n"),
            Err(UapiError::UnknownOperation(_))
        ));
    }

    #[test]
    fn the_get_reply_is_wireguard_gos() {
        let dev = Device {
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerInfo {
                public_key: [0xab; 32],
                endpoint: Some("[fd00::2]:51820".parse().expect("addr")),
                last_handshake: (1_796_000_000, 5),
                tx_bytes: 10,
                rx_bytes: 20,
                persistent_keepalive: 25,
                allowed_ips: vec![
                    "10.42.1.0/24".parse().expect("net"),
                    "fd42::/64".parse().expect("net"),
                ],
            }],
        };
        let want = format!(
            "private_key={zero}\nlisten_port=51820\npublic_key={ab}\npreshared_key={zero}\n\
             protocol_version=1\nendpoint=[fd00::2]:51820\nlast_handshake_time_sec=1796000000\n\
             last_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\n\
             persistent_keepalive_interval=25\nallowed_ip=10.42.1.0/24\nallowed_ip=fd42::/64\n\
             errno=0\n\n",
            zero = "0".repeat(64),
            ab = "ab".repeat(32)
        );
        assert_eq!(render_get(&dev), want);
        let fw = render_get(&Device {
            listen_port: 0,
            fwmark: 7,
            peers: vec![],
        });
        assert_eq!(
            fw,
            format!("private_key={}\nfwmark=7\nerrno=0\n\n", "0".repeat(64))
        );
        assert_eq!(render_errno(ERRNO_EPERM), "errno=-1\n\n");
    }

    #[test]
    fn handshake_times() {
        assert_eq!(handshake_time(1000.5, None), (0, 0));
        assert_eq!(handshake_time(1000.5, Some(0.25)), (1000, 250_000_000));
        assert_eq!(handshake_time(1000.0, Some(f64::NAN)), (0, 0));
        assert_eq!(handshake_time(10.0, Some(20.0)), (0, 0));
    }
}
