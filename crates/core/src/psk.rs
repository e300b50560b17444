//! Cluster preshared keys: one WireGuard PSK per pair of node keys, derived from a cluster secret
//! that every node holds in a file and that never travels through the registry.
//!
//! `psk = HKDF-SHA256(salt = "weft cluster psk v1", ikm = secret,
//! info = generation (u64, big-endian) ‖ lower public key ‖ higher public key)`: both ends of a
//! pair derive the same key, every (key pair, generation) gets its own, and bumping the
//! generation (`keyctl psk rotate`) replaces every PSK in the cluster. The secret is 32 bytes in
//! base64 (`wg genpsk` or `keyctl genkey` output). Neither the secret nor a derived PSK has a
//! `Debug`/`Display` that shows it; both are wiped from memory when dropped.

use crate::keys::PublicKey;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hkdf::Hkdf;
use sha2::Sha256;
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// HKDF salt: names the scheme and its version.
pub const SALT: &[u8] = b"weft cluster psk v1";

/// Why a cluster secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("cluster secret is not valid base64 (make one with `wg genpsk` or `keyctl genkey`)")]
    Base64,
    #[error("cluster secret must be 32 bytes, got {0}")]
    Length(usize),
    #[error("cluster secret is all zeros")]
    Zero,
}

/// The cluster secret. Wiped on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct ClusterSecret([u8; 32]);

impl ClusterSecret {
    /// Parses the secret file's content: 32 bytes in base64, surrounding whitespace ignored.
    pub fn from_base64(text: &str) -> Result<Self, SecretError> {
        let bytes = Zeroizing::new(B64.decode(text.trim()).map_err(|_| SecretError::Base64)?);
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SecretError::Length(bytes.len()))?;
        if arr == [0u8; 32] {
            return Err(SecretError::Zero);
        }
        Ok(ClusterSecret(arr))
    }

    /// The PSK of the pair (`a`, `b`) at `generation` (the same whichever way round).
    pub fn derive(&self, generation: u64, a: &PublicKey, b: &PublicKey) -> Psk {
        let (lo, hi) = if a.as_bytes() <= b.as_bytes() {
            (a, b)
        } else {
            (b, a)
        };
        let mut info = [0u8; 8 + 32 + 32];
        info[..8].copy_from_slice(&generation.to_be_bytes());
        info[8..40].copy_from_slice(lo.as_bytes());
        info[40..].copy_from_slice(hi.as_bytes());
        let hk = Hkdf::<Sha256>::new(Some(SALT), &self.0);
        let mut okm = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand cannot fail.
        if hk.expand(&info, &mut okm).is_err() {
            unreachable!("HKDF-SHA256 expands to 32 bytes");
        }
        Psk(okm)
    }
}

impl Drop for ClusterSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

/// One derived preshared key. Wiped on drop; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; 32]);

impl Psk {
    /// The raw key, for `Tunn::new` only.
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn secret(byte: u8) -> ClusterSecret {
        ClusterSecret::from_base64(&B64.encode([byte; 32])).expect("valid secret")
    }

    #[test]
    fn symmetric_and_distinct_per_pair_and_generation() {
        let s = secret(7);
        let a = PrivateKey::generate().public_key();
        let b = PrivateKey::generate().public_key();
        let c = PrivateKey::generate().public_key();
        assert_eq!(s.derive(1, &a, &b), s.derive(1, &b, &a));
        assert_ne!(s.derive(1, &a, &b), s.derive(2, &a, &b));
        assert_ne!(s.derive(1, &a, &b), s.derive(1, &a, &c));
        assert_ne!(s.derive(1, &a, &b), secret(8).derive(1, &a, &b));
    }

    #[test]
    fn known_vector() {
        // Independent computation of the documented formula with Python's standard library:
        // hmac/hashlib HKDF-SHA256 (keys from `wg pubkey`), salt "weft cluster psk v1", ikm = 32 × 0x07,
        // info = (5).to_bytes(8,'big') + lower key + higher key.
        let s = secret(7);
        let a = PrivateKey::from_bytes([1u8; 32]).public_key();
        let b = PrivateKey::from_bytes([2u8; 32]).public_key();
        let psk = s.derive(5, &a, &b);
        assert_eq!(B64.encode(psk.bytes()), KNOWN_VECTOR);
    }

    const KNOWN_VECTOR: &str = "EaN/dw3uVFlrIqyy4bqjAJd2X7jjbIOepNkPSZeJ4Bg=";

    #[test]
    fn refuses_bad_secrets_and_never_shows_them() {
        assert_eq!(
            ClusterSecret::from_base64("not base64!").err(),
            Some(SecretError::Base64)
        );
        assert_eq!(
            ClusterSecret::from_base64(&B64.encode([1u8; 16])).err(),
            Some(SecretError::Length(16))
        );
        assert_eq!(
            ClusterSecret::from_base64(&B64.encode([0u8; 32])).err(),
            Some(SecretError::Zero)
        );
        let text = B64.encode([9u8; 32]);
        let s = ClusterSecret::from_base64(&format!("  {text}\n")).expect("trimmed");
        assert!(!format!("{s:?}").contains(&text));
        let a = PrivateKey::generate().public_key();
        let psk = s.derive(0, &a, &a);
        assert!(!format!("{psk:?}").contains(&B64.encode(psk.bytes())));
    }
}
