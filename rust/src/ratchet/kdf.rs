//! The key derivation and message sealing steps, exactly as `docs/crypto.md` specifies them
//! (Signal's Double Ratchet §5.2 recommendations with teia's info strings).
//!
//! All functions are pure: bytes in, bytes out. Intermediate secrets are zeroized.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::OnceLock;

use zeroize::{Zeroize, Zeroizing};

use super::errors::{CryptoError, Result};

type HmacSha256 = Hmac<Sha256>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// HKDF info for X3DH's shared secret.
pub const INFO_X3DH: &[u8] = b"teia X3DH v1";
/// HKDF info for the root-key KDF.
pub const INFO_RATCHET: &[u8] = b"teia Ratchet v1";
/// HKDF info for message-key expansion.
pub const INFO_MESSAGE_KEYS: &[u8] = b"teia MessageKeys v1";

/// At most this many message keys are skipped (and stored) for one chain.
pub const MAX_SKIP: u32 = 1000;
/// At most this many skipped message keys are stored in all; the oldest are evicted.
pub const MAX_STORED_SKIPPED: usize = 2000;

/// Length of the appended HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// AES block size: ciphertexts are a positive multiple of this.
pub const BLOCK_LEN: usize = 16;

/// KDF_RK: HKDF-SHA256(salt = root key, IKM = DH output, info = "teia Ratchet v1") → 64 bytes,
/// split into the new root key and a chain key.
pub fn kdf_rk(
    root_key: &[u8; 32],
    dh_output: &[u8; 32],
) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let hk = Hkdf::<Sha256>::new(Some(root_key), dh_output);
    let mut okm = Zeroizing::new([0u8; 64]);
    hk.expand(INFO_RATCHET, okm.as_mut())
        .expect("64 bytes is a valid HKDF-SHA256 output length");
    let mut rk = Zeroizing::new([0u8; 32]);
    let mut ck = Zeroizing::new([0u8; 32]);
    rk.copy_from_slice(&okm[..32]);
    ck.copy_from_slice(&okm[32..]);
    (rk, ck)
}

/// KDF_CK: message key = HMAC-SHA256(chain key, 0x01), next chain key = HMAC-SHA256(chain key, 0x02).
/// Returns (next chain key, message key).
pub fn kdf_ck(chain_key: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    // Key the HMAC once (two compressions) and clone it for the second input.
    let keyed = <HmacSha256 as Mac>::new_from_slice(chain_key).expect("HMAC takes any key length");
    (hmac_finish(keyed.clone(), 0x02), hmac_finish(keyed, 0x01))
}

