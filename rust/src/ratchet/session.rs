//! Pairwise sessions: X3DH to start, the Double Ratchet after, and the session framing
//! (`docs/crypto.md`, "Session messages").
//!
//! ```text
//! session message = 0x01 ‖ type ‖ body
//!   type 1 (normal):  body = ratchet message
//!   type 2 (prekey):  body = IK_A (32, Ed25519) ‖ EK_A (32) ‖ spk_id (u32) ‖ has_opk (u8)
//!                            [‖ opk_id (u32)] ‖ ratchet message
//! ```
//!
//! The initiator sends prekey messages until it has decrypted a message from the responder.

use super::double_ratchet::{check_message_shape, RatchetState, Reader, MAX_MESSAGE_LEN};
use super::errors::{CryptoError, Result};
use super::keys::{
    read_u32, x25519_generate, x25519_public, IdentityKeyPair, OneTimePrekey, PrekeyBundle,
    SignedPrekey,
};
use super::x3dh;
use zeroize::Zeroizing;

/// Version byte of session messages.
pub const MESSAGE_VERSION: u8 = 0x01;
/// Session message type: a normal ratchet message.
pub const TYPE_MESSAGE: u8 = 1;
/// Session message type: a prekey (initial) message.
pub const TYPE_PREKEY: u8 = 2;
/// Fixed part of a prekey body before the optional one-time prekey id.
const PREKEY_FIXED_LEN: usize = 32 + 32 + 4 + 1;
/// Largest session message looked at.
pub const MAX_SESSION_MESSAGE_LEN: usize = 2 + PREKEY_FIXED_LEN + 4 + MAX_MESSAGE_LEN;

const STATE_VERSION: u8 = 0x01;

/// The clear fields of a prekey message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrekeyMessage<'a> {
    pub identity_key: [u8; 32],
    pub base_key: [u8; 32],
    pub signed_prekey_id: u32,
    pub one_time_prekey_id: Option<u32>,
    pub ratchet_message: &'a [u8],
}

fn check_frame(message: &[u8]) -> Result<u8> {
    if message.len() > MAX_SESSION_MESSAGE_LEN {
        return Err(CryptoError::InvalidMessage("session message too long"));
    }
    if message.len() < 2 {
        return Err(CryptoError::InvalidMessage("session message truncated"));
    }
    if message[0] != MESSAGE_VERSION {
        return Err(CryptoError::InvalidMessage(
            "unsupported session message version",
        ));
    }
    match message[1] {
        t @ (TYPE_MESSAGE | TYPE_PREKEY) => Ok(t),
        _ => Err(CryptoError::InvalidMessage("unknown session message type")),
    }
}

/// Whether `message` is framed as a prekey message (nothing else is checked).
pub fn is_prekey_message(message: &[u8]) -> bool {
    message.len() >= 2 && message[0] == MESSAGE_VERSION && message[1] == TYPE_PREKEY
}

/// Parses the clear part of a prekey message; `InvalidMessage` when malformed.
pub fn parse_prekey_message(message: &[u8]) -> Result<PrekeyMessage<'_>> {
    if check_frame(message)? != TYPE_PREKEY {
        return Err(CryptoError::InvalidMessage("not a prekey message"));
    }
    let body = &message[2..];
    if body.len() < PREKEY_FIXED_LEN {
        return Err(CryptoError::InvalidMessage("prekey message truncated"));
    }
    let mut identity_key = [0u8; 32];
    identity_key.copy_from_slice(&body[..32]);
    let mut base_key = [0u8; 32];
    base_key.copy_from_slice(&body[32..64]);
    let signed_prekey_id = read_u32(body, 64);
    let (one_time_prekey_id, rest) = match body[68] {
        0 => (None, &body[PREKEY_FIXED_LEN..]),
        1 if body.len() >= PREKEY_FIXED_LEN + 4 => (
            Some(read_u32(body, PREKEY_FIXED_LEN)),
            &body[PREKEY_FIXED_LEN + 4..],
        ),
        1 => return Err(CryptoError::InvalidMessage("prekey message truncated")),
        _ => {
            return Err(CryptoError::InvalidMessage(
                "prekey message one-time prekey flag",
            ))
        }
    };
    check_message_shape(rest)?;
    Ok(PrekeyMessage {
        identity_key,
        base_key,
        signed_prekey_id,
        one_time_prekey_id,
        ratchet_message: rest,
    })
}

