//! Sender keys for groups: Signal's sender-key model with teia's parameters.
//!
//! Each member owns one sending chain per group ([`SenderKey`]) and hands every other member a
//! copy of it ([`ReceiverKey`]) through a distribution message sent over the pairwise sessions.
//! A group message is then encrypted once, under the next message key of the chain, and signed
//! with the chain's Ed25519 key so members cannot forge messages in each other's name.
//!
//! The formats are specified in `docs/crypto.md` ("Sender keys"). The message-key expansion uses
//! its own HKDF info string, so a sender-key message key can never open a pairwise message.
//!
//! Decryption is transactional: the receiver state changes only when a message verifies and
//! decrypts. Every secret is zeroized on drop; no input makes this module panic.

use std::collections::VecDeque;
use std::fmt;

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::errors::{CryptoError, Result};
use super::kdf::{kdf_ck, BLOCK_LEN, MAC_LEN, MAX_SKIP, MAX_STORED_SKIPPED};

type HmacSha256 = Hmac<Sha256>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// HKDF info for expanding a sender-key message key (distinct from the pairwise ratchet's).
pub const INFO_SENDER_KEY: &[u8] = b"teia SenderKey v1";
/// Leading byte of group messages and distribution messages.
pub const MESSAGE_VERSION: u8 = 1;
/// Leading byte of serialised sender and receiver state.
pub const STATE_VERSION: u8 = 1;
/// Largest plaintext a group message carries (1 MiB).
pub const MAX_PLAINTEXT_LEN: usize = 1 << 20;

/// version ‖ chain id ‖ iteration: the associated data of the sealed part.
pub const HEADER_LEN: usize = 1 + 4 + 4;
/// Length of the Ed25519 signature that ends a group message.
pub const SIGNATURE_LEN: usize = 64;
/// version ‖ chain id ‖ iteration ‖ chain key ‖ signing public key.
pub const DISTRIBUTION_LEN: usize = HEADER_LEN + 32 + 32;
/// The shortest well-formed group message (empty plaintext: one padding block).
pub const MIN_MESSAGE_LEN: usize = HEADER_LEN + BLOCK_LEN + MAC_LEN + SIGNATURE_LEN;
/// The longest well-formed group message (a plaintext of `MAX_PLAINTEXT_LEN` bytes).
pub const MAX_MESSAGE_LEN: usize =
    HEADER_LEN + (MAX_PLAINTEXT_LEN / BLOCK_LEN + 1) * BLOCK_LEN + MAC_LEN + SIGNATURE_LEN;

// State blobs: version ‖ kind, so one kind of state never parses as the other.
const KIND_SENDER: u8 = b'S';
const KIND_RECEIVER: u8 = b'R';
const STATE_PREFIX_LEN: usize = 2;
const SENDER_STATE_LEN: usize = STATE_PREFIX_LEN + 4 + 4 + 32 + 32;
const RECEIVER_STATE_FIXED_LEN: usize = STATE_PREFIX_LEN + 4 + 4 + 32 + 32 + 2;
const SKIPPED_ENTRY_LEN: usize = 4 + 32;

/// One member's sending chain in one group. Secret: whoever holds it can send as this member.
pub struct SenderKey {
    chain_id: u32,
    /// The iteration of the next message this chain encrypts.
    iteration: u32,
    chain_key: Zeroizing<[u8; 32]>,
    /// Zeroized on drop by ed25519-dalek (`zeroize` feature).
    signing_key: SigningKey,
}

/// A member's copy of another member's sending chain.
pub struct ReceiverKey {
    chain_id: u32,
    /// The iteration whose message key `chain_key` derives next.
    iteration: u32,
    chain_key: Zeroizing<[u8; 32]>,
    verifying_key: VerifyingKey,
    /// Keys of skipped iterations, oldest (= lowest iteration) first, at most
    /// `MAX_STORED_SKIPPED`.
    skipped: VecDeque<SkippedKey>,
}

