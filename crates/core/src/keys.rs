//! X25519 keys in WireGuard's base64 format, interchangeable with `wg genkey` / `wg pubkey`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand_core::OsRng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use x25519_dalek::{PublicKey as DalekPublic, StaticSecret};

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64")]
    Base64,
    #[error("key must be 32 bytes, got {0}")]
    Length(usize),
    #[error("public key is a low-order point (no shared secret can come from it)")]
    LowOrder,
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = B64.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| KeyError::Length(len))
}

/// A peer's static public key. Parsing rejects low-order points.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Accepts 32 bytes that are not a low-order point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        // A clamped scalar is a multiple of 8, so any point whose order divides 8 maps to the
        // all-zero shared secret: that is exactly the set of keys WireGuard must refuse.
        let probe = StaticSecret::random_from_rng(OsRng);
        if !probe
            .diffie_hellman(&DalekPublic::from(bytes))
            .was_contributory()
        {
            return Err(KeyError::LowOrder);
        }
        Ok(PublicKey(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    /// Short fingerprint for logs and tables: the first 8 base64 characters.
    pub fn fingerprint(&self) -> String {
        self.to_base64().chars().take(8).collect()
    }

    pub fn to_dalek(&self) -> DalekPublic {
        DalekPublic::from(self.0)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PublicKey::from_bytes(decode32(s)?)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A static private key. `Debug` and `Display` never show it; the only way out is
/// [`PrivateKey::to_base64_secret`], whose name says what it does.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// A fresh random key from the OS RNG (clamped as `wg genkey` does).
    pub fn generate() -> Self {
        let mut bytes = StaticSecret::random_from_rng(OsRng).to_bytes();
        clamp(&mut bytes);
        PrivateKey(StaticSecret::from(bytes))
    }

    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        // Stored clamped like `wg genkey` output; X25519 clamps on use anyway, so `wg pubkey`
        // of an unclamped key gives the same public key.
        clamp(&mut bytes);
        PrivateKey(StaticSecret::from(bytes))
    }

    /// Parses `wg genkey` output.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        Ok(PrivateKey::from_bytes(decode32(s)?))
    }

    /// The base64 text of the secret, for the node's own 0600 key file and `keyctl genkey` only.
    pub fn to_base64_secret(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(DalekPublic::from(&self.0).to_bytes())
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }
}

fn clamp(b: &mut [u8; 32]) {
    b[0] &= 248;
    b[31] &= 127;
    b[31] |= 64;
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_private_key() {
        let k = PrivateKey::generate();
        let secret = k.to_base64_secret();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&secret), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn wg_compatible_vector() {
        // Produced with `wg genkey | tee k | wg pubkey`.
        let private =
            PrivateKey::from_base64("aNrQb7TjY+ndxv2khh6uKdM45OCrNqG8Q0ru9wqEbEY=").expect("valid");
        assert_eq!(
            private.public_key().to_base64(),
            "/wqsXpj2iffRbeG7sth82cEsyHKSgMRWJ3E0vPTJ/Qw="
        );
        assert_eq!(
            private.to_base64_secret(),
            "aNrQb7TjY+ndxv2khh6uKdM45OCrNqG8Q0ru9wqEbEY="
        );
    }

    #[test]
    fn rejects_low_order_and_bad_lengths() {
        let zero = B64.encode([0u8; 32]);
        assert_eq!(zero.parse::<PublicKey>(), Err(KeyError::LowOrder));
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(
            B64.encode(one).parse::<PublicKey>(),
            Err(KeyError::LowOrder)
        );
        // A point of order 8 (from the curve25519 low-order list).
        let order8: [u8; 32] = [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ];
        assert_eq!(
            B64.encode(order8).parse::<PublicKey>(),
            Err(KeyError::LowOrder)
        );
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
        assert_eq!("!!".parse::<PublicKey>(), Err(KeyError::Base64));
        let good = PrivateKey::generate().public_key();
        assert_eq!(good.to_base64().parse::<PublicKey>(), Ok(good));
    }
}
