//! The Double Ratchet (Signal rev. 1, §3 with the §5.2 recommendations; `docs/crypto.md`).
//!
//! Message = header (DHs ‖ PN ‖ N, 40 bytes) ‖ seal(mk, plaintext, AD ‖ header).
//!
//! Decryption is transactional: every new value (chain keys, skipped keys, a DH ratchet step) is
//! computed into locals and written back only after the message authenticated, so any error
//! leaves the state exactly as it was.

use std::collections::VecDeque;

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use super::errors::{CryptoError, Result};
use super::kdf::{kdf_ck, kdf_rk, open, seal, BLOCK_LEN, MAC_LEN, MAX_SKIP, MAX_STORED_SKIPPED};
use super::keys::{dh, read_u32, x25519_generate, x25519_public, x25519_secret_from_slice};

/// Header: ratchet public key (32) ‖ PN (u32) ‖ N (u32).
pub const HEADER_LEN: usize = 40;
/// Largest plaintext `encrypt` accepts (1 MiB).
pub const MAX_PLAINTEXT_LEN: usize = 1 << 20;
/// Largest ratchet message `decrypt` looks at: header, padded ciphertext and tag.
pub const MAX_MESSAGE_LEN: usize = HEADER_LEN + MAX_PLAINTEXT_LEN + BLOCK_LEN + MAC_LEN;
/// Smallest ratchet message: header, one ciphertext block and the tag.
pub const MIN_MESSAGE_LEN: usize = HEADER_LEN + BLOCK_LEN + MAC_LEN;
/// Largest associated data a state is created with.
pub const MAX_AD_LEN: usize = 1024;
/// How many earlier remote ratchet keys are remembered, so that a replay from an earlier chain
/// is reported as a duplicate rather than starting a (failing) DH ratchet step.
pub const MAX_PREVIOUS_CHAINS: usize = 32;

const STATE_VERSION: u8 = 0x01;

/// A parsed message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub ratchet_key: [u8; 32],
    pub previous_chain_length: u32,
    pub message_number: u32,
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..32].copy_from_slice(&self.ratchet_key);
        out[32..36].copy_from_slice(&self.previous_chain_length.to_be_bytes());
        out[36..].copy_from_slice(&self.message_number.to_be_bytes());
        out
    }

    /// Parses exactly `HEADER_LEN` bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != HEADER_LEN {
            return Err(CryptoError::InvalidMessage("a ratchet header is 40 bytes"));
        }
        let mut ratchet_key = [0u8; 32];
        ratchet_key.copy_from_slice(&bytes[..32]);
        Ok(Header {
            ratchet_key,
            previous_chain_length: read_u32(bytes, 32),
            message_number: read_u32(bytes, 36),
        })
    }
}

/// Checks the length of a ratchet message before any crypto.
pub fn check_message_shape(message: &[u8]) -> Result<()> {
    if message.len() > MAX_MESSAGE_LEN {
        return Err(CryptoError::InvalidMessage("ratchet message too long"));
    }
    if message.len() < MIN_MESSAGE_LEN {
        return Err(CryptoError::InvalidMessage("ratchet message truncated"));
    }
    if (message.len() - HEADER_LEN - MAC_LEN) % BLOCK_LEN != 0 {
        return Err(CryptoError::InvalidMessage(
            "ratchet ciphertext is not a multiple of the block size",
        ));
    }
    Ok(())
}

#[derive(Clone)]
struct SkippedKey {
    ratchet_key: [u8; 32],
    message_number: u32,
    message_key: Zeroizing<[u8; 32]>,
}

/// One side's Double Ratchet state.
#[derive(Clone)]
pub struct RatchetState {
    /// DHs, the sending ratchet key pair.
    dhs: StaticSecret,
    dhs_public: [u8; 32],
    /// DHr, the remote ratchet public key.
    dhr: Option<[u8; 32]>,
    rk: Zeroizing<[u8; 32]>,
    cks: Option<Zeroizing<[u8; 32]>>,
    ckr: Option<Zeroizing<[u8; 32]>>,
    ns: u32,
    nr: u32,
    pn: u32,
    /// Earlier DHr values, newest last.
    previous_remote: VecDeque<[u8; 32]>,
    /// MKSKIPPED in insertion order (oldest first, evicted first).
    skipped: VecDeque<SkippedKey>,
    ad: Vec<u8>,
}

