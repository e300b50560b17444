//! nftables and conntrack over netlink (`NETLINK_NETFILTER`), without the `nft` or `conntrack`
//! binaries: k3s/k3d nodes have none, and nothing on a node may be assumed but the kernel.
//!
//! In: netlink messages built with [`Msg`] (header, `nfgenmsg`, attributes). Out: batches sent
//! in one `sendmsg` and the kernel's answers read back ([`send_batch`]: which message, by its
//! sequence number, the kernel refused and why), dumps read to `NLMSG_DONE` ([`Socket::dump`]),
//! and attribute parsing for the replies ([`attrs`]).
//!
//! The jobs live in submodules:
//! * [`masq`]: the pod masquerade table (`ip`/`ip6 NAME`), [`install_masquerade`];
//! * [`policy`]: the NetworkPolicy program of `weft_core::netpol::program` as table
//!   `inet weft-policy`, [`policy::apply_policy`] and friends;
//! * [`conntrack`]: listing and deleting conntrack entries (ctnetlink).

pub mod conntrack;
pub mod masq;
pub mod policy;

pub use masq::{install_masquerade, masquerade_rules, CHAIN};

use crate::SysError;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub(crate) const NETLINK_NETFILTER: libc::c_int = 12;
pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 16;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 17;
pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
pub(crate) const NFT_MSG_GETRULE: u16 = 7;
pub(crate) const NFT_MSG_NEWSET: u16 = 9;
pub(crate) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(crate) const NFT_MSG_GETGEN: u16 = 16;

pub(crate) const NFTA_TABLE_NAME: u16 = 1;
pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;
pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(crate) const NFTA_RULE_TABLE: u16 = 1;
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_EXPR_NAME: u16 = 1;
pub(crate) const NFTA_EXPR_DATA: u16 = 2;
pub(crate) const NFTA_PAYLOAD_DREG: u16 = 1;
pub(crate) const NFTA_PAYLOAD_BASE: u16 = 2;
pub(crate) const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub(crate) const NFTA_PAYLOAD_LEN: u16 = 4;
pub(crate) const NFTA_CMP_SREG: u16 = 1;
pub(crate) const NFTA_CMP_OP: u16 = 2;
pub(crate) const NFTA_CMP_DATA: u16 = 3;
pub(crate) const NFTA_BITWISE_SREG: u16 = 1;
pub(crate) const NFTA_BITWISE_DREG: u16 = 2;
pub(crate) const NFTA_BITWISE_LEN: u16 = 3;
pub(crate) const NFTA_BITWISE_MASK: u16 = 4;
pub(crate) const NFTA_BITWISE_XOR: u16 = 5;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
pub(crate) const NFTA_VERDICT_CODE: u16 = 1;
pub(crate) const NFTA_VERDICT_CHAIN: u16 = 2;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
pub(crate) const NLA_TYPE_MASK: u16 = 0x3fff;

pub(crate) const NFT_REG_VERDICT: u32 = 0;
pub(crate) const NFT_REG_1: u32 = 1;
pub(crate) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub(crate) const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub(crate) const NFT_CMP_EQ: u32 = 0;
pub(crate) const NFT_CMP_NEQ: u32 = 1;
pub(crate) const NF_DROP: u32 = 0;
pub(crate) const NF_ACCEPT: u32 = 1;
/// `NFT_JUMP` (-3) as the kernel reads it from a big-endian u32.
pub(crate) const NFT_JUMP: u32 = (-3i32) as u32;
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NFPROTO_IPV4: u8 = 2;
pub(crate) const NFPROTO_IPV6: u8 = 10;

/// Size of `nlmsghdr` + `nfgenmsg`.
#[cfg(test)]
pub(crate) const HDR: usize = 20;

/// A netlink message being built: header, `nfgenmsg`, attributes.
#[derive(Debug)]
pub(crate) struct Msg {
    buf: Vec<u8>,
    /// Offsets of the length fields of open nested attributes.
    open: Vec<usize>,
}

