//! The 256-bit Kademlia keyspace of libp2p's kad-dht: [`Key`] and the XOR [`Distance`].
//!
//! A peer's key is the SHA-256 of its peer ID bytes (the multihash, as carried on the wire); a
//! record's key is the SHA-256 of the record key bytes. Hashing both puts peers and records in
//! one uniformly filled space, and it means a peer cannot choose where it lands without grinding
//! keys, which is what the eclipse limits in [`super::table`] assume.

use std::fmt;

use rand_core::RngCore;
use sha2::{Digest, Sha256};

/// Number of bits in a key, and so the number of k-buckets in a routing table.
pub const KEY_BITS: usize = 256;

/// Number of bytes in a key.
pub const KEY_BYTES: usize = KEY_BITS / 8;

/// A point in the keyspace: 32 bytes, read as a big-endian integer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; KEY_BYTES]);

impl Key {
    /// The key of a peer: SHA-256 of its peer ID bytes (the multihash form, e.g. `0x00 0x24 …`
    /// for an inlined Ed25519 key). The bytes are not parsed; any byte string has a key.
    pub fn from_peer_id_bytes(peer_id: &[u8]) -> Key {
        Key(Sha256::digest(peer_id).into())
    }

    /// The key of a record (value, provider or peer record): SHA-256 of the record key bytes.
    pub fn from_raw(record_key: &[u8]) -> Key {
        Key(Sha256::digest(record_key).into())
    }

    /// A key from 32 bytes that are already a point in the keyspace (no hashing): for keys that
    /// were stored or received in hashed form.
    pub const fn from_hashed(bytes: [u8; KEY_BYTES]) -> Key {
        Key(bytes)
    }

    /// The 32 bytes of the key, big-endian.
    pub const fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// The XOR distance between two keys.
    pub fn distance(&self, other: &Key) -> Distance {
        Distance(xor(&self.0, &other.0))
    }

    /// The unique key at `distance` from this one (`self XOR distance`).
    pub fn at_distance(&self, distance: &Distance) -> Key {
        Key(xor(&self.0, &distance.0))
    }

    /// A uniformly random key whose distance to `self` falls in bucket `index` (its highest set
    /// bit is bit `index`, counting from the least significant bit). `None` if `index` ≥ 256.
    ///
    /// This is what a bucket refresh looks up: any key in the bucket's range.
    pub fn random_in_bucket<R: RngCore + ?Sized>(&self, index: usize, rng: &mut R) -> Option<Key> {
        Distance::random_in_bucket(index, rng).map(|d| self.at_distance(&d))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(")?;
        write_hex(f, &self.0)?;
        write!(f, ")")
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// The XOR of two keys, read as a big-endian 256-bit integer: smaller is closer.
///
/// `Ord` is the integer order, so sorting by `Distance` sorts by closeness.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Distance([u8; KEY_BYTES]);

impl Distance {
    /// The distance of a key to itself.
    pub const ZERO: Distance = Distance([0; KEY_BYTES]);

    /// A distance from its 32 big-endian bytes.
    pub const fn from_bytes(bytes: [u8; KEY_BYTES]) -> Distance {
        Distance(bytes)
    }

    /// The 32 bytes of the distance, big-endian.
    pub const fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// Whether this is the distance of a key to itself.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_BYTES]
    }

    /// Number of leading zero bits: 256 for the zero distance, 0 when the top bit is set.
    pub fn leading_zeros(&self) -> u32 {
        let mut zeros = 0;
        for byte in self.0 {
            if byte != 0 {
                return zeros + byte.leading_zeros();
            }
            zeros += 8;
        }
        zeros
    }

    /// The k-bucket this distance falls in: `255 - leading_zeros`, so bucket 255 holds the far
    /// half of the keyspace and bucket 0 the single closest key. `None` for the zero distance
    /// (a key is never in its own table).
    pub fn bucket_index(&self) -> Option<usize> {
        let zeros = self.leading_zeros() as usize;
        (KEY_BITS - 1).checked_sub(zeros)
    }

    /// Whether bit `bit` (0 = least significant) is set. `false` for `bit` ≥ 256.
    pub fn bit(&self, bit: usize) -> bool {
        if bit >= KEY_BITS {
            return false;
        }
        let byte = KEY_BYTES - 1 - bit / 8;
        self.0[byte] >> (bit % 8) & 1 == 1
    }

    /// A uniformly random distance in bucket `index`: bit `index` set, higher bits clear, lower
    /// bits random. `None` if `index` ≥ 256.
    pub fn random_in_bucket<R: RngCore + ?Sized>(index: usize, rng: &mut R) -> Option<Distance> {
        if index >= KEY_BITS {
            return None;
        }
        let mut bytes = [0u8; KEY_BYTES];
        rng.fill_bytes(&mut bytes);
        let top_byte = KEY_BYTES - 1 - index / 8;
        let bit_in_byte = index % 8;
        for byte in bytes.iter_mut().take(top_byte) {
            *byte = 0;
        }
        // Keep the bits below `bit_in_byte`, set `bit_in_byte`, clear the ones above it.
        let low_mask = ((1u16 << bit_in_byte) - 1) as u8;
        bytes[top_byte] = (bytes[top_byte] & low_mask) | (1 << bit_in_byte);
        Some(Distance(bytes))
    }
}

impl fmt::Debug for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Distance(")?;
        write_hex(f, &self.0)?;
        write!(f, ")")
    }
}

fn xor(a: &[u8; KEY_BYTES], b: &[u8; KEY_BYTES]) -> [u8; KEY_BYTES] {
    let mut out = [0u8; KEY_BYTES];
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x ^ y;
    }
    out
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for byte in bytes {
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kad::testutil::SplitMix64;

    fn key_with_last_byte(b: u8) -> Key {
        let mut bytes = [0u8; KEY_BYTES];
        bytes[KEY_BYTES - 1] = b;
        Key::from_hashed(bytes)
    }

    #[test]
    fn kad_key_is_sha256_of_peer_id_bytes() {
        // SHA-256("abc"), FIPS 180-2 test vector.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(
            hex::encode(Key::from_peer_id_bytes(b"abc").as_bytes()),
            expected
        );
        assert_eq!(Key::from_raw(b"abc"), Key::from_peer_id_bytes(b"abc"));
        assert_eq!(Key::from_raw(b"").to_string().len(), 64);
    }

