//! weft-nettool: tiny traffic generator/sink run inside test namespaces (`ip netns exec NS ...`).
//!
//! Subcommands (all addresses ip:port; results as one JSON line on stdout; errors on stderr with
//! a non-zero exit):
//!   udp-send --to A:P [--bind IP[:PORT]] [--size N] [--count C] [--random] [--marker M] [--interval-ms X]
//!            [--prefix HEX]   (first bytes of every datagram, e.g. 04000000 for a WireGuard data header)
//!   udp-recv --listen A:P [--duration-ms T] [--count N] [--marker M]      (prints LISTENING first)
//!   tcp-serve --listen A:P [--timeout-ms T] [--marker M]                   (prints LISTENING first;
//!             accepts one connection, reads to EOF)
//!   tcp-send --connect A:P --bytes N [--marker M] [--bind IP] [--timeout-ms T]
//! Payloads are the marker repeated (default marker "weft-nettool"), or random bytes with --random.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("usage: weft-nettool udp-send|udp-recv|tcp-serve|tcp-send [--opts]");
        return ExitCode::from(2);
    };
    let opts = match parse_opts(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("weft-nettool: {e}");
            return ExitCode::from(2);
        }
    };
    let r = match cmd.as_str() {
        "udp-send" => udp_send(&opts),
        "udp-recv" => udp_recv(&opts),
        "tcp-serve" => tcp_serve(&opts),
        "tcp-send" => tcp_send(&opts),
        other => Err(format!("unknown subcommand {other}")),
    };
    match r {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-nettool {cmd}: {e}");
            ExitCode::from(1)
        }
    }
}

type Opts = HashMap<String, String>;

fn parse_opts(a: &[String]) -> Result<Opts, String> {
    let mut m = HashMap::new();
    let mut i = 0;
    while i < a.len() {
        let k = a[i]
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {}", a[i]))?;
        if k == "random" {
            m.insert(k.to_string(), "1".to_string());
            i += 1;
            continue;
        }
        let v = a.get(i + 1).ok_or_else(|| format!("--{k} needs a value"))?;
        m.insert(k.to_string(), v.clone());
        i += 2;
    }
    Ok(m)
}

fn get<T: std::str::FromStr>(o: &Opts, k: &str, default: Option<T>) -> Result<T, String> {
    match o.get(k) {
        Some(v) => v.parse().map_err(|_| format!("bad value for --{k}: {v}")),
        None => default.ok_or_else(|| format!("--{k} is required")),
    }
}

fn marker(o: &Opts) -> Vec<u8> {
    o.get("marker")
        .cloned()
        .unwrap_or_else(|| "weft-nettool".to_string())
        .into_bytes()
}

fn fill(buf: &mut [u8], m: &[u8], random: bool) {
    if random {
        for b in buf.iter_mut() {
            *b = rand::random();
        }
    } else {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = m[i % m.len()];
        }
    }
}

fn count_marker(hay: &[u8], m: &[u8]) -> usize {
    if m.is_empty() || hay.len() < m.len() {
        return 0;
    }
    hay.windows(m.len()).filter(|w| *w == m).count()
}

fn bind_addr(o: &Opts, for_ipv6: bool) -> Result<SocketAddr, String> {
    match o.get("bind") {
        None => Ok(if for_ipv6 {
            "[::]:0".parse().map_err(|_| "addr".to_string())?
        } else {
            "0.0.0.0:0".parse().map_err(|_| "addr".to_string())?
        }),
        Some(s) => {
            if let Ok(sa) = s.parse::<SocketAddr>() {
                Ok(sa)
            } else {
                let ip: IpAddr = s.parse().map_err(|_| format!("bad --bind {s}"))?;
                Ok(SocketAddr::new(ip, 0))
            }
        }
    }
}

fn udp_send(o: &Opts) -> Result<String, String> {
    let to: SocketAddr = get(o, "to", None)?;
    let size: usize = get(o, "size", Some(64))?;
    let count: u64 = get(o, "count", Some(1))?;
    let interval: u64 = get(o, "interval-ms", Some(0))?;
    let random = o.contains_key("random");
    let m = marker(o);
    let prefix = match o.get("prefix") {
        None => Vec::new(),
        Some(h) => (0..h.len() / 2)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| format!("bad --prefix {h}"))?,
    };
    let sock = UdpSocket::bind(bind_addr(o, to.is_ipv6())?).map_err(|e| format!("bind: {e}"))?;
    let mut buf = vec![0u8; size];
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut last_err = String::new();
    for _ in 0..count {
        fill(&mut buf, &m, random);
        let n = prefix.len().min(buf.len());
        buf[..n].copy_from_slice(&prefix[..n]);
        match sock.send_to(&buf, to) {
            Ok(_) => sent += 1,
            Err(e) => {
                errors += 1;
                last_err = e.to_string();
            }
        }
        if interval > 0 {
            std::thread::sleep(Duration::from_millis(interval));
        }
    }
    Ok(format!(
        "{{\"sent\":{sent},\"errors\":{errors},\"lastError\":{:?}}}",
        last_err
    ))
}