struct SkippedKey {
    iteration: u32,
    message_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderKey")
            .field("chain_id", &self.chain_id)
            .field("iteration", &self.iteration)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ReceiverKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverKey")
            .field("chain_id", &self.chain_id)
            .field("iteration", &self.iteration)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

impl SenderKey {
    /// A fresh chain: random chain key and signing key, iteration 0, random chain id unless given.
    pub fn generate(chain_id: Option<u32>) -> Self {
        let mut chain_key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(chain_key.as_mut());
        SenderKey {
            chain_id: chain_id.unwrap_or_else(|| OsRng.next_u32()),
            iteration: 0,
            chain_key,
            signing_key: SigningKey::generate(&mut OsRng),
        }
    }

    pub fn chain_id(&self) -> u32 {
        self.chain_id
    }

    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    pub fn signing_public_key(&self) -> [u8; 32] {
        self.signing_key.verifying_key().to_bytes()
    }

    /// Encrypt and sign one group message, then advance the chain.
    ///
    /// `version ‖ chain id ‖ iteration ‖ sealed ‖ Ed25519 signature over everything before it`.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(CryptoError::InvalidMessage(
                "plaintext is longer than 1 MiB; split it or send it out of band",
            ));
        }
        if self.iteration == u32::MAX {
            return Err(CryptoError::InvalidState(
                "sending chain exhausted; generate a new sender key and distribute it",
            ));
        }
        let (next_chain_key, message_key) = kdf_ck(&self.chain_key);
        let header = header(self.chain_id, self.iteration);
        let sealed = seal(&message_key, plaintext, &header);
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len() + SIGNATURE_LEN);
        out.extend_from_slice(&header);
        out.extend_from_slice(&sealed);
        let signature = self.signing_key.sign(&out);
        out.extend_from_slice(&signature.to_bytes());
        self.chain_key = next_chain_key;
        self.iteration += 1;
        Ok(out)
    }

    /// The message that hands this chain, from its current iteration on, to a member: it cannot
    /// derive the keys of messages already sent.
    pub fn distribution_message(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(DISTRIBUTION_LEN));
        out.extend_from_slice(&header(self.chain_id, self.iteration));
        out.extend_from_slice(self.chain_key.as_ref());
        out.extend_from_slice(&self.signing_public_key());
        out
    }

    /// `version ‖ 'S' ‖ chain id ‖ iteration ‖ chain key ‖ signing key seed` (74 bytes).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(SENDER_STATE_LEN));
        out.extend_from_slice(&[STATE_VERSION, KIND_SENDER]);
        out.extend_from_slice(&self.chain_id.to_be_bytes());
        out.extend_from_slice(&self.iteration.to_be_bytes());
        out.extend_from_slice(self.chain_key.as_ref());
        out.extend_from_slice(Zeroizing::new(self.signing_key.to_bytes()).as_ref());
        out
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if data.len() != SENDER_STATE_LEN {
            return Err(CryptoError::InvalidState(
                "sender key state has the wrong length",
            ));
        }
        if data[0] != STATE_VERSION || data[1] != KIND_SENDER {
            return Err(CryptoError::InvalidState(
                "not a sender key state, or of an unsupported version",
            ));
        }
        let mut r = Reader::new(&data[STATE_PREFIX_LEN..]);
        let chain_id = r.u32();
        let iteration = r.u32();
        let chain_key = r.key();
        let seed = r.key();
        Ok(SenderKey {
            chain_id,
            iteration,
            chain_key,
            signing_key: SigningKey::from_bytes(&seed),
        })
    }
}

impl ReceiverKey {
    /// Parse a distribution message strictly: exact length, known version, a usable signing key.
    pub fn from_distribution_message(message: &[u8]) -> Result<Self> {
        if message.len() != DISTRIBUTION_LEN {
            return Err(CryptoError::InvalidMessage(
                "distribution message has the wrong length",
            ));
        }
        if message[0] != MESSAGE_VERSION {
            return Err(CryptoError::InvalidMessage(
                "distribution message of an unsupported version",
            ));
        }
        let mut r = Reader::new(&message[1..]);
        let chain_id = r.u32();
        let iteration = r.u32();
        let chain_key = r.key();
        let verifying_key = verifying_key(&r.array32()).map_err(|_| {
            CryptoError::InvalidKey("signing public key is not a usable Ed25519 key")
        })?;
        Ok(ReceiverKey {
            chain_id,
            iteration,
            chain_key,
            verifying_key,
            skipped: VecDeque::new(),
        })
    }

