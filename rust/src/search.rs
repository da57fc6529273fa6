//! Search tokens of the peer's history (`docs/peer.md`): each word of a message is indexed as
//! HMAC-SHA256(search key, word) truncated to 16 bytes, so the database holds no word in clear.
//!
//! One call tokenises a whole message: the key's inner and outer hash states are computed once
//! and cloned per word, instead of one keyed HMAC per word through Python (~2.5 µs each).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes kept of each HMAC-SHA256 tag.
pub const TOKEN_LEN: usize = 16;

/// The search token of every word, in order.
pub fn tokens<W: AsRef<[u8]>>(key: &[u8], words: &[W]) -> Vec<[u8; TOKEN_LEN]> {
    // HMAC takes a key of any length (a long one is hashed first): this cannot fail.
    let keyed = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    words
        .iter()
        .map(|word| {
            let mut mac = keyed.clone();
            mac.update(word.as_ref());
            let tag = mac.finalize().into_bytes();
            let mut token = [0u8; TOKEN_LEN];
            token.copy_from_slice(&tag[..TOKEN_LEN]);
            token
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(data: &[u8]) -> String {
        data.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn rfc_4231_vectors_truncated() {
        // RFC 4231 test case 2 (key "Jefe") and test case 1 (20 bytes of 0x0b).
        let two = tokens(b"Jefe", &[b"what do ya want for nothing?"]);
        assert_eq!(hex(&two[0]), "5bdcc146bf60754e6a042426089575c7");
        let one = tokens(&[0x0b; 20], &[b"Hi There"]);
        assert_eq!(hex(&one[0]), "b0344c61d8db38535ca8afceaf0bf12b");
    }

    #[test]
    fn every_word_in_order_and_keyed() {
        let key = [7u8; 32];
        let words = ["lunch", "at", "noon", "lunch"];
        let out = tokens(&key, &words);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0], out[3]);
        assert_ne!(out[0], out[1]);
        for (word, token) in words.iter().zip(&out) {
            assert_eq!(tokens(&key, &[word])[0], *token);
        }
        assert_ne!(tokens(&[8u8; 32], &["lunch"])[0], out[0]);
        assert!(tokens::<&str>(&key, &[]).is_empty());
        // A key longer than SHA-256's block is hashed first, as HMAC specifies.
        assert_eq!(tokens(&[1u8; 100], &[""]).len(), 1);
    }
}