fn check_ad(ad: &[u8]) -> Result<()> {
    if ad.len() > MAX_AD_LEN {
        return Err(CryptoError::InvalidMessage(
            "associated data longer than 1024 bytes",
        ));
    }
    Ok(())
}

/// Advances `ck` from message number `from` to `until`, pushing the skipped message keys;
/// returns the chain key for message `until`.
fn skip_chain(
    ck: &[u8; 32],
    from: u32,
    until: u32,
    ratchet_key: &[u8; 32],
    out: &mut Vec<SkippedKey>,
) -> Result<Zeroizing<[u8; 32]>> {
    if until > from && until - from > MAX_SKIP {
        return Err(CryptoError::TooManySkipped);
    }
    let mut ck = Zeroizing::new(*ck);
    for n in from..until {
        let (next, mk) = kdf_ck(&ck);
        out.push(SkippedKey {
            ratchet_key: *ratchet_key,
            message_number: n,
            message_key: mk,
        });
        ck = next;
    }
    Ok(ck)
}

impl RatchetState {
    /// RatchetInitAlice(SK, DHr = the responder's ratchet key), sending ratchet key `dhs`.
    pub fn init_initiator(
        shared_secret: &[u8; 32],
        associated_data: &[u8],
        remote_ratchet_public: &[u8; 32],
        dhs: StaticSecret,
    ) -> Result<Self> {
        check_ad(associated_data)?;
        let dh_out = dh(&dhs, remote_ratchet_public)?;
        let (rk, cks) = kdf_rk(shared_secret, &dh_out);
        let dhs_public = x25519_public(&dhs);
        Ok(RatchetState {
            dhs,
            dhs_public,
            dhr: Some(*remote_ratchet_public),
            rk,
            cks: Some(cks),
            ckr: None,
            ns: 0,
            nr: 0,
            pn: 0,
            previous_remote: VecDeque::new(),
            skipped: VecDeque::new(),
            ad: associated_data.to_vec(),
        })
    }

    /// RatchetInitBob(SK, the responder's ratchet key pair).
    pub fn init_responder(
        shared_secret: &[u8; 32],
        associated_data: &[u8],
        dhs: StaticSecret,
    ) -> Result<Self> {
        check_ad(associated_data)?;
        let dhs_public = x25519_public(&dhs);
        Ok(RatchetState {
            dhs,
            dhs_public,
            dhr: None,
            rk: Zeroizing::new(*shared_secret),
            cks: None,
            ckr: None,
            ns: 0,
            nr: 0,
            pn: 0,
            previous_remote: VecDeque::new(),
            skipped: VecDeque::new(),
            ad: associated_data.to_vec(),
        })
    }

    pub fn ratchet_public_key(&self) -> [u8; 32] {
        self.dhs_public
    }

    pub fn skipped_message_keys(&self) -> usize {
        self.skipped.len()
    }

    pub fn associated_data(&self) -> &[u8] {
        &self.ad
    }

    /// Whether a message from the remote side has been decrypted (a receiving chain exists).
    pub fn has_received(&self) -> bool {
        self.ckr.is_some()
    }

    fn message_ad(&self, header: &[u8]) -> Vec<u8> {
        let mut ad = Vec::with_capacity(self.ad.len() + HEADER_LEN);
        ad.extend_from_slice(&self.ad);
        ad.extend_from_slice(header);
        ad
    }