/// The prekeys X3DH used: the initiator repeats them in every message until the responder
/// answers; the responder checks later prekey messages against them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PrekeyIds {
    signed_prekey_id: u32,
    one_time_prekey_id: Option<u32>,
}

/// A pairwise session.
#[derive(Clone)]
pub struct Session {
    local_identity: [u8; 32],
    remote_identity: [u8; 32],
    initiator: bool,
    /// EK_A, which names this session in prekey messages.
    base_key: [u8; 32],
    prekey_ids: PrekeyIds,
    /// Whether a message from the other side was decrypted (the initiator then stops sending
    /// prekey messages).
    answered: bool,
    ratchet: RatchetState,
}

impl Session {
    /// Starts a session from the responder's bundle (its signature is verified first).
    pub fn initiate(identity_seed: &[u8], bundle: &PrekeyBundle) -> Result<Self> {
        let identity = IdentityKeyPair::from_seed(identity_seed)?;
        let ephemeral = x25519_generate();
        let sk = x3dh::initiate(&identity, &ephemeral, bundle)?;
        let local_identity = identity.public_key();
        let ad = x3dh::associated_data(&local_identity, &bundle.identity_key);
        let ratchet =
            RatchetState::init_initiator(&sk, &ad, &bundle.signed_prekey, x25519_generate())?;
        Ok(Session {
            local_identity,
            remote_identity: bundle.identity_key,
            initiator: true,
            base_key: x25519_public(&ephemeral),
            prekey_ids: PrekeyIds {
                signed_prekey_id: bundle.signed_prekey_id,
                one_time_prekey_id: bundle.one_time_prekey.map(|(id, _)| id),
            },
            answered: false,
            ratchet,
        })
    }

    /// Accepts a prekey message with the signed (and one-time) prekey it names.
    pub fn accept(
        identity_seed: &[u8],
        signed_prekey: &SignedPrekey,
        one_time_prekey: Option<&OneTimePrekey>,
        message: &[u8],
    ) -> Result<(Self, Vec<u8>)> {
        let parsed = parse_prekey_message(message)?;
        if parsed.signed_prekey_id != signed_prekey.id {
            return Err(CryptoError::InvalidKey(
                "the message names another signed prekey than the one handed in",
            ));
        }
        match (parsed.one_time_prekey_id, one_time_prekey) {
            (None, None) => {}
            (Some(id), Some(opk)) if id == opk.id => {}
            (Some(_), Some(_)) => {
                return Err(CryptoError::InvalidKey(
                    "the message names another one-time prekey than the one handed in",
                ))
            }
            (Some(_), None) => {
                return Err(CryptoError::InvalidKey(
                    "the message used a one-time prekey, none was handed in",
                ))
            }
            (None, Some(_)) => {
                return Err(CryptoError::InvalidKey(
                    "the message used no one-time prekey, one was handed in",
                ))
            }
        }
        let identity = IdentityKeyPair::from_seed(identity_seed)?;
        let sk = x3dh::respond(
            &identity,
            signed_prekey.secret(),
            one_time_prekey.map(|k| k.secret()),
            &parsed.identity_key,
            &parsed.base_key,
        )?;
        let local_identity = identity.public_key();
        let ad = x3dh::associated_data(&parsed.identity_key, &local_identity);
        let mut ratchet = RatchetState::init_responder(&sk, &ad, signed_prekey.secret().clone())?;
        let plaintext = ratchet.decrypt(parsed.ratchet_message)?;
        let session = Session {
            local_identity,
            remote_identity: parsed.identity_key,
            initiator: false,
            base_key: parsed.base_key,
            prekey_ids: PrekeyIds {
                signed_prekey_id: parsed.signed_prekey_id,
                one_time_prekey_id: parsed.one_time_prekey_id,
            },
            answered: true,
            ratchet,
        };
        Ok((session, plaintext))
    }

    pub fn local_identity_key(&self) -> [u8; 32] {
        self.local_identity
    }

    pub fn remote_identity_key(&self) -> [u8; 32] {
        self.remote_identity
    }