fn hmac_finish(mut mac: HmacSha256, byte: u8) -> Zeroizing<[u8; 32]> {
    mac.update(&[byte]);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// HMAC-SHA256 keyed with 32 zero bytes (the HKDF salt of message keys and X3DH), keyed once
/// per process: HKDF-Extract with that salt then costs two compressions instead of four.
fn zero_salt_hmac() -> HmacSha256 {
    static ZERO_SALT: OnceLock<HmacSha256> = OnceLock::new();
    ZERO_SALT
        .get_or_init(|| <HmacSha256 as Mac>::new_from_slice(&[0u8; 32]).expect("any key length"))
        .clone()
}

/// HKDF-Extract(salt = 32 zero bytes, ikm) as an `Hkdf` ready to expand.
pub(crate) fn hkdf_zero_salt(ikm: &[u8]) -> Hkdf<Sha256> {
    let mut extract = zero_salt_hmac();
    extract.update(ikm);
    let mut prk = Zeroizing::new([0u8; 32]);
    prk.copy_from_slice(&extract.finalize().into_bytes());
    Hkdf::<Sha256>::from_prk(prk.as_ref()).expect("a 32-byte PRK is valid for HKDF-SHA256")
}

/// The three values ENCRYPT expands a message key into.
pub struct MessageKeyMaterial {
    pub aes_key: Zeroizing<[u8; 32]>,
    pub hmac_key: Zeroizing<[u8; 32]>,
    pub iv: Zeroizing<[u8; 16]>,
}

/// HKDF-SHA256(salt = 32 zero bytes, IKM = message key, info = "teia MessageKeys v1") → 80 bytes
/// = AES-256 key ‖ HMAC key ‖ IV.
pub fn message_key_material(message_key: &[u8; 32]) -> MessageKeyMaterial {
    let hk = hkdf_zero_salt(message_key);
    let mut okm = Zeroizing::new([0u8; 80]);
    hk.expand(INFO_MESSAGE_KEYS, okm.as_mut())
        .expect("80 bytes is a valid HKDF-SHA256 output length");
    let mut m = MessageKeyMaterial {
        aes_key: Zeroizing::new([0u8; 32]),
        hmac_key: Zeroizing::new([0u8; 32]),
        iv: Zeroizing::new([0u8; 16]),
    };
    m.aes_key.copy_from_slice(&okm[..32]);
    m.hmac_key.copy_from_slice(&okm[32..64]);
    m.iv.copy_from_slice(&okm[64..]);
    m
}

/// X3DH's final KDF: HKDF-SHA256(salt = 32 zero bytes, IKM = 32 × 0xFF ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4],
/// info = "teia X3DH v1") → 32 bytes.
pub fn x3dh_kdf(dh_outputs: &[&[u8; 32]]) -> Zeroizing<[u8; 32]> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 + 32 * dh_outputs.len()));
    ikm.extend_from_slice(&[0xFFu8; 32]);
    for dh in dh_outputs {
        ikm.extend_from_slice(dh.as_slice());
    }
    let hk = hkdf_zero_salt(&ikm);
    let mut sk = Zeroizing::new([0u8; 32]);
    hk.expand(INFO_X3DH, sk.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    sk
}

/// ENCRYPT(mk, plaintext, ad): AES-256-CBC with PKCS#7 under the expanded key and IV, then the
/// full 32-byte HMAC-SHA256(HMAC key, ad ‖ ciphertext) appended.
pub fn seal(message_key: &[u8; 32], plaintext: &[u8], associated_data: &[u8]) -> Vec<u8> {
    let keys = message_key_material(message_key);
    let enc = Aes256CbcEnc::new(keys.aes_key.as_ref().into(), keys.iv.as_ref().into());
    let mut out = enc.encrypt_padded_vec_mut::<Pkcs7>(plaintext);
    let tag = mac(&keys.hmac_key, associated_data, &out);
    out.extend_from_slice(&tag);
    out
}

/// DECRYPT: checks the tag in constant time before touching the ciphertext, then decrypts.
pub fn open(message_key: &[u8; 32], sealed: &[u8], associated_data: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < BLOCK_LEN + MAC_LEN || (sealed.len() - MAC_LEN) % BLOCK_LEN != 0 {
        return Err(CryptoError::InvalidMessage(
            "ciphertext length is not a positive multiple of 16 plus a 32-byte tag",
        ));
    }
    let (ciphertext, tag) = sealed.split_at(sealed.len() - MAC_LEN);
    let keys = message_key_material(message_key);
    let mut m =
        <HmacSha256 as Mac>::new_from_slice(keys.hmac_key.as_ref()).expect("any key length");
    m.update(associated_data);
    m.update(ciphertext);
    m.verify_slice(tag)
        .map_err(|_| CryptoError::Decryption("message authentication failed"))?;
    let dec = Aes256CbcDec::new(keys.aes_key.as_ref().into(), keys.iv.as_ref().into());
    let mut plaintext = dec
        .decrypt_padded_vec_mut::<Pkcs7>(ciphertext)
        .map_err(|_| CryptoError::Decryption("bad padding"))?;
    // `decrypt_padded_vec_mut` allocates exactly; nothing to scrub besides the caller's copy.
    plaintext.shrink_to_fit();
    Ok(plaintext)
}

fn mac(hmac_key: &[u8; 32], associated_data: &[u8], ciphertext: &[u8]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(hmac_key).expect("any key length");
    m.update(associated_data);
    m.update(ciphertext);
    let mut tag = [0u8; 32];
    tag.copy_from_slice(&m.finalize().into_bytes());
    tag
}