impl Msg {
    pub(crate) fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            open: Vec::new(),
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// The bytes written so far (to check an attribute still fits its 16-bit length).
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    /// Attributes already encoded (and aligned), appended as they are.
    pub(crate) fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    pub(crate) fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = Vec::with_capacity(s.len() + 1);
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        self.attr(kind, &b)
    }

    /// A 32-bit attribute; nf_tables takes them in network byte order.
    pub(crate) fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_be_bytes())
    }

    /// A 64-bit attribute in network byte order (counters).
    pub(crate) fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.attr(kind, &v.to_be_bytes())
    }

    pub(crate) fn begin(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub(crate) fn end(&mut self) -> &mut Self {
        if let Some(at) = self.open.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// `NFTA_DATA_VALUE` nested under `kind`.
    pub(crate) fn data(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        self.begin(kind).attr(NFTA_DATA_VALUE, value).end()
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `REG1 <op> value`.
pub(crate) fn cmp(m: &mut Msg, op: u32, value: &[u8]) {
    expr_start(m, "cmp");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_CMP_SREG, NFT_REG_1)
        .u32(NFTA_CMP_OP, op)
        .data(NFTA_CMP_DATA, value)
        .end()
        .end();
}

/// `REG1 = header(base)[offset..offset+len]`.
pub(crate) fn payload(m: &mut Msg, base: u32, offset: u32, len: u32) {
    expr_start(m, "payload");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_PAYLOAD_DREG, NFT_REG_1)
        .u32(NFTA_PAYLOAD_BASE, base)
        .u32(NFTA_PAYLOAD_OFFSET, offset)
        .u32(NFTA_PAYLOAD_LEN, len)
        .end()
        .end();
}

/// `REG1 = REG1 & mask` (the register holds `mask.len()` bytes).
pub(crate) fn mask(m: &mut Msg, mask: &[u8]) {
    expr_start(m, "bitwise");
    m.begin(NFTA_EXPR_DATA)
        .u32(NFTA_BITWISE_SREG, NFT_REG_1)
        .u32(NFTA_BITWISE_DREG, NFT_REG_1)
        .u32(NFTA_BITWISE_LEN, mask.len() as u32)
        .data(NFTA_BITWISE_MASK, mask)
        .data(NFTA_BITWISE_XOR, &vec![0u8; mask.len()])
        .end()
        .end();
}

/// Starts expression `name` in a rule's expression list (closed by two `end`s).
pub(crate) fn expr_start(m: &mut Msg, name: &str) {
    m.begin(NFTA_LIST_ELEM).str(NFTA_EXPR_NAME, name);
}

/// The attributes in `buf`: (type without flags, payload). Stops at the first malformed one.
pub(crate) fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & NLA_TYPE_MASK;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let data = &buf[at + 4..at + len];
        at += (len + 3) & !3;
        Some((kind, data))
    })
}

/// The first attribute of type `kind` in `buf`.
pub(crate) fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, d)| d)
}

pub(crate) fn be_u64(d: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(d.get(..8)?.try_into().ok()?))
}

pub(crate) fn be_u16(d: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(d.get(..2)?.try_into().ok()?))
}

/// A string attribute without its trailing NUL.
pub(crate) fn nla_str(d: &[u8]) -> String {
    let end = d.iter().position(|b| *b == 0).unwrap_or(d.len());
    String::from_utf8_lossy(&d[..end]).into_owned()
}

/// One netlink message of a reply: type, flags, seq and what follows `nlmsghdr`.
#[derive(Debug)]
pub(crate) struct Reply {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: Vec<u8>,
}

impl Reply {
    /// For `NLMSG_ERROR`: the errno (0 = ack) and the extended-ack message, if any.
    pub(crate) fn error(&self) -> Option<(i32, Option<String>)> {
        if self.kind != libc::NLMSG_ERROR as u16 {
            return None;
        }
        let errno = i32::from_ne_bytes(self.body.get(..4)?.try_into().ok()?);
        // The refused request follows: only its header with NETLINK_CAP_ACK (NLM_F_CAPPED),
        // else all of it; then, with NLM_F_ACK_TLVS, the extended-ack attributes.
        let msg = if self.flags & 0x200 != 0 {
            let orig = if self.flags & 0x100 != 0 {
                16
            } else {
                u32::from_ne_bytes(self.body.get(4..8)?.try_into().ok()?) as usize
            };
            let off = 4 + ((orig + 3) & !3);
            // NLMSGERR_ATTR_MSG
            self.body.get(off..).and_then(|t| attr(t, 1)).map(nla_str)
        } else {
            None
        };
        Some((-errno, msg))
    }