    pub fn chain_id(&self) -> u32 {
        self.chain_id
    }

    /// The iteration of the next message key this chain derives.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    pub fn signing_public_key(&self) -> [u8; 32] {
        self.verifying_key.to_bytes()
    }

    /// How many skipped message keys are stored.
    pub fn skipped_len(&self) -> usize {
        self.skipped.len()
    }

    /// Verify and decrypt one group message. Transactional: on any error the state is unchanged.
    pub fn decrypt(&mut self, message: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if message.len() < MIN_MESSAGE_LEN {
            return Err(CryptoError::InvalidMessage("group message is truncated"));
        }
        if message.len() > MAX_MESSAGE_LEN {
            return Err(CryptoError::InvalidMessage(
                "group message is longer than the 1 MiB limit",
            ));
        }
        if message[0] != MESSAGE_VERSION {
            return Err(CryptoError::InvalidMessage(
                "group message of an unsupported version",
            ));
        }
        let (signed, signature) = message.split_at(message.len() - SIGNATURE_LEN);
        let (header, sealed) = signed.split_at(HEADER_LEN);
        if (sealed.len() - MAC_LEN) % BLOCK_LEN != 0 {
            return Err(CryptoError::InvalidMessage(
                "ciphertext length is not a multiple of the block size",
            ));
        }
        let mut r = Reader::new(&header[1..]);
        let chain_id = r.u32();
        let iteration = r.u32();
        if chain_id != self.chain_id {
            return Err(CryptoError::InvalidMessage(
                "group message belongs to another sender chain",
            ));
        }
        let mut signature_bytes = [0u8; SIGNATURE_LEN];
        signature_bytes.copy_from_slice(signature);
        self.verifying_key
            .verify_strict(signed, &Signature::from_bytes(&signature_bytes))
            .map_err(|_| {
                CryptoError::InvalidSignature("group message is not signed by the chain's key")
            })?;

        if iteration < self.iteration {
            let index = self
                .skipped
                .binary_search_by_key(&iteration, |k| k.iteration)
                .map_err(|_| CryptoError::DuplicateMessage)?;
            let plaintext = open(&self.skipped[index].message_key, sealed, header)?;
            // Dropping the entry zeroizes its key: each message key opens one message.
            self.skipped.remove(index);
            return Ok(plaintext);
        }
        if iteration == u32::MAX {
            return Err(CryptoError::InvalidMessage(
                "iteration beyond the end of the chain",
            ));
        }
        if iteration - self.iteration > MAX_SKIP {
            return Err(CryptoError::TooManySkipped);
        }

        // Stage the forward derivation; commit only once the message authenticates.
        let mut staged = Vec::with_capacity((iteration - self.iteration) as usize);
        let mut chain_key = self.chain_key.clone();
        for skipped_iteration in self.iteration..iteration {
            let (next, message_key) = kdf_ck(&chain_key);
            staged.push(SkippedKey {
                iteration: skipped_iteration,
                message_key,
            });
            chain_key = next;
        }
        let (next_chain_key, message_key) = kdf_ck(&chain_key);
        let plaintext = open(&message_key, sealed, header)?;

        self.skipped.extend(staged);
        while self.skipped.len() > MAX_STORED_SKIPPED {
            self.skipped.pop_front();
        }
        self.chain_key = next_chain_key;
        self.iteration = iteration + 1;
        Ok(plaintext)
    }

    /// `version ‖ 'R' ‖ chain id ‖ iteration ‖ chain key ‖ signing public key ‖ count (u16) ‖
    /// count × (iteration ‖ message key)`, skipped keys in ascending iteration order.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(
            RECEIVER_STATE_FIXED_LEN + self.skipped.len() * SKIPPED_ENTRY_LEN,
        ));
        out.extend_from_slice(&[STATE_VERSION, KIND_RECEIVER]);
        out.extend_from_slice(&self.chain_id.to_be_bytes());
        out.extend_from_slice(&self.iteration.to_be_bytes());
        out.extend_from_slice(self.chain_key.as_ref());
        out.extend_from_slice(self.verifying_key.as_bytes());
        // At most MAX_STORED_SKIPPED (2000) entries: fits a u16.
        out.extend_from_slice(&(self.skipped.len() as u16).to_be_bytes());
        for k in &self.skipped {
            out.extend_from_slice(&k.iteration.to_be_bytes());
            out.extend_from_slice(k.message_key.as_ref());
        }
        out
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if data.len() < RECEIVER_STATE_FIXED_LEN {
            return Err(CryptoError::InvalidState("receiver key state is truncated"));
        }
        if data[0] != STATE_VERSION || data[1] != KIND_RECEIVER {
            return Err(CryptoError::InvalidState(
                "not a receiver key state, or of an unsupported version",
            ));
        }
        let mut r = Reader::new(&data[STATE_PREFIX_LEN..]);
        let chain_id = r.u32();
        let iteration = r.u32();
        let chain_key = r.key();
        let verifying_key = verifying_key(&r.array32()).map_err(|_| {
            CryptoError::InvalidState("signing public key is not a usable Ed25519 key")
        })?;
        let count = r.u16() as usize;
        if count > MAX_STORED_SKIPPED {
            return Err(CryptoError::InvalidState("too many stored skipped keys"));
        }
        if data.len() != RECEIVER_STATE_FIXED_LEN + count * SKIPPED_ENTRY_LEN {
            return Err(CryptoError::InvalidState(
                "receiver key state has the wrong length",
            ));
        }
        let mut skipped = VecDeque::with_capacity(count);
        let mut previous: Option<u32> = None;
        for _ in 0..count {
            let skipped_iteration = r.u32();
            let message_key = r.key();
            if previous.is_some_and(|p| skipped_iteration <= p) || skipped_iteration >= iteration {
                return Err(CryptoError::InvalidState(
                    "skipped keys out of order or not before the chain's iteration",
                ));
            }
            previous = Some(skipped_iteration);
            skipped.push_back(SkippedKey {
                iteration: skipped_iteration,
                message_key,
            });
        }
        Ok(ReceiverKey {
            chain_id,
            iteration,
            chain_key,
            verifying_key,
            skipped,
        })
    }
}

