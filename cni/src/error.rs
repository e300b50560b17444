//! CNI errors: a well-known code, a message and details, printed as JSON on stdout.

use serde::Serialize;

pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const UNSUPPORTED_FIELD: u32 = 2;
pub const UNKNOWN_CONTAINER: u32 = 3;
pub const INVALID_ENV: u32 = 4;
pub const IO_FAILURE: u32 = 5;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
pub const NOT_AVAILABLE: u32 = 50;
/// Plugin-specific: ADD found `CNI_IFNAME` already present in the container.
pub const IFACE_EXISTS: u32 = 100;
/// Plugin-specific: CHECK found the attachment different from `prevResult`.
pub const CHECK_FAILED: u32 = 101;
/// Plugin-specific: a netlink or system call failed during setup.
pub const SETUP_FAILED: u32 = 102;
/// Plugin-specific: the delegated IPAM plugin failed.
pub const IPAM_FAILED: u32 = 103;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn setup(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        CniError::new(SETUP_FAILED, what, e.to_string())
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

impl From<weft_sys::SysError> for CniError {
    fn from(e: weft_sys::SysError) -> Self {
        CniError::setup("system call failed", e)
    }
}

pub type Result<T> = std::result::Result<T, CniError>;