    /// The attributes after `nfgenmsg`.
    pub(crate) fn nfattrs(&self) -> &[u8] {
        self.body.get(4..).unwrap_or(&[])
    }

    /// The `nfgenmsg` family.
    pub(crate) fn family(&self) -> u8 {
        self.body.first().copied().unwrap_or(0)
    }
}

/// A `NETLINK_NETFILTER` socket in the calling thread's network namespace.
#[derive(Debug)]
pub(crate) struct Socket {
    fd: OwnedFd,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<Reply>,
}

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

fn setsockopt_int(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: setsockopt with a valid int of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

impl Socket {
    pub(crate) fn open() -> io::Result<Socket> {
        // SAFETY: a plain socket(2) call; the descriptor is owned by `fd` below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        // Errors carry only the refused message's header, plus the kernel's explanation.
        setsockopt_int(&fd, SOL_NETLINK, NETLINK_CAP_ACK, 1);
        setsockopt_int(&fd, SOL_NETLINK, NETLINK_EXT_ACK, 1);
        Ok(Socket {
            fd,
            buf: vec![0u8; 1 << 17],
            pending: Default::default(),
        })
    }

    /// Makes room for a send of `len` bytes in one message (a batch must be one `sendmsg`
    /// to be one transaction) and for `rcv` bytes of answers.
    pub(crate) fn size_buffers(&self, len: usize, rcv: usize) {
        let want = |n: usize| n.min(i32::MAX as usize / 2) as libc::c_int;
        // SO_*BUFFORCE needs CAP_NET_ADMIN (as does nf_tables itself); fall back to the
        // capped variant otherwise.
        if !setsockopt_int(
            &self.fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            want(len + 65536),
        ) {
            setsockopt_int(
                &self.fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                want(len + 65536),
            );
        }
        if !setsockopt_int(&self.fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want(rcv)) {
            setsockopt_int(&self.fd, libc::SOL_SOCKET, libc::SO_RCVBUF, want(rcv));
        }
    }

    pub(crate) fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl is valid; family set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sendto with a buffer and address valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent as usize != bytes.len() {
            return Err(io::Error::other(format!(
                "netlink sent {sent} of {} bytes",
                bytes.len()
            )));
        }
        Ok(())
    }

    /// The next message from the kernel.
    pub(crate) fn recv(&mut self) -> io::Result<Reply> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Ok(r);
            }
            // SAFETY: recv into a buffer valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!("waiting for the kernel's answer: {e}"),
                ));
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(io::Error::other(format!(
                    "netlink datagram of {n} bytes truncated to {}",
                    self.buf.len()
                )));
            }
            let b = &self.buf[..n];
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
                if len < 16 || at + len > n {
                    return Err(io::Error::other(format!(
                        "malformed netlink message (length {len} at {at} of {n})"
                    )));
                }
                self.pending.push_back(Reply {
                    kind: u16::from_ne_bytes([b[at + 4], b[at + 5]]),
                    flags: u16::from_ne_bytes([b[at + 6], b[at + 7]]),
                    seq: u32::from_ne_bytes([b[at + 8], b[at + 9], b[at + 10], b[at + 11]]),
                    body: b[at + 16..at + len].to_vec(),
                });
                at += (len + 3) & !3;
            }
        }
    }

    /// Sends request `req` (with `NLM_F_ACK`, sequence `seq`) and returns the messages that
    /// answer it before its ack; a refusal is an error of the kernel's errno's kind, with its
    /// explanation (`ENOENT` is [`io::ErrorKind::NotFound`]).
    pub(crate) fn ask(&mut self, req: &[u8], seq: u32) -> io::Result<Vec<Reply>> {
        self.send(req)?;
        let mut out = Vec::new();
        loop {
            let r = self.recv()?;
            if r.seq != seq {
                continue; // a late answer to something earlier
            }
            match r.error() {
                Some((0, _)) => return Ok(out),
                Some((errno, msg)) => {
                    let e = io::Error::from_raw_os_error(errno);
                    return Err(match msg {
                        Some(m) => io::Error::new(e.kind(), format!("{e} ({m})")),
                        None => e,
                    });
                }
                None => out.push(r),
            }
        }
    }

    /// Sends the dump request `req` (with `NLM_F_DUMP`, sequence `seq`) and returns every
    /// message of the answer up to `NLMSG_DONE`. `Ok(None)` when the dump was interrupted by
    /// a concurrent change (`NLM_F_DUMP_INTR`): ask again. An `NLMSG_ERROR` is an error
    /// carrying the kernel's errno.
    pub(crate) fn dump(&mut self, req: &[u8], seq: u32) -> io::Result<Option<Vec<Reply>>> {
        self.send(req)?;
        let mut out = Vec::new();
        let mut intr = false;
        loop {
            let r = self.recv()?;
            if r.seq != seq {
                continue; // a late answer to something earlier
            }
            if r.flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
                intr = true;
            }
            if r.kind == libc::NLMSG_DONE as u16 {
                return Ok((!intr).then_some(out));
            }
            if let Some((errno, msg)) = r.error() {
                if errno == 0 {
                    continue;
                }
                let e = io::Error::from_raw_os_error(errno);
                return Err(match msg {
                    Some(m) => io::Error::new(e.kind(), format!("{e} ({m})")),
                    None => e,
                });
            }
            out.push(r);
        }
    }
}

