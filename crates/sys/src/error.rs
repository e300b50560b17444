use std::io;

/// Errors from the weft-sys layer.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being attempted.
        context: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// A netlink request was rejected by the kernel or the connection failed.
    #[error("netlink {context}: {source}")]
    Netlink {
        /// What was being attempted.
        context: String,
        /// The underlying rtnetlink error (boxed: it can carry a whole netlink message).
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// The named network interface does not exist.
    #[error("no such interface: {0}")]
    NoSuchLink(String),
    /// An interface name is too long or contains a NUL byte.
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    /// Arguments that cannot form a valid request (e.g. prefix length out of range).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A constructor that registers with tokio was called outside a tokio runtime.
    #[error("{0} must be called from within a tokio runtime")]
    NoRuntime(&'static str),
    /// The kernel refused `IFF_MULTI_QUEUE` for a TUN device (`EINVAL` from `TUNSETIFF`):
    /// the kernel has no multi-queue TUN, or an interface of that name exists without it.
    /// Opening a single queue may still work.
    #[error("TUN {name:?}: the kernel refused IFF_MULTI_QUEUE (multi-queue TUN): {reason}")]
    MultiQueueUnsupported {
        /// The interface name asked for.
        name: String,
        /// Why the kernel refused, as far as we can tell.
        reason: String,
    },
    /// The kernel answered with something we could not interpret.
    #[error("unexpected kernel reply: {0}")]
    Unexpected(String),
}

impl SysError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        SysError::Io {
            context: context.into(),
            source,
        }
    }

    /// Errors unless the caller runs inside a tokio runtime (registering an fd or
    /// spawning a task would panic otherwise).
    pub(crate) fn require_runtime(what: &'static str) -> Result<(), SysError> {
        tokio::runtime::Handle::try_current()
            .map(|_| ())
            .map_err(|_| SysError::NoRuntime(what))
    }

    pub(crate) fn netlink(context: impl Into<String>, source: rtnetlink::Error) -> Self {
        SysError::Netlink {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// Whether this is [`SysError::MultiQueueUnsupported`]: the caller may retry with one
    /// TUN queue.
    pub fn is_multi_queue_unsupported(&self) -> bool {
        matches!(self, SysError::MultiQueueUnsupported { .. })
    }

    /// The OS errno behind this error, if there is one (netlink errors carry the
    /// kernel's errno as well).
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysError::Io { source, .. } => source.raw_os_error(),
            SysError::Netlink { source, .. } => netlink_errno(source),
            SysError::MultiQueueUnsupported { .. } => Some(libc::EINVAL),
            _ => None,
        }
    }
}

/// The positive errno carried by a netlink error reply, if any.
pub(crate) fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => {
            let code = msg.raw_code();
            (code != 0).then_some(code.abs())
        }
        _ => None,
    }
}