fn header(chain_id: u32, iteration: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = MESSAGE_VERSION;
    h[1..5].copy_from_slice(&chain_id.to_be_bytes());
    h[5..9].copy_from_slice(&iteration.to_be_bytes());
    h
}

/// A usable signing public key: a valid point, and not of small order.
fn verifying_key(bytes: &[u8; 32]) -> std::result::Result<VerifyingKey, ()> {
    match VerifyingKey::from_bytes(bytes) {
        Ok(key) if !key.is_weak() => Ok(key),
        _ => Err(()),
    }
}

/// Reads fixed-size fields from a slice whose length the caller has already checked.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.data.split_at(N);
        self.data = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }

    fn array32(&mut self) -> [u8; 32] {
        self.take()
    }

    fn key(&mut self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.take())
    }
}

/// The three values a sender-key message key expands into.
struct MessageKeys {
    aes_key: Zeroizing<[u8; 32]>,
    hmac_key: Zeroizing<[u8; 32]>,
    iv: Zeroizing<[u8; 16]>,
}

/// HKDF-SHA256(salt = 32 zero bytes, IKM = message key, info = "teia SenderKey v1") → 80 bytes
/// = AES-256 key ‖ HMAC key ‖ IV.
fn message_keys(message_key: &[u8; 32]) -> MessageKeys {
    let hk = super::kdf::hkdf_zero_salt(message_key);
    let mut okm = Zeroizing::new([0u8; 80]);
    hk.expand(INFO_SENDER_KEY, okm.as_mut())
        .expect("80 bytes is a valid HKDF-SHA256 output length");
    let mut keys = MessageKeys {
        aes_key: Zeroizing::new([0u8; 32]),
        hmac_key: Zeroizing::new([0u8; 32]),
        iv: Zeroizing::new([0u8; 16]),
    };
    keys.aes_key.copy_from_slice(&okm[..32]);
    keys.hmac_key.copy_from_slice(&okm[32..64]);
    keys.iv.copy_from_slice(&okm[64..]);
    keys
}