/// A kernel refusal of one message of a batch.
#[derive(Debug)]
pub(crate) struct Refused {
    pub seq: u32,
    pub errno: i32,
    pub msg: Option<String>,
}

/// Sends `batch` (`BATCH_BEGIN` .. `BATCH_END`, nf_tables) in one `sendmsg`, so it stays one
/// transaction whatever its size, then asks for the ruleset generation on the same socket:
/// everything the kernel says about the batch comes before that answer. Returns the first
/// refusal (by sequence number) if any; messages without `NLM_F_ACK` are only answered when
/// refused, so a batch of thousands of messages does not flood the receive buffer with acks.
pub(crate) fn send_batch_on(
    sock: &mut Socket,
    batch: &[u8],
    fence_seq: u32,
) -> io::Result<Result<(), Refused>> {
    sock.size_buffers(batch.len(), 4 << 20);
    sock.send(batch).map_err(|e| {
        if e.raw_os_error() == Some(libc::EMSGSIZE) {
            io::Error::new(
                e.kind(),
                format!(
                    "{e}: a batch of {} bytes is bigger than the socket's send buffer \
                     (raising it needs CAP_NET_ADMIN)",
                    batch.len()
                ),
            )
        } else {
            e
        }
    })?;
    let m = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        fence_seq,
        libc::AF_UNSPEC as u8,
        0,
    );
    sock.send(&m.finish())?;
    let mut first: Option<Refused> = None;
    loop {
        let r = sock.recv()?;
        if r.seq == fence_seq {
            if r.error().is_some() {
                break;
            }
            continue; // NEWGEN; its ack follows
        }
        if let Some((errno, msg)) = r.error() {
            if errno != 0 && first.is_none() {
                first = Some(Refused {
                    seq: r.seq,
                    errno,
                    msg,
                });
            }
        }
    }
    Ok(match first {
        Some(r) => Err(r),
        None => Ok(()),
    })
}

/// [`send_batch_on`] on a fresh socket, as an `io::Error` naming the refused sequence number.
pub(crate) fn send_batch(batch: &[u8]) -> io::Result<()> {
    let mut sock = Socket::open()?;
    match send_batch_on(&mut sock, batch, u32::MAX)? {
        Ok(()) => Ok(()),
        Err(r) => {
            let e = io::Error::from_raw_os_error(r.errno);
            Err(io::Error::new(
                e.kind(),
                format!(
                    "message {} of the batch: {e}{}",
                    r.seq,
                    r.msg.map(|m| format!(" ({m})")).unwrap_or_default()
                ),
            ))
        }
    }
}

/// Wraps a kernel refusal as a [`SysError`] whose errno is the kernel's.
pub(crate) fn refused(context: String, r: &Refused) -> SysError {
    let detail = r
        .msg
        .as_ref()
        .map(|m| format!(" ({m})"))
        .unwrap_or_default();
    SysError::io(
        format!("{context}{detail}"),
        io::Error::from_raw_os_error(r.errno),
    )
}