/// Zeroize a fixed buffer in place (used by callers that hold keys in plain arrays).
pub fn wipe(buf: &mut [u8]) {
    buf.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HMAC-SHA256(key, [byte]) keyed afresh, independent of `kdf_ck`'s keyed-once path.
    fn hmac_byte(key: &[u8; 32], byte: u8) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap();
        mac.update(&[byte]);
        mac.finalize().into_bytes().into()
    }

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    #[test]
    fn kdf_ck_is_hmac_of_constant_bytes() {
        let ck = [7u8; 32];
        let (next, mk) = kdf_ck(&ck);
        assert_eq!(*mk, hmac_byte(&ck, 1));
        assert_eq!(*next, hmac_byte(&ck, 2));
        assert_ne!(*next, *mk);
    }

    #[test]
    fn hmac_sha256_rfc4231_case_2() {
        // RFC 4231 test case 2 checks the HMAC building block.
        let mut m = <HmacSha256 as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            m.finalize().into_bytes().to_vec(),
            h("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
    }

    #[test]
    fn hkdf_rfc5869_case_1() {
        // RFC 5869 test case 1 checks the HKDF building block.
        let ikm = h("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
        let salt = h("000102030405060708090a0b0c");
        let info = h("f0f1f2f3f4f5f6f7f8f9");
        let hk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        assert_eq!(
            okm.to_vec(),
            h("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
        );
    }

    #[test]
    fn kdf_rk_splits_hkdf_output() {
        let rk = [1u8; 32];
        let dh = [2u8; 32];
        let (new_rk, ck) = kdf_rk(&rk, &dh);
        let hk = Hkdf::<Sha256>::new(Some(&rk), &dh);
        let mut okm = [0u8; 64];
        hk.expand(INFO_RATCHET, &mut okm).unwrap();
        assert_eq!(new_rk.as_slice(), &okm[..32]);
        assert_eq!(ck.as_slice(), &okm[32..]);
    }

    #[test]
    fn message_key_material_splits_80_bytes() {
        let mk = [9u8; 32];
        let m = message_key_material(&mk);
        let hk = Hkdf::<Sha256>::new(Some(&[0u8; 32]), &mk);
        let mut okm = [0u8; 80];
        hk.expand(INFO_MESSAGE_KEYS, &mut okm).unwrap();
        assert_eq!(m.aes_key.as_slice(), &okm[..32]);
        assert_eq!(m.hmac_key.as_slice(), &okm[32..64]);
        assert_eq!(m.iv.as_slice(), &okm[64..]);
    }

    #[test]
    fn x3dh_kdf_prefixes_ff_padding() {
        let d = [[3u8; 32], [4u8; 32], [5u8; 32]];
        let sk = x3dh_kdf(&[&d[0], &d[1], &d[2]]);
        let mut ikm = vec![0xFF; 32];
        for x in &d {
            ikm.extend_from_slice(x);
        }
        let hk = Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm);
        let mut okm = [0u8; 32];
        hk.expand(INFO_X3DH, &mut okm).unwrap();
        assert_eq!(sk.as_slice(), &okm);
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let mk = [42u8; 32];
        for len in [0usize, 1, 15, 16, 17, 256, 1000] {
            let pt = vec![0xAB; len];
            let sealed = seal(&mk, &pt, b"ad");
            assert_eq!(sealed.len(), (len / 16 + 1) * 16 + MAC_LEN);
            assert_eq!(open(&mk, &sealed, b"ad").unwrap(), pt);
            assert!(matches!(
                open(&mk, &sealed, b"AD"),
                Err(CryptoError::Decryption(_))
            ));
            let mut bad = sealed.clone();
            bad[0] ^= 1;
            assert!(matches!(
                open(&mk, &bad, b"ad"),
                Err(CryptoError::Decryption(_))
            ));
            assert!(matches!(
                open(&mk, &sealed[..sealed.len() - 1], b"ad"),
                Err(CryptoError::InvalidMessage(_))
            ));
        }
        assert!(matches!(
            open(&mk, &[], b""),
            Err(CryptoError::InvalidMessage(_))
        ));
    }
}