    #[test]
    fn kad_distance_is_xor_and_symmetric() {
        let a = Key::from_raw(b"a");
        let b = Key::from_raw(b"b");
        assert_eq!(a.distance(&b), b.distance(&a));
        assert!(a.distance(&a).is_zero());
        assert_eq!(a.at_distance(&a.distance(&b)), b);
        let ab = a.distance(&b);
        for i in 0..KEY_BYTES {
            assert_eq!(ab.as_bytes()[i], a.as_bytes()[i] ^ b.as_bytes()[i]);
        }
    }

    #[test]
    fn kad_leading_zeros_and_bucket_index() {
        let zero = key_with_last_byte(0);
        assert_eq!(zero.distance(&zero).leading_zeros(), 256);
        assert_eq!(zero.distance(&zero).bucket_index(), None);
        assert_eq!(
            zero.distance(&key_with_last_byte(1)).bucket_index(),
            Some(0)
        );
        assert_eq!(
            zero.distance(&key_with_last_byte(2)).bucket_index(),
            Some(1)
        );
        assert_eq!(
            zero.distance(&key_with_last_byte(3)).bucket_index(),
            Some(1)
        );
        assert_eq!(
            zero.distance(&key_with_last_byte(0x80)).bucket_index(),
            Some(7)
        );
        let mut top = [0u8; KEY_BYTES];
        top[0] = 0x80;
        let d = Distance::from_bytes(top);
        assert_eq!(d.leading_zeros(), 0);
        assert_eq!(d.bucket_index(), Some(255));
        top[0] = 0;
        top[1] = 0x01;
        let d = Distance::from_bytes(top);
        assert_eq!(d.leading_zeros(), 15);
        assert_eq!(d.bucket_index(), Some(240));
        assert!(d.bit(240));
        assert!(!d.bit(241));
        assert!(!d.bit(999));
    }

    #[test]
    fn kad_distance_orders_as_big_endian_integer() {
        let zero = key_with_last_byte(0);
        let mut far = [0u8; KEY_BYTES];
        far[0] = 1;
        let far = Key::from_hashed(far);
        let near = key_with_last_byte(0xff);
        assert!(zero.distance(&near) < zero.distance(&far));
        assert!(Distance::ZERO < zero.distance(&near));
    }

    #[test]
    fn kad_random_key_falls_in_requested_bucket() {
        let mut rng = SplitMix64::new(7);
        let local = Key::from_raw(b"local");
        for index in 0..KEY_BITS {
            for _ in 0..4 {
                let key = local
                    .random_in_bucket(index, &mut rng)
                    .expect("index < 256");
                assert_eq!(local.distance(&key).bucket_index(), Some(index));
            }
        }
        assert!(local.random_in_bucket(256, &mut rng).is_none());
        assert!(Distance::random_in_bucket(usize::MAX, &mut rng).is_none());
    }
}
