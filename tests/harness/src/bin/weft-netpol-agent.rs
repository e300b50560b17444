//! weft-netpol-agent: the server and prober of the NetworkPolicy end-to-end tests (the role
//! agnhost's `serve-hostname`/`connect` play in upstream's netpol e2e), std + libc only. It runs
//! inside a pod network namespace (`ip netns exec POD weft-netpol-agent ...`).
//!
//! - `serve --name NAME --ports 80,81 --protocols tcp,udp,sctp [--log PATH] [--tcp-log PATH]`:
//!   per port, a TCP listener (writes `NAME\n`, then echoes what the client sends until it
//!   closes; with `--tcp-log`, appends `SOURCE_IP:PORT` per accepted connection), a UDP socket
//!   (echoes every datagram; with `--log`, appends `SOURCE_IP PAYLOAD` per datagram to PATH), and
//!   SCTP (below). Prints `ready` on stdout once everything is bound.
//! - `probe --timeout-ms 1000`: reads `PROTO IP PORT` lines from stdin, probes all of them at
//!   once (a thread each) and prints one JSON line per probe, in input order:
//!   `{"proto":"tcp","ip":"10.42.1.10","port":80,"ok":true,"ms":1.2,"error":null}`.
//!   TCP: a connect within the timeout. UDP: a datagram with a random nonce, echoed within the
//!   timeout. SCTP: an INIT answered by an INIT-ACK (below).
//! - `spoof --src IP --dst IP --port P --payload TEXT [--sport P]`: one UDP datagram with a forged
//!   source address (raw socket, IP_HDRINCL).
//! - `stream --ip IP --port P --interval-ms 100 [--duration-ms N]`: one TCP connection to a
//!   `serve` port sending a line every interval; prints `echo SEQ MS` (ms since start) for every
//!   line echoed back and `closed`/`error ...` when the connection ends (the live-flow test).
//!
//! **SCTP is emulated.** The test kernel has no SCTP sockets (CONFIG_IP_SCTP off:
//! `socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)` fails with EPROTONOSUPPORT), but netfilter's SCTP
//! conntrack is built in (CONFIG_NF_CT_PROTO_SCTP=y), and that is what policy enforcement sees.
//! So both sides use raw IPv4 sockets of protocol 132 and only do the first two packets of the
//! four-way handshake: the prober sends an INIT (random initiate tag, random source port,
//! verification tag 0), the server answers an INIT-ACK (verification tag = the INIT's initiate
//! tag, a State Cookie parameter) and the prober waits for an INIT-ACK with the right ports and
//! tag. Both packets carry a correct CRC32c checksum (conntrack verifies it). No association is
//! ever established (no COOKIE-ECHO), so this proves that the INIT and the INIT-ACK pass in
//! both directions, i.e. what a policy decides at connection set-up, not that an SCTP stack
//! would work. A raw socket of protocol 132 also keeps the kernel from answering SCTP with ICMP
//! protocol-unreachable, in the server's and the prober's namespaces alike.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IPPROTO_SCTP: i32 = 132;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe") => probe_main(&args[1..]),
        Some("spoof") => spoof(&args[1..]),
        Some("stream") => stream(&args[1..]),
        _ => Err("usage: weft-netpol-agent serve|probe|spoof|stream [options]".into()),
    };
    if let Err(e) = r {
        eprintln!("weft-netpol-agent: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, String>;

/// `--flag value` from `args`.
fn opt<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn req<'a>(args: &'a [String], flag: &str) -> Res<&'a str> {
    opt(args, flag).ok_or_else(|| format!("missing {flag}"))
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Res<T> {
    s.parse().map_err(|_| format!("bad {what}: {s:?}"))
}

/// A random u32 from /dev/urandom (falls back to the clock).
fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u32::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(13) ^ std::process::id()
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

// ---------------------------------------------------------------------------------------------
// serve

fn serve(args: &[String]) -> Res<()> {
    let name = opt(args, "--name").unwrap_or("agent").to_string();
    let ports: Vec<u16> = req(args, "--ports")?
        .split(',')
        .map(|p| parse(p, "port"))
        .collect::<Res<_>>()?;
    let protos: Vec<String> = opt(args, "--protocols")
        .unwrap_or("tcp,udp,sctp")
        .split(',')
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let open_log = |flag: &str| -> Res<Option<Log>> {
        match opt(args, flag) {
            Some(p) => Ok(Some(Arc::new(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("opening {p}: {e}"))?,
            )))),
            None => Ok(None),
        }
    };
    let log = open_log("--log")?;
    let tcp_log = open_log("--tcp-log")?;
    let mut threads = Vec::new();
    for &port in &ports {
        if protos.iter().any(|p| p == "tcp") {
            let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("tcp {port}: {e}"))?;
            let name = name.clone();
            let tcp_log = tcp_log.clone();
            threads.push(std::thread::spawn(move || tcp_server(l, name, tcp_log)));
        }
        if protos.iter().any(|p| p == "udp") {
            let s = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("udp {port}: {e}"))?;
            let log = log.clone();
            threads.push(std::thread::spawn(move || udp_server(s, log)));
        }
    }
    if protos.iter().any(|p| p == "sctp") {
        let fd = raw_socket(IPPROTO_SCTP)?;
        let set: HashSet<u16> = ports.iter().copied().collect();
        threads.push(std::thread::spawn(move || sctp_server(fd, set)));
    }
    println!("ready {name} ports {ports:?} protocols {protos:?}");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