    /// RatchetEncrypt → header ‖ ciphertext ‖ tag.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(CryptoError::InvalidMessage("plaintext longer than 1 MiB"));
        }
        let cks = self.cks.as_ref().ok_or(CryptoError::InvalidState(
            "no sending chain yet: the responder sends only after it received a message",
        ))?;
        let next_ns = self
            .ns
            .checked_add(1)
            .ok_or(CryptoError::InvalidState("sending chain exhausted"))?;
        let (next_ck, mk) = kdf_ck(cks);
        let header = Header {
            ratchet_key: self.dhs_public,
            previous_chain_length: self.pn,
            message_number: self.ns,
        }
        .to_bytes();
        let sealed = seal(&mk, plaintext, &self.message_ad(&header));
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&sealed);
        self.cks = Some(next_ck);
        self.ns = next_ns;
        Ok(out)
    }

    /// RatchetDecrypt; transactional.
    pub fn decrypt(&mut self, message: &[u8]) -> Result<Vec<u8>> {
        check_message_shape(message)?;
        let (header_bytes, body) = message.split_at(HEADER_LEN);
        let header = Header::parse(header_bytes)?;
        let ad = self.message_ad(header_bytes);
        let (key, n) = (header.ratchet_key, header.message_number);

        if let Some(i) = self
            .skipped
            .iter()
            .position(|k| k.message_number == n && k.ratchet_key == key)
        {
            let plaintext = open(&self.skipped[i].message_key, body, &ad)?;
            self.skipped.remove(i);
            return Ok(plaintext);
        }

        let next_nr = n
            .checked_add(1)
            .ok_or(CryptoError::InvalidMessage("message number out of range"))?;
        let mut new_skipped = Vec::new();

        if self.dhr == Some(key) {
            let ckr = self.ckr.as_ref().ok_or(CryptoError::InvalidMessage(
                "no receiving chain for this ratchet key",
            ))?;
            if n < self.nr {
                return Err(CryptoError::DuplicateMessage);
            }
            let ck = skip_chain(ckr, self.nr, n, &key, &mut new_skipped)?;
            let (next_ck, mk) = kdf_ck(&ck);
            let plaintext = open(&mk, body, &ad)?;
            self.ckr = Some(next_ck);
            self.nr = next_nr;
            self.store_skipped(new_skipped);
            return Ok(plaintext);
        }

        if self.previous_remote.contains(&key) {
            // An earlier chain whose key for `n` was used (or evicted).
            return Err(CryptoError::DuplicateMessage);
        }

        // DH ratchet step, staged.
        if let (Some(ckr), Some(dhr)) = (self.ckr.as_ref(), self.dhr.as_ref()) {
            skip_chain(
                ckr,
                self.nr,
                header.previous_chain_length,
                dhr,
                &mut new_skipped,
            )?;
        }
        if n > MAX_SKIP {
            return Err(CryptoError::TooManySkipped);
        }
        let dh_receive = dh(&self.dhs, &key)?;
        let (rk_mid, ckr_new) = kdf_rk(&self.rk, &dh_receive);
        let dhs_new = x25519_generate();
        let dh_send = dh(&dhs_new, &key)?;
        let (rk_new, cks_new) = kdf_rk(&rk_mid, &dh_send);
        let ck = skip_chain(&ckr_new, 0, n, &key, &mut new_skipped)?;
        let (next_ck, mk) = kdf_ck(&ck);
        let plaintext = open(&mk, body, &ad)?;

        if let Some(old) = self.dhr.replace(key) {
            if self.previous_remote.len() == MAX_PREVIOUS_CHAINS {
                self.previous_remote.pop_front();
            }
            self.previous_remote.push_back(old);
        }
        self.pn = self.ns;
        self.ns = 0;
        self.nr = next_nr;
        self.rk = rk_new;
        self.ckr = Some(next_ck);
        self.cks = Some(cks_new);
        self.dhs_public = x25519_public(&dhs_new);
        self.dhs = dhs_new;
        self.store_skipped(new_skipped);
        Ok(plaintext)
    }

    fn store_skipped(&mut self, keys: Vec<SkippedKey>) {
        self.skipped.extend(keys);
        while self.skipped.len() > MAX_STORED_SKIPPED {
            self.skipped.pop_front();
        }
    }

    /// Versioned serialisation (contains secrets):
    ///
    /// ```text
    /// 0x01 ‖ DHs private (32) ‖ has_DHr (u8) [‖ DHr (32)] ‖ RK (32)
    ///      ‖ has_CKs (u8) [‖ CKs (32)] ‖ has_CKr (u8) [‖ CKr (32)] ‖ Ns ‖ Nr ‖ PN (u32 each)
    ///      ‖ AD length (u16) ‖ AD ‖ previous count (u8) ‖ previous DHr (32 each)
    ///      ‖ skipped count (u16) ‖ (DHr (32) ‖ N (u32) ‖ MK (32)) each
    /// ```
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(
            200 + self.ad.len() + 32 * self.previous_remote.len() + 68 * self.skipped.len(),
        ));
        out.push(STATE_VERSION);
        out.extend_from_slice(self.dhs.as_bytes());
        push_optional(&mut out, self.dhr.as_ref());
        out.extend_from_slice(self.rk.as_ref());
        push_optional(&mut out, self.cks.as_deref());
        push_optional(&mut out, self.ckr.as_deref());
        out.extend_from_slice(&self.ns.to_be_bytes());
        out.extend_from_slice(&self.nr.to_be_bytes());
        out.extend_from_slice(&self.pn.to_be_bytes());
        // Bounded by MAX_AD_LEN, MAX_PREVIOUS_CHAINS and MAX_STORED_SKIPPED: the casts are exact.
        out.extend_from_slice(&(self.ad.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.ad);
        out.push(self.previous_remote.len() as u8);
        for key in &self.previous_remote {
            out.extend_from_slice(key);
        }
        out.extend_from_slice(&(self.skipped.len() as u16).to_be_bytes());
        for k in &self.skipped {
            out.extend_from_slice(&k.ratchet_key);
            out.extend_from_slice(&k.message_number.to_be_bytes());
            out.extend_from_slice(k.message_key.as_ref());
        }
        out
    }

    /// Inverse of [`RatchetState::to_bytes`]; `InvalidState` on anything malformed.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data);
        if r.u8()? != STATE_VERSION {
            return Err(CryptoError::InvalidState(
                "unsupported ratchet state version",
            ));
        }
        let dhs = x25519_secret_from_slice(r.take(32)?)
            .map_err(|_| CryptoError::InvalidState("bad ratchet private key"))?;
        let dhr = r.optional32()?.map(|k| *k);
        if let Some(key) = &dhr {
            if super::keys::is_low_order_x25519(key) {
                return Err(CryptoError::InvalidState("low-order remote ratchet key"));
            }
        }
        let rk = r.array32()?;
        let cks = r.optional32()?;
        let ckr = r.optional32()?;
        if ckr.is_some() && dhr.is_none() {
            return Err(CryptoError::InvalidState(
                "receiving chain without a remote ratchet key",
            ));
        }
        let ns = r.u32()?;
        let nr = r.u32()?;
        let pn = r.u32()?;
        let ad_len = usize::from(r.u16()?);
        if ad_len > MAX_AD_LEN {
            return Err(CryptoError::InvalidState("associated data too long"));
        }
        let ad = r.take(ad_len)?.to_vec();
        let previous_count = usize::from(r.u8()?);
        if previous_count > MAX_PREVIOUS_CHAINS {
            return Err(CryptoError::InvalidState("too many previous chains"));
        }
        let mut previous_remote = VecDeque::with_capacity(previous_count);
        for _ in 0..previous_count {
            previous_remote.push_back(*r.array32()?);
        }
        let skipped_count = usize::from(r.u16()?);
        if skipped_count > MAX_STORED_SKIPPED {
            return Err(CryptoError::InvalidState("too many skipped message keys"));
        }
        let mut skipped = VecDeque::with_capacity(skipped_count);
        for _ in 0..skipped_count {
            let ratchet_key = *r.array32()?;
            let message_number = r.u32()?;
            let message_key = r.array32()?;
            skipped.push_back(SkippedKey {
                ratchet_key,
                message_number,
                message_key,
            });
        }
        if !r.is_empty() {
            return Err(CryptoError::InvalidState(
                "trailing bytes after the ratchet state",
            ));
        }
        let dhs_public = x25519_public(&dhs);
        Ok(RatchetState {
            dhs,
            dhs_public,
            dhr,
            rk,
            cks,
            ckr,
            ns,
            nr,
            pn,
            previous_remote,
            skipped,
            ad,
        })
    }
}