fn udp_recv(o: &Opts) -> Result<String, String> {
    let listen: SocketAddr = get(o, "listen", None)?;
    let duration: u64 = get(o, "duration-ms", Some(5000))?;
    let want: u64 = get(o, "count", Some(u64::MAX))?;
    let m = marker(o);
    let sock = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    println!("LISTENING");
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_millis(duration);
    let mut buf = vec![0u8; 65536];
    let (mut n, mut bytes, mut marks) = (0u64, 0u64, 0u64);
    let mut sources: Vec<String> = Vec::new();
    while Instant::now() < deadline && n < want {
        match sock.recv_from(&mut buf) {
            Ok((len, from)) => {
                n += 1;
                bytes += len as u64;
                if count_marker(&buf[..len], &m) > 0 {
                    marks += 1;
                }
                let f = from.ip().to_string();
                if !sources.contains(&f) {
                    sources.push(f);
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    Ok(format!(
        "{{\"received\":{n},\"bytes\":{bytes},\"markerDatagrams\":{marks},\"sources\":{:?}}}",
        sources
    ))
}

fn tcp_serve(o: &Opts) -> Result<String, String> {
    let listen: SocketAddr = get(o, "listen", None)?;
    let timeout: u64 = get(o, "timeout-ms", Some(30_000))?;
    let m = marker(o);
    let l = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    println!("LISTENING");
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_millis(timeout);
    let (mut s, peer) = loop {
        match l.accept() {
            Ok(x) => break x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err("no connection before timeout".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    // Keep the tail of the previous read so markers across read boundaries count.
    let mut carry: Vec<u8> = Vec::new();
    let (mut total, mut marks) = (0u64, 0u64);
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                let mut window = std::mem::take(&mut carry);
                window.extend_from_slice(&buf[..n]);
                marks += count_marker(&window, &m) as u64;
                let keep = m.len().saturating_sub(1).min(window.len());
                carry = window[window.len() - keep..].to_vec();
            }
            Err(e) => return Err(format!("read after {total} bytes: {e}")),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = s.write_all(b"OK");
    Ok(format!(
        "{{\"bytes\":{total},\"markerCount\":{marks},\"peer\":\"{peer}\",\"secs\":{secs:.6}}}"
    ))
}

fn tcp_send(o: &Opts) -> Result<String, String> {
    let to: SocketAddr = get(o, "connect", None)?;
    let bytes: u64 = get(o, "bytes", None)?;
    let timeout: u64 = get(o, "timeout-ms", Some(30_000))?;
    let random = o.contains_key("random");
    let m = marker(o);
    let started = Instant::now();
    let sock = socket2_connect(to, o, Duration::from_millis(timeout))?;
    let mut s = sock;
    s.set_write_timeout(Some(Duration::from_millis(timeout)))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(timeout)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 16];
    fill(&mut buf, &m, random);
    let mut sent = 0u64;
    // Keep the marker phase continuous across chunks: chunk sizes are multiples of the marker.
    let chunk = (buf.len() / m.len().max(1)) * m.len().max(1);
    while sent < bytes {
        let n = ((bytes - sent) as usize).min(chunk);
        s.write_all(&buf[..n])
            .map_err(|e| format!("write after {sent} bytes: {e}"))?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut ack = Vec::new();
    let _ = s.read_to_end(&mut ack);
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "{{\"bytes\":{sent},\"acked\":{},\"secs\":{secs:.6}}}",
        ack == b"OK"
    ))
}

/// Connect with an optional source address (std has no bind-before-connect for TCP, so use libc).
fn socket2_connect(to: SocketAddr, o: &Opts, timeout: Duration) -> Result<TcpStream, String> {
    let Some(bind) = o.get("bind") else {
        return TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect {to}: {e}"));
    };
    let ip: IpAddr = bind.parse().map_err(|_| format!("bad --bind {bind}"))?;
    let (IpAddr::V4(src), SocketAddr::V4(dst)) = (ip, to) else {
        return Err("--bind with tcp-send supports IPv4 only".into());
    };
    // SAFETY: plain socket syscalls on an fd we own; the fd is handed to TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mk = |a: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.octets()),
            },
            sin_zero: [0; 8],
        };
        let sa = mk(src, 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(format!("bind {src}: {e}"));
        }
        let da = mk(*dst.ip(), dst.port());
        if libc::connect(fd, &da as *const _ as *const libc::sockaddr, len) != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(format!("connect {to} from {src}: {e}"));
        }
        use std::os::unix::io::FromRawFd;
        Ok(TcpStream::from_raw_fd(fd))
    }
}