type Log = Arc<Mutex<std::fs::File>>;

fn tcp_server(l: TcpListener, name: String, log: Option<Log>) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        if let (Some(log), Ok(peer)) = (&log, s.peer_addr()) {
            if let Ok(mut f) = log.lock() {
                let _ = writeln!(f, "{peer}");
                let _ = f.flush();
            }
        }
        let name = name.clone();
        std::thread::spawn(move || {
            if s.write_all(format!("{name}\n").as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

fn udp_server(s: UdpSocket, log: Option<Log>) {
    let mut buf = [0u8; 65536];
    loop {
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            continue;
        };
        if let Some(log) = &log {
            if let Ok(mut f) = log.lock() {
                let payload = String::from_utf8_lossy(&buf[..n]).replace('\n', "\\n");
                let _ = writeln!(f, "{} {}", from.ip(), payload);
                let _ = f.flush();
            }
        }
        let _ = s.send_to(&buf[..n], from);
    }
}

// ---------------------------------------------------------------------------------------------
// raw sockets and SCTP

/// An owned raw IPv4 socket.
struct Raw(i32);

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: closing a descriptor we own.
        unsafe {
            libc::close(self.0);
        }
    }
}

fn raw_socket(proto: i32) -> Res<Raw> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(format!(
            "raw socket (protocol {proto}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Raw(fd))
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn raw_send(fd: &Raw, dst: Ipv4Addr, pkt: &[u8]) -> Res<()> {
    let sa = sockaddr(dst);
    // SAFETY: pkt and sa are valid for the given lengths.
    let n = unsafe {
        libc::sendto(
            fd.0,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(format!("sendto {dst}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Receives one IPv4 packet (header included) or None on timeout.
fn raw_recv(fd: &Raw, buf: &mut [u8], timeout: Option<Duration>) -> Res<Option<usize>> {
    if let Some(t) = timeout {
        let mut p = libc::pollfd {
            fd: fd.0,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = t.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        if r == 0 {
            return Ok(None);
        }
    }
    // SAFETY: buf is valid for its length.
    let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(format!("recv: {}", std::io::Error::last_os_error()));
    }
    Ok(Some(n as usize))
}

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), as SCTP uses it (RFC 9260 App. A).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Fills in the SCTP checksum (bytes 8..12 of the common header), stored little-endian as the
/// kernel does (`cpu_to_le32(~crc32c(~0, ..))`).
fn sctp_set_checksum(pkt: &mut [u8]) {
    pkt[8..12].fill(0);
    let c = crc32c(pkt);
    pkt[8..12].copy_from_slice(&c.to_le_bytes());
}

fn sctp_checksum_ok(pkt: &[u8]) -> bool {
    if pkt.len() < 12 {
        return false;
    }
    let mut v = pkt.to_vec();
    let want = [v[8], v[9], v[10], v[11]];
    v[8..12].fill(0);
    crc32c(&v).to_le_bytes() == want
}

/// An INIT (type 1) or INIT-ACK (type 2) packet: common header + one chunk with the fixed
/// fields; INIT-ACK carries a State Cookie parameter (type 7, 8 bytes of cookie).
fn sctp_init_packet(chunk_type: u8, sport: u16, dport: u16, vtag: u32, init_tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(44);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    let params: Vec<u8> = if chunk_type == 2 {
        let mut c = Vec::new();
        c.extend_from_slice(&7u16.to_be_bytes());
        c.extend_from_slice(&12u16.to_be_bytes());
        c.extend_from_slice(&rand_u32().to_be_bytes());
        c.extend_from_slice(&rand_u32().to_be_bytes());
        c
    } else {
        Vec::new()
    };
    let len = 20 + params.len() as u16;
    p.push(chunk_type);
    p.push(0);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&init_tag.to_be_bytes());
    p.extend_from_slice(&65536u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&rand_u32().to_be_bytes()); // initial TSN
    p.extend_from_slice(&params);
    sctp_set_checksum(&mut p);
    p
}

/// A received IPv4 packet carrying SCTP: (source, SCTP bytes).
fn split_ipv4(pkt: &[u8]) -> Option<(Ipv4Addr, &[u8])> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let ihl = (pkt[0] & 0x0f) as usize * 4;
    let total = (u16::from_be_bytes([pkt[2], pkt[3]]) as usize).min(pkt.len());
    if total < ihl + 12 {
        return None;
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    Some((src, &pkt[ihl..total]))
}

/// Fields of an SCTP packet whose first chunk is INIT/INIT-ACK: (sport, dport, vtag, chunk
/// type, initiate tag).
fn sctp_fields(s: &[u8]) -> Option<(u16, u16, u32, u8, u32)> {
    if s.len() < 12 + 20 {
        return None;
    }
    let sport = u16::from_be_bytes([s[0], s[1]]);
    let dport = u16::from_be_bytes([s[2], s[3]]);
    let vtag = u32::from_be_bytes([s[4], s[5], s[6], s[7]]);
    let ty = s[12];
    let tag = u32::from_be_bytes([s[16], s[17], s[18], s[19]]);
    Some((sport, dport, vtag, ty, tag))
}

fn sctp_server(fd: Raw, ports: HashSet<u16>) {
    let mut buf = [0u8; 65536];
    loop {
        let Ok(Some(n)) = raw_recv(&fd, &mut buf, None) else {
            continue;
        };
        let Some((src, s)) = split_ipv4(&buf[..n]) else {
            continue;
        };
        let Some((sport, dport, _vtag, ty, tag)) = sctp_fields(s) else {
            continue;
        };
        if ty != 1 || !ports.contains(&dport) || !sctp_checksum_ok(s) {
            continue;
        }
        let ack = sctp_init_packet(2, dport, sport, tag, rand_u32());
        let _ = raw_send(&fd, src, &ack);
    }
}

fn probe_sctp(ip: Ipv4Addr, port: u16, timeout: Duration) -> Res<()> {
    let fd = raw_socket(IPPROTO_SCTP)?;
    let sport = 20000 + (rand_u32() % 40000) as u16;
    let tag = rand_u32() | 1; // never 0
    let init = sctp_init_packet(1, sport, port, 0, tag);
    raw_send(&fd, ip, &init)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timeout waiting for INIT-ACK".into());
        }
        let Some(n) = raw_recv(&fd, &mut buf, Some(left))? else {
            return Err("timeout waiting for INIT-ACK".into());
        };
        let Some((src, s)) = split_ipv4(&buf[..n]) else {
            continue;
        };
        if src != ip {
            continue;
        }
        if let Some((sp, dp, vtag, ty, _)) = sctp_fields(s) {
            if sp == port && dp == sport && vtag == tag && ty == 2 {
                if !sctp_checksum_ok(s) {
                    return Err("INIT-ACK with a bad checksum".into());
                }
                return Ok(());
            }
        }
        // An ABORT (type 6) for our tag would mean a refusal; keep waiting for the INIT-ACK.
    }
}

// ---------------------------------------------------------------------------------------------
// probe

fn probe_tcp(ip: Ipv4Addr, port: u16, timeout: Duration) -> Res<()> {
    let s = TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(ip, port)), timeout)
        .map_err(|e| e.to_string())?;
    drop(s);
    Ok(())
}

fn probe_udp(ip: Ipv4Addr, port: u16, timeout: Duration) -> Res<()> {
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect((ip, port)).map_err(|e| e.to_string())?;
    let nonce = format!("probe-{:08x}{:08x}", rand_u32(), rand_u32());
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    // Resend every 250 ms within the timeout (a single datagram may meet a neighbour entry
    // still resolving).
    let mut next_send = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err("timeout waiting for the echo".into());
        }
        if now >= next_send {
            s.send(nonce.as_bytes()).map_err(|e| e.to_string())?;
            next_send = now + Duration::from_millis(250);
        }
        let wait = deadline.min(next_send).saturating_duration_since(now);
        s.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        match s.recv(&mut buf) {
            Ok(n) if &buf[..n] == nonce.as_bytes() => return Ok(()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn probe_main(args: &[String]) -> Res<()> {
    let timeout = Duration::from_millis(parse(
        opt(args, "--timeout-ms").unwrap_or("1000"),
        "timeout",
    )?);
    let mut lines = Vec::new();
    for l in std::io::stdin().lock().lines() {
        let l = l.map_err(|e| e.to_string())?;
        if !l.trim().is_empty() {
            lines.push(l);
        }
    }
    let handles: Vec<_> = lines
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (proto, ip, port) = match f.as_slice() {
                    [p, i, o] => (p.to_ascii_lowercase(), i.to_string(), o.to_string()),
                    _ => {
                        return format!(
                            "{{\"line\":{},\"ok\":false,\"ms\":0,\"error\":\"bad probe line\"}}",
                            json_str(&l)
                        )
                    }
                };
                let start = Instant::now();
                let r = match (ip.parse::<Ipv4Addr>(), port.parse::<u16>()) {
                    (Ok(a), Ok(p)) => match proto.as_str() {
                        "tcp" => probe_tcp(a, p, timeout),
                        "udp" => probe_udp(a, p, timeout),
                        "sctp" => probe_sctp(a, p, timeout),
                        _ => Err(format!("unknown protocol {proto}")),
                    },
                    _ => Err("bad address or port".into()),
                };
                let ms = start.elapsed().as_secs_f64() * 1000.0;
                let err = match &r {
                    Ok(()) => "null".to_string(),
                    Err(e) => json_str(e),
                };
                format!(
                    "{{\"proto\":{},\"ip\":{},\"port\":{},\"ok\":{},\"ms\":{:.3},\"error\":{}}}",
                    json_str(&proto),
                    json_str(&ip),
                    port.parse::<u16>().unwrap_or(0),
                    r.is_ok(),
                    ms,
                    err
                )
            })
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for h in handles {
        let line = h
            .join()
            .unwrap_or_else(|_| "{\"ok\":false,\"error\":\"probe thread panicked\"}".into());
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// spoof

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in h.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn spoof(args: &[String]) -> Res<()> {
    let src: Ipv4Addr = parse(req(args, "--src")?, "--src")?;
    let dst: Ipv4Addr = parse(req(args, "--dst")?, "--dst")?;
    let port: u16 = parse(req(args, "--port")?, "--port")?;
    let sport: u16 = parse(opt(args, "--sport").unwrap_or("40000"), "--sport")?;
    let payload = req(args, "--payload")?.as_bytes();
    let fd = raw_socket(libc::IPPROTO_RAW)?; // IPPROTO_RAW implies IP_HDRINCL
    let one: libc::c_int = 1;
    // SAFETY: a valid int option.
    unsafe {
        libc::setsockopt(
            fd.0,
            libc::IPPROTO_IP,
            libc::IP_HDRINCL,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&(rand_u32() as u16).to_be_bytes());
    p.extend_from_slice(&[0x40, 0, 64, 17, 0, 0]); // DF, TTL 64, UDP, checksum later
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = ip_checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed on IPv4)
    p.extend_from_slice(payload);
    raw_send(&fd, dst, &p)?;
    println!("sent {} bytes {src}:{sport} -> {dst}:{port}", p.len());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// stream

fn stream(args: &[String]) -> Res<()> {
    let ip: Ipv4Addr = parse(req(args, "--ip")?, "--ip")?;
    let port: u16 = parse(req(args, "--port")?, "--port")?;
    let interval = Duration::from_millis(parse(
        opt(args, "--interval-ms").unwrap_or("100"),
        "interval",
    )?);
    let duration = opt(args, "--duration-ms")
        .map(|d| parse::<u64>(d, "duration").map(Duration::from_millis))
        .transpose()?;
    let start = Instant::now();
    let s = TcpStream::connect_timeout(
        &SocketAddr::V4(SocketAddrV4::new(ip, port)),
        Duration::from_secs(3),
    )
    .map_err(|e| format!("connect {ip}:{port}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => {
                    let _ = writeln!(out, "closed {}", start.elapsed().as_millis());
                    return;
                }
                Ok(_) => {
                    if first {
                        // The server's name line.
                        first = false;
                        let _ = writeln!(
                            out,
                            "connected {} {}",
                            start.elapsed().as_millis(),
                            line.trim()
                        );
                    } else if let Some(seq) = line.trim().strip_prefix("seq ") {
                        let _ = writeln!(out, "echo {seq} {}", start.elapsed().as_millis());
                    }
                    let _ = out.flush();
                }
                Err(e) => {
                    let _ = writeln!(out, "error {} {e}", start.elapsed().as_millis());
                    return;
                }
            }
        }
    });
    let mut seq = 0u64;
    loop {
        if duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if w.write_all(format!("seq {seq}\n").as_bytes()).is_err() {
            break;
        }
        seq += 1;
        std::thread::sleep(interval);
    }
    let _ = w.shutdown(std::net::Shutdown::Write);
    let _ = reader.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_check_value() {
        assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
    }
}
