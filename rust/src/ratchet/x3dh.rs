//! X3DH key agreement (Signal's X3DH rev. 1 with the parameters of `docs/crypto.md`).
//!
//! DH1 = DH(IK_A, SPK_B), DH2 = DH(EK_A, IK_B), DH3 = DH(EK_A, SPK_B), DH4 = DH(EK_A, OPK_B);
//! SK = `kdf::x3dh_kdf(DH1 ‖ DH2 ‖ DH3 [‖ DH4])`; AD = IK_A ‖ IK_B (Ed25519 public keys).
//! Every DH refuses low-order keys and non-contributory outputs.

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use super::errors::Result;
use super::kdf::x3dh_kdf;
use super::keys::{
    dh, ed25519_public_to_x25519, x25519_public_from_slice, IdentityKeyPair, PrekeyBundle,
};

/// Length of the associated data: IK_A ‖ IK_B.
pub const AD_LEN: usize = 64;

/// AD = IK_A ‖ IK_B.
pub fn associated_data(
    initiator_identity: &[u8; 32],
    responder_identity: &[u8; 32],
) -> [u8; AD_LEN] {
    let mut ad = [0u8; AD_LEN];
    ad[..32].copy_from_slice(initiator_identity);
    ad[32..].copy_from_slice(responder_identity);
    ad
}

/// X3DH as the initiator with the ephemeral key `ephemeral`. Verifies the bundle's signature
/// before anything else. Returns SK.
pub fn initiate(
    identity: &IdentityKeyPair,
    ephemeral: &StaticSecret,
    bundle: &PrekeyBundle,
) -> Result<Zeroizing<[u8; 32]>> {
    bundle.verify()?;
    let ik_b = ed25519_public_to_x25519(&bundle.identity_key)?;
    let dh1 = dh(identity.dh_secret(), &bundle.signed_prekey)?;
    let dh2 = dh(ephemeral, &ik_b)?;
    let dh3 = dh(ephemeral, &bundle.signed_prekey)?;
    match &bundle.one_time_prekey {
        Some((_, opk)) => {
            let dh4 = dh(ephemeral, opk)?;
            Ok(x3dh_kdf(&[&dh1, &dh2, &dh3, &dh4]))
        }
        None => Ok(x3dh_kdf(&[&dh1, &dh2, &dh3])),
    }
}