fn push_optional(out: &mut Vec<u8>, value: Option<&[u8; 32]>) {
    match value {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(v);
        }
        None => out.push(0),
    }
}

/// A cursor over serialised state; every failure is `InvalidState`.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() < n {
            return Err(CryptoError::InvalidState("truncated"));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(read_u32(self.take(4)?, 0))
    }

    pub(crate) fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(CryptoError::InvalidState("a flag byte is 0 or 1")),
        }
    }

    pub(crate) fn array32(&mut self) -> Result<Zeroizing<[u8; 32]>> {
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(self.take(32)?);
        Ok(out)
    }

    pub(crate) fn optional32(&mut self) -> Result<Option<Zeroizing<[u8; 32]>>> {
        if self.flag()? {
            Ok(Some(self.array32()?))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratchet::keys::tests::low_order_x25519;

    fn pair() -> (RatchetState, RatchetState) {
        let sk = [0x5Au8; 32];
        let ad = [0xADu8; 64];
        let bob_key = x25519_generate();
        let bob_public = x25519_public(&bob_key);
        let alice = RatchetState::init_initiator(&sk, &ad, &bob_public, x25519_generate()).unwrap();
        let bob = RatchetState::init_responder(&sk, &ad, bob_key).unwrap();
        (alice, bob)
    }

    /// Decrypt must fail with `expected` and leave the state byte-for-byte unchanged.
    fn fails_unchanged(state: &mut RatchetState, message: &[u8]) -> CryptoError {
        let before = state.to_bytes();
        let err = state.decrypt(message).unwrap_err();
        assert_eq!(*before, *state.to_bytes(), "state changed after {err:?}");
        err
    }

    #[test]
    fn ping_pong() {
        let (mut a, mut b) = pair();
        for turn in 0..50u32 {
            for i in 0..(turn % 3 + 1) {
                let text = format!("a{turn}/{i}");
                let m = a.encrypt(text.as_bytes()).unwrap();
                assert_eq!(b.decrypt(&m).unwrap(), text.as_bytes());
            }
            let text = format!("b{turn}");
            let m = b.encrypt(text.as_bytes()).unwrap();
            assert_eq!(a.decrypt(&m).unwrap(), text.as_bytes());
        }
        assert_eq!(a.skipped_message_keys(), 0);
        assert_eq!(b.skipped_message_keys(), 0);
    }

    #[test]
    fn responder_cannot_send_first() {
        let (_, mut b) = pair();
        assert!(matches!(b.encrypt(b"x"), Err(CryptoError::InvalidState(_))));
    }

    #[test]
    fn out_of_order_within_and_across_chains() {
        let (mut a, mut b) = pair();
        let first: Vec<_> = (0..5).map(|i| a.encrypt(&[i]).unwrap()).collect();
        assert_eq!(b.decrypt(&first[3]).unwrap(), [3]);
        assert_eq!(b.skipped_message_keys(), 3);
        let reply = b.encrypt(b"r").unwrap();
        assert_eq!(a.decrypt(&reply).unwrap(), b"r");
        let second: Vec<_> = (10..13).map(|i| a.encrypt(&[i]).unwrap()).collect();
        assert_eq!(b.decrypt(&second[2]).unwrap(), [12]);
        // First chain: 0,1,2 skipped, 4 skipped via PN; second chain: 10,11 skipped.
        assert_eq!(b.skipped_message_keys(), 6);
        for (m, v) in [
            (&first[4], 4u8),
            (&second[0], 10),
            (&first[0], 0),
            (&second[1], 11),
        ] {
            assert_eq!(b.decrypt(m).unwrap(), [v]);
        }
        assert_eq!(b.decrypt(&first[2]).unwrap(), [2]);
        assert_eq!(b.decrypt(&first[1]).unwrap(), [1]);
        assert_eq!(b.skipped_message_keys(), 0);
    }

    #[test]
    fn replays_are_duplicates_and_leave_state_unchanged() {
        let (mut a, mut b) = pair();
        let m0 = a.encrypt(b"0").unwrap();
        let m1 = a.encrypt(b"1").unwrap();
        b.decrypt(&m1).unwrap();
        b.decrypt(&m0).unwrap();
        assert_eq!(fails_unchanged(&mut b, &m0), CryptoError::DuplicateMessage);
        assert_eq!(fails_unchanged(&mut b, &m1), CryptoError::DuplicateMessage);
        let r = b.encrypt(b"r").unwrap();
        a.decrypt(&r).unwrap();
        assert_eq!(fails_unchanged(&mut a, &r), CryptoError::DuplicateMessage);
        let m2 = a.encrypt(b"2").unwrap();
        b.decrypt(&m2).unwrap();
        // Replays from the earlier chain.
        assert_eq!(fails_unchanged(&mut b, &m0), CryptoError::DuplicateMessage);
        assert_eq!(fails_unchanged(&mut b, &m2), CryptoError::DuplicateMessage);
    }

    #[test]
    fn skip_limit_per_chain() {
        let (mut a, mut b) = pair();
        let msgs: Vec<_> = (0..=MAX_SKIP + 1)
            .map(|_| a.encrypt(b"x").unwrap())
            .collect();
        // Message 1001 needs 1001 skipped keys: refused, nothing changes.
        assert_eq!(
            fails_unchanged(&mut b, &msgs[MAX_SKIP as usize + 1]),
            CryptoError::TooManySkipped
        );
        // Message 1000 skips exactly 1000.
        b.decrypt(&msgs[MAX_SKIP as usize]).unwrap();
        assert_eq!(b.skipped_message_keys(), MAX_SKIP as usize);
        b.decrypt(&msgs[MAX_SKIP as usize + 1]).unwrap();
        b.decrypt(&msgs[0]).unwrap();

        // The PN skip of a finished chain is limited the same way.
        let (mut a, mut b) = pair();
        b.decrypt(&a.encrypt(b"x").unwrap()).unwrap();
        a.decrypt(&b.encrypt(b"y").unwrap()).unwrap();
        b.decrypt(&a.encrypt(b"seen").unwrap()).unwrap();
        for _ in 0..=MAX_SKIP {
            let _ = a.encrypt(b"lost").unwrap();
        }
        a.decrypt(&b.encrypt(b"turn").unwrap()).unwrap();
        // PN = 1002 while Bob has seen message 0 only: 1001 keys to skip.
        let next = a.encrypt(b"new chain").unwrap();
        assert_eq!(fails_unchanged(&mut b, &next), CryptoError::TooManySkipped);
    }

    #[test]
    fn stored_skipped_keys_are_capped_oldest_evicted() {
        let (mut a, mut b) = pair();
        let mut kept = vec![];
        for _chain in 0..2 {
            let msgs: Vec<_> = (0..=MAX_SKIP)
                .map(|i| a.encrypt(&i.to_be_bytes()).unwrap())
                .collect();
            b.decrypt(&msgs[MAX_SKIP as usize]).unwrap();
            kept.push(msgs);
            a.decrypt(&b.encrypt(b"ack").unwrap()).unwrap();
        }
        assert_eq!(b.skipped_message_keys(), MAX_STORED_SKIPPED);
        let third: Vec<_> = (0..3).map(|i| a.encrypt(&[i]).unwrap()).collect();
        b.decrypt(&third[2]).unwrap();
        // Two more were stored; the two oldest of the first chain were evicted.
        assert_eq!(b.skipped_message_keys(), MAX_STORED_SKIPPED);
        assert_eq!(
            fails_unchanged(&mut b, &kept[0][0]),
            CryptoError::DuplicateMessage
        );
        assert_eq!(
            fails_unchanged(&mut b, &kept[0][1]),
            CryptoError::DuplicateMessage
        );
        assert_eq!(b.decrypt(&kept[0][2]).unwrap(), 2u32.to_be_bytes());
        assert_eq!(b.decrypt(&kept[1][0]).unwrap(), 0u32.to_be_bytes());
        assert_eq!(b.decrypt(&third[0]).unwrap(), [0]);
    }

    #[test]
    fn forged_truncated_and_oversize_messages_leave_state_unchanged() {
        let (mut a, mut b) = pair();
        b.decrypt(&a.encrypt(b"hello").unwrap()).unwrap();
        a.decrypt(&b.encrypt(b"hi").unwrap()).unwrap();
        let m = a.encrypt(b"a message of some length, two blocks").unwrap();
        for cut in 0..m.len() {
            let err = fails_unchanged(&mut b, &m[..cut]);
            assert!(
                matches!(
                    err,
                    CryptoError::InvalidMessage(_) | CryptoError::Decryption(_)
                ),
                "{err:?}"
            );
        }
        for i in 0..m.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = m.clone();
                bad[i] ^= bit;
                let _ = fails_unchanged(&mut b, &bad);
            }
        }
        let mut long = m.clone();
        long.extend(std::iter::repeat(0).take(MAX_MESSAGE_LEN));
        assert!(matches!(
            fails_unchanged(&mut b, &long),
            CryptoError::InvalidMessage(_)
        ));
        // Another session's message.
        let (mut other, _) = pair();
        let foreign = other.encrypt(b"x").unwrap();
        let _ = fails_unchanged(&mut b, &foreign);
        // Low-order ratchet keys in the header.
        for bad_key in low_order_x25519() {
            let mut bad = m.clone();
            bad[..32].copy_from_slice(&bad_key);
            assert!(matches!(
                fails_unchanged(&mut b, &bad),
                CryptoError::InvalidKey(_)
            ));
        }
        assert_eq!(
            b.decrypt(&m).unwrap(),
            b"a message of some length, two blocks"
        );
        assert!(matches!(
            a.encrypt(&vec![0u8; MAX_PLAINTEXT_LEN + 1]),
            Err(CryptoError::InvalidMessage(_))
        ));
        let big = a.encrypt(&vec![7u8; MAX_PLAINTEXT_LEN]).unwrap();
        assert_eq!(big.len(), MAX_MESSAGE_LEN);
        assert_eq!(b.decrypt(&big).unwrap().len(), MAX_PLAINTEXT_LEN);
    }

    #[test]
    fn serialisation_round_trip_mid_conversation() {
        let (mut a, mut b) = pair();
        let early = a.encrypt(b"early").unwrap();
        b.decrypt(&a.encrypt(b"later").unwrap()).unwrap();
        a.decrypt(&b.encrypt(b"r").unwrap()).unwrap();
        let bytes = b.to_bytes();
        let mut b2 = RatchetState::from_bytes(&bytes).unwrap();
        assert_eq!(*b2.to_bytes(), *bytes);
        assert_eq!(b2.skipped_message_keys(), 1);
        assert_eq!(b2.decrypt(&early).unwrap(), b"early");
        let m = a.encrypt(b"next").unwrap();
        assert_eq!(b2.decrypt(&m).unwrap(), b"next");
        let mut a2 = RatchetState::from_bytes(&a.to_bytes()).unwrap();
        a2.decrypt(&b2.encrypt(b"back").unwrap()).unwrap();

        for state in [&a, &b] {
            let bytes = state.to_bytes();
            for cut in 0..bytes.len() {
                assert!(matches!(
                    RatchetState::from_bytes(&bytes[..cut]),
                    Err(CryptoError::InvalidState(_))
                ));
            }
            let mut trailing = bytes.to_vec();
            trailing.push(0);
            assert!(RatchetState::from_bytes(&trailing).is_err());
            let mut version = bytes.to_vec();
            version[0] = 2;
            assert!(RatchetState::from_bytes(&version).is_err());
        }
        // A fresh responder state (no DHr, no chains) round-trips too.
        let (_, fresh) = pair();
        let bytes = fresh.to_bytes();
        assert_eq!(
            *RatchetState::from_bytes(&bytes).unwrap().to_bytes(),
            *bytes
        );
    }

    #[test]
    fn from_bytes_never_panics_on_garbage() {
        let (mut a, mut b) = pair();
        b.decrypt(&a.encrypt(b"x").unwrap()).unwrap();
        let base = b.to_bytes().to_vec();
        let mut seed = 0x1234_5678_u32;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let mut data = base.clone();
            let i = seed as usize % data.len();
            data[i] = (seed >> 8) as u8;
            let _ = RatchetState::from_bytes(&data);
            let _ = RatchetState::from_bytes(&data[..i]);
        }
    }

    #[test]
    fn initiator_rejects_low_order_remote_key() {
        for bad in low_order_x25519() {
            assert!(matches!(
                RatchetState::init_initiator(&[1; 32], b"", &bad, x25519_generate()),
                Err(CryptoError::InvalidKey(_))
            ));
        }
    }
}