    /// A session message: a prekey message while the responder has not answered.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>> {
        let inner = self.ratchet.encrypt(plaintext)?;
        let mut out = Vec::with_capacity(2 + PREKEY_FIXED_LEN + 4 + inner.len());
        out.push(MESSAGE_VERSION);
        if self.initiator && !self.answered {
            out.push(TYPE_PREKEY);
            out.extend_from_slice(&self.local_identity);
            out.extend_from_slice(&self.base_key);
            push_prekey_ids(&mut out, &self.prekey_ids);
        } else {
            out.push(TYPE_MESSAGE);
        }
        out.extend_from_slice(&inner);
        Ok(out)
    }

    /// Decrypts a session message; transactional.
    pub fn decrypt(&mut self, message: &[u8]) -> Result<Vec<u8>> {
        let plaintext = match check_frame(message)? {
            TYPE_PREKEY => {
                let parsed = parse_prekey_message(message)?;
                let ids = PrekeyIds {
                    signed_prekey_id: parsed.signed_prekey_id,
                    one_time_prekey_id: parsed.one_time_prekey_id,
                };
                if self.initiator
                    || parsed.identity_key != self.remote_identity
                    || parsed.base_key != self.base_key
                    || ids != self.prekey_ids
                {
                    return Err(CryptoError::InvalidMessage(
                        "a prekey message that starts another session (accept it instead)",
                    ));
                }
                self.ratchet.decrypt(parsed.ratchet_message)?
            }
            _ => self.ratchet.decrypt(&message[2..])?,
        };
        self.answered = true;
        Ok(plaintext)
    }

    /// Versioned serialisation (contains secrets):
    ///
    /// ```text
    /// 0x01 ‖ role (u8: 0 initiator, 1 responder) ‖ local IK (32) ‖ remote IK (32) ‖ EK_A (32)
    ///      ‖ spk_id (u32) ‖ has_opk (u8) [‖ opk_id (u32)] ‖ answered (u8) ‖ ratchet state
    /// ```
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let ratchet = self.ratchet.to_bytes();
        let mut out = Zeroizing::new(Vec::with_capacity(110 + ratchet.len()));
        out.push(STATE_VERSION);
        out.push(if self.initiator { 0 } else { 1 });
        out.extend_from_slice(&self.local_identity);
        out.extend_from_slice(&self.remote_identity);
        out.extend_from_slice(&self.base_key);
        push_prekey_ids(&mut out, &self.prekey_ids);
        out.push(u8::from(self.answered));
        out.extend_from_slice(&ratchet);
        out
    }

    /// Inverse of [`Session::to_bytes`]; `InvalidState` on anything malformed.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data);
        if r.u8()? != STATE_VERSION {
            return Err(CryptoError::InvalidState(
                "unsupported session state version",
            ));
        }
        let initiator = !r.flag()?;
        let local_identity = *r.array32()?;
        let remote_identity = *r.array32()?;
        let base_key = *r.array32()?;
        let signed_prekey_id = r.u32()?;
        let one_time_prekey_id = if r.flag()? { Some(r.u32()?) } else { None };
        let prekey_ids = PrekeyIds {
            signed_prekey_id,
            one_time_prekey_id,
        };
        let answered = r.flag()?;
        if !answered && !initiator {
            return Err(CryptoError::InvalidState("a responder has always received"));
        }
        let ratchet = RatchetState::from_bytes(r.rest())?;
        let expected_ad = if initiator {
            x3dh::associated_data(&local_identity, &remote_identity)
        } else {
            x3dh::associated_data(&remote_identity, &local_identity)
        };
        if ratchet.associated_data() != expected_ad {
            return Err(CryptoError::InvalidState(
                "session identities do not match the ratchet AD",
            ));
        }
        Ok(Session {
            local_identity,
            remote_identity,
            initiator,
            base_key,
            prekey_ids,
            answered,
            ratchet,
        })
    }
}