/// X3DH as the responder, from the initiator's identity key (Ed25519) and ephemeral key.
pub fn respond(
    identity: &IdentityKeyPair,
    signed_prekey: &StaticSecret,
    one_time_prekey: Option<&StaticSecret>,
    initiator_identity: &[u8],
    initiator_ephemeral: &[u8],
) -> Result<Zeroizing<[u8; 32]>> {
    let ik_a = ed25519_public_to_x25519(initiator_identity)?;
    let ek_a = x25519_public_from_slice(initiator_ephemeral)?;
    let dh1 = dh(signed_prekey, &ik_a)?;
    let dh2 = dh(identity.dh_secret(), &ek_a)?;
    let dh3 = dh(signed_prekey, &ek_a)?;
    match one_time_prekey {
        Some(opk) => {
            let dh4 = dh(opk, &ek_a)?;
            Ok(x3dh_kdf(&[&dh1, &dh2, &dh3, &dh4]))
        }
        None => Ok(x3dh_kdf(&[&dh1, &dh2, &dh3])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratchet::errors::CryptoError;
    use crate::ratchet::keys::tests::{low_order_x25519, small_order_ed25519};
    use crate::ratchet::keys::{x25519_generate, x25519_public, OneTimePrekey, SignedPrekey};

    struct Bob {
        identity: IdentityKeyPair,
        spk: SignedPrekey,
        opk: OneTimePrekey,
    }

    fn bob() -> Bob {
        let seed = [0xB0u8; 32];
        Bob {
            identity: IdentityKeyPair::from_seed(&seed).unwrap(),
            spk: SignedPrekey::generate(&seed, 1).unwrap(),
            opk: OneTimePrekey::generate(2),
        }
    }

    fn bundle(b: &Bob, with_opk: bool) -> PrekeyBundle {
        let opk_public = b.opk.public_key();
        PrekeyBundle::new(
            &b.identity.public_key(),
            b.spk.id,
            &b.spk.public_key(),
            &b.spk.signature,
            with_opk.then_some((b.opk.id, &opk_public[..])),
        )
        .unwrap()
    }

    #[test]
    fn both_sides_agree_with_and_without_one_time_prekey() {
        let b = bob();
        let alice = IdentityKeyPair::from_seed(&[0xA0u8; 32]).unwrap();
        let mut secrets = vec![];
        for with_opk in [false, true] {
            let ek = x25519_generate();
            let sk_a = initiate(&alice, &ek, &bundle(&b, with_opk)).unwrap();
            let sk_b = respond(
                &b.identity,
                b.spk.secret(),
                with_opk.then(|| b.opk.secret()),
                &alice.public_key(),
                &x25519_public(&ek),
            )
            .unwrap();
            assert_eq!(*sk_a, *sk_b);
            secrets.push(*sk_a);
        }
        assert_ne!(secrets[0], secrets[1]);
    }

    #[test]
    fn matches_the_formula() {
        let b = bob();
        let alice = IdentityKeyPair::from_seed(&[0xA0u8; 32]).unwrap();
        let ek = x25519_generate();
        let sk = initiate(&alice, &ek, &bundle(&b, true)).unwrap();
        let ik_b = ed25519_public_to_x25519(&b.identity.public_key()).unwrap();
        let d1 = dh(alice.dh_secret(), &b.spk.public_key()).unwrap();
        let d2 = dh(&ek, &ik_b).unwrap();
        let d3 = dh(&ek, &b.spk.public_key()).unwrap();
        let d4 = dh(&ek, &b.opk.public_key()).unwrap();
        assert_eq!(*sk, *x3dh_kdf(&[&d1, &d2, &d3, &d4]));
    }

    #[test]
    fn bad_signature_is_refused_before_dh() {
        let b = bob();
        let alice = IdentityKeyPair::from_seed(&[0xA0u8; 32]).unwrap();
        let mut bad = bundle(&b, true);
        bad.signed_prekey_signature[0] ^= 0x80;
        assert!(matches!(
            initiate(&alice, &x25519_generate(), &bad),
            Err(CryptoError::InvalidSignature(_))
        ));
        // Signed by somebody else.
        let mallory = SignedPrekey::generate(&[0x66; 32], 1).unwrap();
        let mut swapped = bundle(&b, false);
        swapped.signed_prekey = mallory.public_key();
        swapped.signed_prekey_signature = mallory.signature;
        assert!(matches!(
            initiate(&alice, &x25519_generate(), &swapped),
            Err(CryptoError::InvalidSignature(_))
        ));
    }

    #[test]
    fn low_order_keys_are_refused() {
        let b = bob();
        let alice = IdentityKeyPair::from_seed(&[0xA0u8; 32]).unwrap();
        let ek = x25519_public(&x25519_generate());
        for bad in small_order_ed25519() {
            assert!(matches!(
                respond(&b.identity, b.spk.secret(), None, &bad, &ek),
                Err(CryptoError::InvalidKey(_))
            ));
        }
        for bad in low_order_x25519() {
            assert!(matches!(
                respond(&b.identity, b.spk.secret(), None, &alice.public_key(), &bad),
                Err(CryptoError::InvalidKey(_))
            ));
            assert!(
                PrekeyBundle::new(&b.identity.public_key(), 1, &bad, &[0u8; 64], None).is_err()
            );
            // A bundle built around the check still fails at DH time.
            let mut forged = bundle(&b, true);
            forged.one_time_prekey = Some((2, bad));
            assert!(matches!(
                initiate(&alice, &x25519_generate(), &forged),
                Err(CryptoError::InvalidKey(_))
            ));
        }
        for bad in small_order_ed25519() {
            assert!(PrekeyBundle::new(&bad, 1, &ek, &[0u8; 64], None).is_err());
        }
    }
}