fn tag(hmac_key: &[u8; 32], associated_data: &[u8], ciphertext: &[u8]) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(hmac_key).expect("HMAC takes any key length");
    m.update(associated_data);
    m.update(ciphertext);
    m
}

/// AES-256-CBC with PKCS#7, then HMAC-SHA256(HMAC key, ad ‖ ciphertext) (32 bytes) appended.
fn seal(message_key: &[u8; 32], plaintext: &[u8], associated_data: &[u8]) -> Vec<u8> {
    let keys = message_keys(message_key);
    let enc = Aes256CbcEnc::new(keys.aes_key.as_ref().into(), keys.iv.as_ref().into());
    let mut out = enc.encrypt_padded_vec_mut::<Pkcs7>(plaintext);
    let mac = tag(&keys.hmac_key, associated_data, &out)
        .finalize()
        .into_bytes();
    out.extend_from_slice(&mac);
    out
}

/// Checks the tag in constant time before decrypting. The caller has checked the length shape.
fn open(
    message_key: &[u8; 32],
    sealed: &[u8],
    associated_data: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let (ciphertext, mac) = sealed.split_at(sealed.len() - MAC_LEN);
    let keys = message_keys(message_key);
    tag(&keys.hmac_key, associated_data, ciphertext)
        .verify_slice(mac)
        .map_err(|_| CryptoError::Decryption("message authentication failed"))?;
    let dec = Aes256CbcDec::new(keys.aes_key.as_ref().into(), keys.iv.as_ref().into());
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let len = dec
        .decrypt_padded_mut::<Pkcs7>(buffer.as_mut_slice())
        .map_err(|_| CryptoError::Decryption("bad padding"))?
        .len();
    buffer.truncate(len);
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SenderKey, ReceiverKey) {
        let sender = SenderKey::generate(None);
        let receiver =
            ReceiverKey::from_distribution_message(&sender.distribution_message()).unwrap();
        (sender, receiver)
    }

    fn state(r: &ReceiverKey) -> Vec<u8> {
        r.to_bytes().to_vec()
    }

    #[test]
    fn round_trip() {
        let (mut s, mut r) = pair();
        assert_eq!(s.chain_id(), r.chain_id());
        assert_eq!(s.signing_public_key(), r.signing_public_key());
        for len in [0usize, 1, 15, 16, 17, 1000] {
            let pt = vec![0x5A; len];
            let msg = s.encrypt(&pt).unwrap();
            assert_eq!(
                msg.len(),
                HEADER_LEN + (len / 16 + 1) * 16 + MAC_LEN + SIGNATURE_LEN
            );
            assert_eq!(r.decrypt(&msg).unwrap().as_slice(), pt.as_slice());
        }
        assert_eq!(s.iteration(), 6);
        assert_eq!(r.iteration(), 6);
        assert_eq!(r.skipped_len(), 0);
    }

    #[test]
    fn wire_format() {
        let mut s = SenderKey::generate(Some(0x0102_0304));
        s.encrypt(b"first").unwrap();
        let msg = s.encrypt(b"second").unwrap();
        assert_eq!(&msg[..HEADER_LEN], &[1, 1, 2, 3, 4, 0, 0, 0, 1]);
        let vk = VerifyingKey::from_bytes(&s.signing_public_key()).unwrap();
        let (signed, sig) = msg.split_at(msg.len() - SIGNATURE_LEN);
        vk.verify_strict(signed, &Signature::from_bytes(sig.try_into().unwrap()))
            .unwrap();
    }

    #[test]
    fn domain_separated_from_pairwise_ratchet() {
        let mk = [3u8; 32];
        let sealed = seal(&mk, b"hello", b"ad");
        assert!(crate::ratchet::kdf::open(&mk, &sealed, b"ad").is_err());
        assert_eq!(open(&mk, &sealed, b"ad").unwrap().as_slice(), b"hello");
    }

    #[test]
    fn out_of_order() {
        let (mut s, mut r) = pair();
        let msgs: Vec<_> = (0..10u8).map(|i| s.encrypt(&[i]).unwrap()).collect();
        for i in [3usize, 0, 9, 1, 5, 2, 8, 4, 7, 6] {
            assert_eq!(r.decrypt(&msgs[i]).unwrap().as_slice(), &[i as u8]);
        }
        assert_eq!(r.skipped_len(), 0);
    }

    #[test]
    fn replay_is_duplicate() {
        let (mut s, mut r) = pair();
        let m0 = s.encrypt(b"a").unwrap();
        let m1 = s.encrypt(b"b").unwrap();
        let m2 = s.encrypt(b"c").unwrap();
        r.decrypt(&m2).unwrap();
        r.decrypt(&m0).unwrap();
        for m in [&m0, &m2] {
            let before = state(&r);
            assert_eq!(r.decrypt(m).unwrap_err(), CryptoError::DuplicateMessage);
            assert_eq!(state(&r), before);
        }
        r.decrypt(&m1).unwrap();
        assert_eq!(r.decrypt(&m1).unwrap_err(), CryptoError::DuplicateMessage);
    }

    #[test]
    fn skip_limit() {
        let (mut s, mut r) = pair();
        let msgs: Vec<_> = (0..=MAX_SKIP + 1)
            .map(|_| s.encrypt(b"x").unwrap())
            .collect();
        let before = state(&r);
        assert_eq!(
            r.decrypt(&msgs[MAX_SKIP as usize + 1]).unwrap_err(),
            CryptoError::TooManySkipped
        );
        assert_eq!(state(&r), before);
        r.decrypt(&msgs[MAX_SKIP as usize]).unwrap();
        assert_eq!(r.skipped_len(), MAX_SKIP as usize);
        r.decrypt(&msgs[0]).unwrap();
        r.decrypt(&msgs[MAX_SKIP as usize + 1]).unwrap();
    }

    #[test]
    fn eviction_keeps_newest() {
        let (mut s, mut r) = pair();
        let step = MAX_SKIP as usize + 1;
        let msgs: Vec<_> = (0..3 * step).map(|_| s.encrypt(b"x").unwrap()).collect();
        for k in 1..=3 {
            r.decrypt(&msgs[k * step - 1]).unwrap();
        }
        // 3000 keys were skipped; the 1000 oldest were evicted.
        assert_eq!(r.skipped_len(), MAX_STORED_SKIPPED);
        assert_eq!(
            r.decrypt(&msgs[0]).unwrap_err(),
            CryptoError::DuplicateMessage
        );
        assert_eq!(
            r.decrypt(&msgs[step - 2]).unwrap_err(),
            CryptoError::DuplicateMessage
        );
        r.decrypt(&msgs[step]).unwrap();
        r.decrypt(&msgs[3 * step - 2]).unwrap();
        assert_eq!(r.skipped_len(), MAX_STORED_SKIPPED - 2);
    }

    #[test]
    fn bad_signature() {
        let (mut s, mut r) = pair();
        let mut msg = s.encrypt(b"hi").unwrap();
        let last = msg.len() - 1;
        msg[last] ^= 0x01;
        let before = state(&r);
        assert!(matches!(
            r.decrypt(&msg),
            Err(CryptoError::InvalidSignature(_))
        ));
        assert_eq!(state(&r), before);

        // A member re-signing with its own key over another member's chain id.
        let mut impostor = SenderKey::generate(Some(s.chain_id()));
        let forged = impostor.encrypt(b"hi").unwrap();
        assert!(matches!(
            r.decrypt(&forged),
            Err(CryptoError::InvalidSignature(_))
        ));
        assert_eq!(state(&r), before);
    }

    #[test]
    fn wrong_chain() {
        let (_, mut r) = pair();
        let mut other = SenderKey::generate(Some(r.chain_id().wrapping_add(1)));
        let msg = other.encrypt(b"hi").unwrap();
        assert!(matches!(
            r.decrypt(&msg),
            Err(CryptoError::InvalidMessage(_))
        ));
    }

    #[test]
    fn mac_failure_with_valid_signature() {
        // The chain's owner signs a message whose ciphertext does not match the chain key.
        let (mut s, mut r) = pair();
        let mut msg = s.encrypt(b"hi").unwrap();
        msg.truncate(msg.len() - SIGNATURE_LEN);
        msg[HEADER_LEN] ^= 1;
        let sig = s.signing_key.sign(&msg);
        msg.extend_from_slice(&sig.to_bytes());
        let before = state(&r);
        assert!(matches!(r.decrypt(&msg), Err(CryptoError::Decryption(_))));
        assert_eq!(state(&r), before);
    }

    #[test]
    fn truncated_flipped_and_garbage_leave_state_unchanged() {
        let (mut s, mut r) = pair();
        r.decrypt(&s.encrypt(b"warm-up").unwrap()).unwrap();
        s.encrypt(b"skipped").unwrap();
        let msg = s.encrypt(b"payload").unwrap();
        let before = state(&r);
        for len in 0..msg.len() {
            assert!(r.decrypt(&msg[..len]).is_err());
            assert_eq!(state(&r), before);
        }
        for i in 0..msg.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = msg.clone();
                bad[i] ^= bit;
                assert!(r.decrypt(&bad).is_err());
                assert_eq!(state(&r), before);
            }
        }
        for garbage in [
            vec![],
            vec![1u8; MIN_MESSAGE_LEN],
            vec![0xFF; 500],
            vec![1u8; MAX_MESSAGE_LEN + 1],
        ] {
            assert!(r.decrypt(&garbage).is_err());
            assert_eq!(state(&r), before);
        }
        assert_eq!(r.decrypt(&msg).unwrap().as_slice(), b"payload");
    }

    #[test]
    fn plaintext_limits() {
        let (mut s, mut r) = pair();
        let big = vec![7u8; MAX_PLAINTEXT_LEN];
        let msg = s.encrypt(&big).unwrap();
        assert_eq!(msg.len(), MAX_MESSAGE_LEN);
        assert_eq!(r.decrypt(&msg).unwrap().as_slice(), big.as_slice());
        let iteration = s.iteration();
        assert!(matches!(
            s.encrypt(&vec![0u8; MAX_PLAINTEXT_LEN + 1]),
            Err(CryptoError::InvalidMessage(_))
        ));
        assert_eq!(s.iteration(), iteration);
    }

    #[test]
    fn chain_exhaustion() {
        let mut s = SenderKey::generate(Some(1));
        let mut bytes = s.to_bytes();
        bytes[6..10].copy_from_slice(&(u32::MAX - 1).to_be_bytes());
        s = SenderKey::from_bytes(&bytes).unwrap();
        let mut r = ReceiverKey::from_distribution_message(&s.distribution_message()).unwrap();
        let msg = s.encrypt(b"last").unwrap();
        assert_eq!(r.decrypt(&msg).unwrap().as_slice(), b"last");
        assert!(matches!(
            s.encrypt(b"more"),
            Err(CryptoError::InvalidState(_))
        ));
        assert_eq!(s.iteration(), u32::MAX);
    }

    #[test]
    fn distribution_message_carries_current_iteration() {
        let mut s = SenderKey::generate(Some(42));
        let early: Vec<_> = (0..3).map(|_| s.encrypt(b"before").unwrap()).collect();
        let dm = s.distribution_message();
        assert_eq!(dm.len(), DISTRIBUTION_LEN);
        assert_eq!(&dm[..HEADER_LEN], &[1, 0, 0, 0, 42, 0, 0, 0, 3]);
        assert_eq!(&dm[HEADER_LEN + 32..], &s.signing_public_key());
        let mut late = ReceiverKey::from_distribution_message(&dm).unwrap();
        assert_eq!(late.iteration(), 3);
        for m in &early {
            assert_eq!(late.decrypt(m).unwrap_err(), CryptoError::DuplicateMessage);
        }
        assert_eq!(
            late.decrypt(&s.encrypt(b"after").unwrap())
                .unwrap()
                .as_slice(),
            b"after"
        );
    }

    #[test]
    fn distribution_message_parse_is_strict() {
        let s = SenderKey::generate(None);
        let dm = s.distribution_message();
        for len in 0..dm.len() {
            assert!(matches!(
                ReceiverKey::from_distribution_message(&dm[..len]),
                Err(CryptoError::InvalidMessage(_))
            ));
        }
        let mut longer = dm.to_vec();
        longer.push(0);
        assert!(matches!(
            ReceiverKey::from_distribution_message(&longer),
            Err(CryptoError::InvalidMessage(_))
        ));
        let mut version = dm.to_vec();
        version[0] = 2;
        assert!(matches!(
            ReceiverKey::from_distribution_message(&version),
            Err(CryptoError::InvalidMessage(_))
        ));
        // The identity point (small order) as signing key.
        let mut weak = dm.to_vec();
        weak[HEADER_LEN + 32..].copy_from_slice(&{
            let mut p = [0u8; 32];
            p[0] = 1;
            p
        });
        assert!(matches!(
            ReceiverKey::from_distribution_message(&weak),
            Err(CryptoError::InvalidKey(_))
        ));
    }

    #[test]
    fn serialisation_round_trip_mid_conversation() {
        let (mut s, mut r) = pair();
        let msgs: Vec<_> = (0..6u8).map(|i| s.encrypt(&[i]).unwrap()).collect();
        r.decrypt(&msgs[4]).unwrap();
        r.decrypt(&msgs[1]).unwrap();

        let mut s2 = SenderKey::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(s2.to_bytes().as_slice(), s.to_bytes().as_slice());
        let mut r2 = ReceiverKey::from_bytes(&r.to_bytes()).unwrap();
        assert_eq!(state(&r2), state(&r));
        assert_eq!(r2.skipped_len(), 3);

        for i in [0usize, 2, 3, 5] {
            assert_eq!(r2.decrypt(&msgs[i]).unwrap().as_slice(), &[i as u8]);
        }
        let next = s2.encrypt(b"resumed").unwrap();
        assert_eq!(r2.decrypt(&next).unwrap().as_slice(), b"resumed");
        // The original sender and the restored one are the same chain.
        assert_eq!(
            s.encrypt(b"resumed").unwrap()[..HEADER_LEN],
            next[..HEADER_LEN]
        );
    }

    #[test]
    fn state_parse_is_strict() {
        let (mut s, mut r) = pair();
        s.encrypt(b"a").unwrap();
        r.decrypt(&s.encrypt(b"b").unwrap()).unwrap();
        let sb = s.to_bytes();
        let rb = r.to_bytes();
        for len in 0..sb.len() {
            assert!(matches!(
                SenderKey::from_bytes(&sb[..len]),
                Err(CryptoError::InvalidState(_))
            ));
        }
        for len in 0..rb.len() {
            assert!(matches!(
                ReceiverKey::from_bytes(&rb[..len]),
                Err(CryptoError::InvalidState(_))
            ));
        }
        // One kind never parses as the other, nor as a distribution message.
        assert!(SenderKey::from_bytes(&rb).is_err());
        assert!(ReceiverKey::from_bytes(&sb).is_err());
        assert!(ReceiverKey::from_distribution_message(&sb).is_err());
        let mut bad_version = rb.to_vec();
        bad_version[0] = 9;
        assert!(matches!(
            ReceiverKey::from_bytes(&bad_version),
            Err(CryptoError::InvalidState(_))
        ));

        // A skipped entry at or after the chain's iteration, and an oversize count.
        let mut bad = rb[..RECEIVER_STATE_FIXED_LEN].to_vec();
        let n = bad.len();
        bad[n - 2..].copy_from_slice(&1u16.to_be_bytes());
        bad.extend_from_slice(&r.iteration().to_be_bytes());
        bad.extend_from_slice(&[0u8; 32]);
        assert!(matches!(
            ReceiverKey::from_bytes(&bad),
            Err(CryptoError::InvalidState(_))
        ));
        bad[n - 2..n].copy_from_slice(&(MAX_STORED_SKIPPED as u16 + 1).to_be_bytes());
        assert!(matches!(
            ReceiverKey::from_bytes(&bad),
            Err(CryptoError::InvalidState(_))
        ));
    }
}