fn push_prekey_ids(out: &mut Vec<u8>, ids: &PrekeyIds) {
    out.extend_from_slice(&ids.signed_prekey_id.to_be_bytes());
    match ids.one_time_prekey_id {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.to_be_bytes());
        }
        None => out.push(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Responder {
        seed: [u8; 32],
        spk: SignedPrekey,
        opk: OneTimePrekey,
    }

    fn responder() -> Responder {
        let seed = [0xB0u8; 32];
        Responder {
            seed,
            spk: SignedPrekey::generate(&seed, 11).unwrap(),
            opk: OneTimePrekey::generate(22),
        }
    }

    fn bundle(r: &Responder, with_opk: bool) -> PrekeyBundle {
        let ik = IdentityKeyPair::from_seed(&r.seed).unwrap().public_key();
        let opk_public = r.opk.public_key();
        PrekeyBundle::new(
            &ik,
            r.spk.id,
            &r.spk.public_key(),
            &r.spk.signature,
            with_opk.then_some((r.opk.id, &opk_public[..])),
        )
        .unwrap()
    }

    const ALICE: [u8; 32] = [0xA0u8; 32];

    #[test]
    fn initiate_accept_and_talk() {
        let r = responder();
        for with_opk in [false, true] {
            let mut a = Session::initiate(&ALICE, &bundle(&r, with_opk)).unwrap();
            let m1 = a.encrypt(b"hello").unwrap();
            let m2 = a.encrypt(b"again").unwrap();
            assert!(is_prekey_message(&m1) && is_prekey_message(&m2));
            let info = parse_prekey_message(&m1).unwrap();
            assert_eq!(info.signed_prekey_id, 11);
            assert_eq!(info.one_time_prekey_id, with_opk.then_some(22));
            let opk = with_opk.then_some(&r.opk);
            let (mut b, pt) = Session::accept(&r.seed, &r.spk, opk, &m1).unwrap();
            assert_eq!(pt, b"hello");
            assert_eq!(b.remote_identity_key(), a.local_identity_key());
            assert_eq!(a.remote_identity_key(), b.local_identity_key());
            // Later prekey messages of the same session go to `decrypt`.
            assert_eq!(b.decrypt(&m2).unwrap(), b"again");
            let reply = b.encrypt(b"hi").unwrap();
            assert!(!is_prekey_message(&reply));
            assert_eq!(a.decrypt(&reply).unwrap(), b"hi");
            let m3 = a.encrypt(b"now normal").unwrap();
            assert!(!is_prekey_message(&m3));
            assert_eq!(b.decrypt(&m3).unwrap(), b"now normal");
            // Round trip mid-conversation.
            let mut a2 = Session::from_bytes(&a.to_bytes()).unwrap();
            let mut b2 = Session::from_bytes(&b.to_bytes()).unwrap();
            assert_eq!(*a2.to_bytes(), *a.to_bytes());
            assert_eq!(b2.decrypt(&a2.encrypt(b"x").unwrap()).unwrap(), b"x");
            assert_eq!(a2.decrypt(&b2.encrypt(b"y").unwrap()).unwrap(), b"y");
        }
    }

    #[test]
    fn accept_checks_the_keys_handed_in() {
        let r = responder();
        let mut a = Session::initiate(&ALICE, &bundle(&r, true)).unwrap();
        let m = a.encrypt(b"hello").unwrap();
        let other_spk = SignedPrekey::generate(&r.seed, 12).unwrap();
        let other_opk = OneTimePrekey::generate(23);
        for result in [
            Session::accept(&r.seed, &other_spk, Some(&r.opk), &m),
            Session::accept(&r.seed, &r.spk, None, &m),
            Session::accept(&r.seed, &r.spk, Some(&other_opk), &m),
        ] {
            assert!(matches!(result, Err(CryptoError::InvalidKey(_))));
        }
        // Right ids, wrong private key: authentication fails.
        let impostor = OneTimePrekey::generate(22);
        assert!(matches!(
            Session::accept(&r.seed, &r.spk, Some(&impostor), &m),
            Err(CryptoError::Decryption(_))
        ));
        // Wrong identity seed.
        assert!(Session::accept(&[0x77; 32], &r.spk, Some(&r.opk), &m).is_err());
        let reply = a.encrypt(b"2").unwrap();
        let mut b = Session::accept(&r.seed, &r.spk, Some(&r.opk), &m)
            .unwrap()
            .0;
        let normal = {
            let n = b.encrypt(b"n").unwrap();
            a.decrypt(&n).unwrap();
            a.encrypt(b"m").unwrap()
        };
        assert!(matches!(
            Session::accept(&r.seed, &r.spk, Some(&r.opk), &normal),
            Err(CryptoError::InvalidMessage(_))
        ));
        assert_eq!(b.decrypt(&reply).unwrap(), b"2");
    }

    #[test]
    fn bad_bundle_signature_is_refused() {
        let r = responder();
        let mut bad = bundle(&r, false);
        bad.signed_prekey_signature[63] ^= 1;
        assert!(matches!(
            Session::initiate(&ALICE, &bad),
            Err(CryptoError::InvalidSignature(_))
        ));
    }

    #[test]
    fn bad_messages_leave_session_unchanged() {
        let r = responder();
        let mut a = Session::initiate(&ALICE, &bundle(&r, true)).unwrap();
        let first = a.encrypt(b"hello").unwrap();
        let (mut b, _) = Session::accept(&r.seed, &r.spk, Some(&r.opk), &first).unwrap();
        let reply = b.encrypt(b"hi").unwrap();
        // A second, unrelated session to the same responder.
        let mut c = Session::initiate(&[0xC0; 32], &bundle(&r, false)).unwrap();
        let foreign_prekey = c.encrypt(b"other").unwrap();
        let next = a.encrypt(b"still prekey").unwrap();
        for (session, good) in [(&mut a, &reply), (&mut b, &next)] {
            let before = session.to_bytes();
            let mut bad_inputs: Vec<Vec<u8>> =
                (0..good.len()).map(|n| good[..n].to_vec()).collect();
            for i in 0..good.len() {
                let mut flipped = good.clone();
                flipped[i] ^= 0x04;
                bad_inputs.push(flipped);
            }
            bad_inputs.push(foreign_prekey.clone());
            bad_inputs.push(vec![0u8; MAX_SESSION_MESSAGE_LEN + 1]);
            for bad in &bad_inputs {
                assert!(session.decrypt(bad).is_err());
                assert_eq!(*session.to_bytes(), *before);
            }
            session.decrypt(good).unwrap();
        }
        // `a` has heard from `b`, so it sends normal messages now; replay is refused.
        let m = a.encrypt(b"n").unwrap();
        assert_eq!(b.decrypt(&m).unwrap(), b"n");
        assert_eq!(b.decrypt(&m), Err(CryptoError::DuplicateMessage));
        assert_eq!(b.decrypt(&next), Err(CryptoError::DuplicateMessage));
    }

    #[test]
    fn parse_rejects_malformed() {
        assert!(parse_prekey_message(b"").is_err());
        assert!(parse_prekey_message(&[1, 1]).is_err());
        assert!(parse_prekey_message(&[2, 2]).is_err());
        let r = responder();
        let mut a = Session::initiate(&ALICE, &bundle(&r, true)).unwrap();
        let m = a.encrypt(b"x").unwrap();
        for cut in 0..m.len() {
            assert!(matches!(
                parse_prekey_message(&m[..cut]),
                Err(CryptoError::InvalidMessage(_))
            ));
        }
        let mut bad_flag = m.clone();
        bad_flag[2 + 68] = 2;
        assert!(parse_prekey_message(&bad_flag).is_err());
    }

    #[test]
    fn session_state_garbage() {
        let r = responder();
        let mut a = Session::initiate(&ALICE, &bundle(&r, true)).unwrap();
        let first = a.encrypt(b"hello").unwrap();
        let (b, _) = Session::accept(&r.seed, &r.spk, Some(&r.opk), &first).unwrap();
        for s in [&a, &b] {
            let bytes = s.to_bytes();
            for cut in 0..bytes.len() {
                assert!(matches!(
                    Session::from_bytes(&bytes[..cut]),
                    Err(CryptoError::InvalidState(_))
                ));
            }
            let mut swapped = bytes.to_vec();
            swapped[1] ^= 1; // role flipped: AD no longer matches
            assert!(Session::from_bytes(&swapped).is_err());
            let mut trailing = bytes.to_vec();
            trailing.push(0);
            assert!(Session::from_bytes(&trailing).is_err());
        }
    }
}
