//! The data-plane wire formats: ChannelData (RFC 8656 §12.4) and the Send and Data indications
//! (RFC 8656 §11), plus the cheap STUN framing check that decides what goes up to the control
//! plane.
//!
//! Decoding never panics and never allocates: every length is checked before it is used, and a
//! datagram that does not fit one of the shapes below is a [`DecodeError`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The STUN magic cookie (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of a STUN message header.
pub const STUN_HEADER_LEN: usize = 20;
/// Length of a ChannelData header: channel number, length.
pub const CHANNEL_HEADER_LEN: usize = 4;
/// Channel numbers a client may bind (RFC 8656 §12); 0x5000–0x7FFF are reserved.
pub const CHANNEL_MIN: u16 = 0x4000;
/// The last bindable channel number.
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// STUN message type of a Send indication (method Send 0x006, class indication).
pub const SEND_INDICATION: u16 = 0x0016;
/// STUN message type of a Data indication (method Data 0x007, class indication).
pub const DATA_INDICATION: u16 = 0x0017;
/// XOR-PEER-ADDRESS attribute type.
pub const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
/// DATA attribute type.
pub const ATTR_DATA: u16 = 0x0013;
/// DONT-FRAGMENT attribute type: allowed in a Send indication; this data plane does not set DF
/// and forwards anyway (the datagram is small enough for the path or the kernel drops it).
pub const ATTR_DONT_FRAGMENT: u16 = 0x001A;
/// The longest header [`data_indication_header`] writes: STUN header, an IPv6
/// XOR-PEER-ADDRESS, the DATA attribute header.
pub const DATA_INDICATION_HEADER_MAX: usize = STUN_HEADER_LEN + 4 + 20 + 4;

/// Why a datagram was not a well-formed data-plane message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its header or than the length its header declares.
    Truncated,
    /// Longer than the declared length plus the optional padding.
    TrailingBytes,
    /// First two bits 01 but the number lies in the reserved range 0x5000–0x7FFF.
    ReservedChannel,
    /// First two bits 10 or 11: neither STUN nor ChannelData.
    NotTurn,
    /// STUN framing broken: bad magic cookie, length not a multiple of 4, or a bad attribute.
    BadStun,
    /// A Send/Data indication without XOR-PEER-ADDRESS or DATA, or with either twice.
    MissingAttribute,
    /// An unknown comprehension-required attribute in an indication (silently discarded).
    UnknownAttribute,
    /// XOR-PEER-ADDRESS with an unknown family or the wrong length.
    BadAddress,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeError::Truncated => "truncated",
            DecodeError::TrailingBytes => "trailing bytes",
            DecodeError::ReservedChannel => "reserved channel number",
            DecodeError::NotTurn => "neither STUN nor ChannelData",
            DecodeError::BadStun => "malformed STUN",
            DecodeError::MissingAttribute => "missing or repeated attribute",
            DecodeError::UnknownAttribute => "unknown comprehension-required attribute",
            DecodeError::BadAddress => "malformed XOR-PEER-ADDRESS",
        })
    }
}

impl std::error::Error for DecodeError {}

/// What a datagram from a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// ChannelData: forward `payload` to the peer bound to `channel`.
    ChannelData { channel: u16, payload: &'a [u8] },
    /// A Send indication: forward `data` to `peer`.
    Send { peer: SocketAddr, data: &'a [u8] },
    /// Any other well-framed STUN message: the control plane's business.
    Stun,
}

/// Bytes of zero padding that bring `len` to a multiple of 4.
#[inline]
pub fn padding(len: usize) -> usize {
    (4 - (len & 3)) & 3
}

#[inline]
fn be16(data: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([data[at], data[at + 1]])
}

/// Classify one datagram received from a client on the listening socket.
pub fn classify(datagram: &[u8]) -> Result<ClientMessage<'_>, DecodeError> {
    let Some(&first) = datagram.first() else {
        return Err(DecodeError::Truncated);
    };
    match first >> 6 {
        0b01 => {
            let (channel, payload) = decode_channel_data(datagram)?;
            Ok(ClientMessage::ChannelData { channel, payload })
        }
        0b00 => {
            let message_type = check_stun_framing(datagram)?;
            if message_type == SEND_INDICATION {
                let (peer, data) = decode_indication_body(datagram)?;
                Ok(ClientMessage::Send { peer, data })
            } else {
                Ok(ClientMessage::Stun)
            }
        }
        _ => Err(DecodeError::NotTurn),
    }
}

/// Decode a ChannelData message; the padding to a multiple of 4 bytes may be present or not.
pub fn decode_channel_data(datagram: &[u8]) -> Result<(u16, &[u8]), DecodeError> {
    if datagram.len() < CHANNEL_HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    let channel = be16(datagram, 0);
    if !(CHANNEL_MIN..=0x7FFF).contains(&channel) {
        return Err(DecodeError::NotTurn);
    }
    if channel > CHANNEL_MAX {
        return Err(DecodeError::ReservedChannel);
    }
    let length = be16(datagram, 2) as usize;
    let end = CHANNEL_HEADER_LEN + length;
    if datagram.len() < end {
        return Err(DecodeError::Truncated);
    }
    if datagram.len() > end + padding(length) {
        return Err(DecodeError::TrailingBytes);
    }
    Ok((channel, &datagram[CHANNEL_HEADER_LEN..end]))
}

/// The ChannelData header for `payload_len` bytes on `channel`.
#[inline]
pub fn channel_data_header(channel: u16, payload_len: usize) -> [u8; CHANNEL_HEADER_LEN] {
    let c = channel.to_be_bytes();
    let l = (payload_len as u16).to_be_bytes();
    [c[0], c[1], l[0], l[1]]
}

/// A whole ChannelData message; `pad` adds the zero padding (mandatory over TCP).
pub fn encode_channel_data(channel: u16, payload: &[u8], pad: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHANNEL_HEADER_LEN + payload.len() + 3);
    out.extend_from_slice(&channel_data_header(channel, payload.len()));
    out.extend_from_slice(payload);
    if pad {
        out.resize(out.len() + padding(payload.len()), 0);
    }
    out
}

/// Check STUN framing (first two bits 00, magic cookie, length a multiple of 4 that matches the
/// datagram) and return the message type.
pub fn check_stun_framing(datagram: &[u8]) -> Result<u16, DecodeError> {
    if datagram.len() < STUN_HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    let message_type = be16(datagram, 0);
    if message_type & 0xC000 != 0 {
        return Err(DecodeError::NotTurn);
    }
    let length = be16(datagram, 2) as usize;
    let cookie = u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
    if cookie != MAGIC_COOKIE || length % 4 != 0 {
        return Err(DecodeError::BadStun);
    }
    match datagram.len().cmp(&(STUN_HEADER_LEN + length)) {
        std::cmp::Ordering::Less => Err(DecodeError::Truncated),
        std::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes),
        std::cmp::Ordering::Equal => Ok(message_type),
    }
}

/// XOR-PEER-ADDRESS and DATA of a framed Send or Data indication.
fn decode_indication_body(message: &[u8]) -> Result<(SocketAddr, &[u8]), DecodeError> {
    let transaction: &[u8] = &message[8..STUN_HEADER_LEN];
    let mut peer = None;
    let mut data = None;
    let mut at = STUN_HEADER_LEN;
    while at < message.len() {
        if message.len() - at < 4 {
            return Err(DecodeError::BadStun);
        }
        let kind = be16(message, at);
        let length = be16(message, at + 2) as usize;
        let start = at + 4;
        let end = start + length;
        if end > message.len() {
            return Err(DecodeError::BadStun);
        }
        let value = &message[start..end];
        match kind {
            ATTR_XOR_PEER_ADDRESS if peer.is_some() => return Err(DecodeError::MissingAttribute),
            ATTR_XOR_PEER_ADDRESS => peer = Some(decode_xor_address(value, transaction)?),
            ATTR_DATA if data.is_some() => return Err(DecodeError::MissingAttribute),
            ATTR_DATA => data = Some(value),
            ATTR_DONT_FRAGMENT => {}
            kind if kind < 0x8000 => return Err(DecodeError::UnknownAttribute),
            _ => {}
        }
        // The last attribute's padding may be cut by the framing check's length; STUN requires
        // it, so an unpadded tail is malformed.
        at = end + padding(length);
        if at > message.len() {
            return Err(DecodeError::BadStun);
        }
    }
    match (peer, data) {
        (Some(peer), Some(data)) => Ok((peer, data)),
        _ => Err(DecodeError::MissingAttribute),
    }
}

fn decode_xor_address(value: &[u8], transaction: &[u8]) -> Result<SocketAddr, DecodeError> {
    if value.len() < 4 || value[0] != 0 {
        return Err(DecodeError::BadAddress);
    }
    let port = be16(value, 2) ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match (value[1], value.len()) {
        (0x01, 8) => {
            let mut ip = [0u8; 4];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = value[4 + i] ^ cookie[i];
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            for (i, b) in ip.iter_mut().enumerate() {
                let mask = if i < 4 { cookie[i] } else { transaction[i - 4] };
                *b = value[4 + i] ^ mask;
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => Err(DecodeError::BadAddress),
    }
}

/// Write an XOR-PEER-ADDRESS attribute (header included) into `out`; returns its length.
fn encode_xor_address(out: &mut [u8], peer: SocketAddr, transaction: &[u8; 12]) -> usize {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let value_len: u16 = if peer.is_ipv4() { 8 } else { 20 };
    out[0..2].copy_from_slice(&ATTR_XOR_PEER_ADDRESS.to_be_bytes());
    out[2..4].copy_from_slice(&value_len.to_be_bytes());
    out[4] = 0;
    out[6..8].copy_from_slice(&(peer.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match peer.ip() {
        IpAddr::V4(ip) => {
            out[5] = 0x01;
            for (i, b) in ip.octets().iter().enumerate() {
                out[8 + i] = b ^ cookie[i];
            }
        }
        IpAddr::V6(ip) => {
            out[5] = 0x02;
            for (i, b) in ip.octets().iter().enumerate() {
                let mask = if i < 4 { cookie[i] } else { transaction[i - 4] };
                out[8 + i] = b ^ mask;
            }
        }
    }
    4 + value_len as usize
}

/// Write the part of an indication that precedes its DATA bytes: STUN header, XOR-PEER-ADDRESS,
/// DATA attribute header. The message is complete once `data_len` bytes of data and
/// [`padding`]`(data_len)` zero bytes follow. Returns the header length.
pub fn indication_header(
    out: &mut [u8; DATA_INDICATION_HEADER_MAX],
    message_type: u16,
    transaction: &[u8; 12],
    peer: SocketAddr,
    data_len: usize,
) -> usize {
    let address_len = encode_xor_address(&mut out[STUN_HEADER_LEN..], peer, transaction);
    let data_at = STUN_HEADER_LEN + address_len;
    out[data_at..data_at + 2].copy_from_slice(&ATTR_DATA.to_be_bytes());
    out[data_at + 2..data_at + 4].copy_from_slice(&(data_len as u16).to_be_bytes());
    let header_len = data_at + 4;
    let body_len = header_len - STUN_HEADER_LEN + data_len + padding(data_len);
    out[0..2].copy_from_slice(&message_type.to_be_bytes());
    out[2..4].copy_from_slice(&(body_len as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..STUN_HEADER_LEN].copy_from_slice(transaction);
    header_len
}

/// The header of a Data indication: see [`indication_header`].
#[inline]
pub fn data_indication_header(
    out: &mut [u8; DATA_INDICATION_HEADER_MAX],
    transaction: &[u8; 12],
    peer: SocketAddr,
    data_len: usize,
) -> usize {
    indication_header(out, DATA_INDICATION, transaction, peer, data_len)
}

/// Whether `data_len` bytes of data fit one indication (its length field is 16 bits).
#[inline]
pub fn fits_indication(data_len: usize) -> bool {
    data_len + 3 + DATA_INDICATION_HEADER_MAX - STUN_HEADER_LEN <= u16::MAX as usize
}

fn encode_indication(
    message_type: u16,
    transaction: &[u8; 12],
    peer: SocketAddr,
    data: &[u8],
) -> Vec<u8> {
    let mut header = [0u8; DATA_INDICATION_HEADER_MAX];
    let header_len = indication_header(&mut header, message_type, transaction, peer, data.len());
    let mut out = Vec::with_capacity(header_len + data.len() + 3);
    out.extend_from_slice(&header[..header_len]);
    out.extend_from_slice(data);
    out.resize(out.len() + padding(data.len()), 0);
    out
}

/// A whole Send indication (what a client sends; used by tests and load generators).
pub fn encode_send_indication(transaction: &[u8; 12], peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    encode_indication(SEND_INDICATION, transaction, peer, data)
}

/// A whole Data indication.
pub fn encode_data_indication(transaction: &[u8; 12], peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    encode_indication(DATA_INDICATION, transaction, peer, data)
}

/// Decode a Data indication (what a client receives): the peer and the data.
pub fn decode_data_indication(datagram: &[u8]) -> Result<(SocketAddr, &[u8]), DecodeError> {
    if check_stun_framing(datagram)? != DATA_INDICATION {
        return Err(DecodeError::BadStun);
    }
    decode_indication_body(datagram)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator (SplitMix64) for property-style loops.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        fn transaction(&mut self) -> [u8; 12] {
            let mut t = [0u8; 12];
            t.iter_mut().for_each(|b| *b = self.next() as u8);
            t
        }
        fn peer(&mut self) -> SocketAddr {
            let port = self.next() as u16;
            if self.next() & 1 == 0 {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(self.next() as u32)), port)
            } else {
                let ip = Ipv6Addr::from(((self.next() as u128) << 64) | self.next() as u128);
                SocketAddr::new(IpAddr::V6(ip), port)
            }
        }
    }

    #[test]
    fn channel_data_round_trips_with_and_without_padding() {
        let mut rng = Rng(1);
        for _ in 0..500 {
            let channel = CHANNEL_MIN + rng.below(0x1000) as u16;
            let n = rng.below(1500);
            let payload = rng.bytes(n);
            for pad in [false, true] {
                let message = encode_channel_data(channel, &payload, pad);
                assert_eq!(message.len() % 4 == 0, pad || payload.len() % 4 == 0);
                match classify(&message) {
                    Ok(ClientMessage::ChannelData {
                        channel: c,
                        payload: p,
                    }) => {
                        assert_eq!((c, p), (channel, &payload[..]));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn channel_data_rejects_truncation_trailing_bytes_and_reserved_numbers() {
        let message = encode_channel_data(0x4001, b"hello", true);
        assert_eq!(message.len(), 12);
        for cut in 0..9 {
            assert_eq!(
                decode_channel_data(&message[..cut]),
                Err(DecodeError::Truncated),
                "{cut}"
            );
        }
        for keep in 9..=12 {
            assert!(decode_channel_data(&message[..keep]).is_ok(), "{keep}");
        }
        let mut long = message.clone();
        long.push(0);
        assert_eq!(decode_channel_data(&long), Err(DecodeError::TrailingBytes));
        for channel in [0x5000u16, 0x6ABC, 0x7FFF] {
            let m = encode_channel_data(channel, b"x", false);
            assert_eq!(classify(&m), Err(DecodeError::ReservedChannel));
        }
        for first in [0x80u8, 0xC0, 0xFF] {
            assert_eq!(classify(&[first, 0, 0, 0]), Err(DecodeError::NotTurn));
        }
        assert_eq!(classify(&[]), Err(DecodeError::Truncated));
    }

    #[test]
    fn indications_round_trip_for_both_families() {
        let mut rng = Rng(2);
        for _ in 0..500 {
            let transaction = rng.transaction();
            let peer = rng.peer();
            let n = rng.below(1300);
            let data = rng.bytes(n);
            let send = encode_send_indication(&transaction, peer, &data);
            assert_eq!(send.len() % 4, 0);
            assert_eq!(
                classify(&send),
                Ok(ClientMessage::Send { peer, data: &data })
            );
            let indication = encode_data_indication(&transaction, peer, &data);
            assert_eq!(decode_data_indication(&indication), Ok((peer, &data[..])));
            assert_eq!(classify(&indication), Ok(ClientMessage::Stun));
        }
    }

    #[test]
    fn known_answer_send_indication() {
        // Header, XOR-PEER-ADDRESS 192.0.2.1:32853 as in RFC 5769 §2.2, DATA "abc" + 1 pad byte.
        let transaction = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let peer: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let message = encode_send_indication(&transaction, peer, b"abc");
        let expected: Vec<u8> = [
            &[0x00, 0x16, 0x00, 0x14, 0x21, 0x12, 0xa4, 0x42][..],
            &transaction,
            &[
                0x00, 0x12, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
            ],
            &[0x00, 0x13, 0x00, 0x03, b'a', b'b', b'c', 0x00],
        ]
        .concat();
        assert_eq!(message, expected);
    }

    #[test]
    fn send_indication_attribute_rules() {
        let t = [7u8; 12];
        let peer: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let good = encode_send_indication(&t, peer, b"data");
        let with_attr = |kind: u16, value: &[u8]| {
            let mut m = good.clone();
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&(value.len() as u16).to_be_bytes());
            m.extend_from_slice(value);
            m.resize(m.len() + padding(value.len()), 0);
            let body = (m.len() - STUN_HEADER_LEN) as u16;
            m[2..4].copy_from_slice(&body.to_be_bytes());
            m
        };
        // Comprehension-optional attributes (FINGERPRINT, SOFTWARE) and DONT-FRAGMENT pass.
        for kind in [0x8028u16, 0x8022, ATTR_DONT_FRAGMENT] {
            let m = with_attr(
                kind,
                if kind == ATTR_DONT_FRAGMENT {
                    b""
                } else {
                    b"abcd"
                },
            );
            assert!(
                matches!(classify(&m), Ok(ClientMessage::Send { .. })),
                "{kind:#x}"
            );
        }
        // Unknown comprehension-required attributes: the indication is discarded.
        assert_eq!(
            classify(&with_attr(0x0024, b"\0\0\0\0")),
            Err(DecodeError::UnknownAttribute)
        );
        // Repeated DATA, repeated address.
        assert_eq!(
            classify(&with_attr(ATTR_DATA, b"more")),
            Err(DecodeError::MissingAttribute)
        );
        // Missing DATA: a header and XOR-PEER-ADDRESS only.
        let mut no_data = good[..STUN_HEADER_LEN + 24].to_vec();
        no_data[2..4].copy_from_slice(&24u16.to_be_bytes());
        assert_eq!(classify(&no_data), Err(DecodeError::MissingAttribute));
        // Bad family byte.
        let mut bad_family = good.clone();
        bad_family[STUN_HEADER_LEN + 5] = 0x03;
        assert_eq!(classify(&bad_family), Err(DecodeError::BadAddress));
        // Bad cookie; length not a multiple of four.
        let mut bad_cookie = good.clone();
        bad_cookie[4] ^= 1;
        assert_eq!(classify(&bad_cookie), Err(DecodeError::BadStun));
        let mut odd = good.clone();
        odd[3] |= 1;
        assert!(classify(&odd).is_err());
    }

    #[test]
    fn every_truncation_and_extension_of_an_indication_is_rejected() {
        let mut rng = Rng(3);
        for _ in 0..50 {
            let m = encode_send_indication(&rng.transaction(), rng.peer(), &rng.bytes(37));
            for cut in 0..m.len() {
                assert!(classify(&m[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = m.clone();
            longer.extend_from_slice(&[0, 0, 0, 0]);
            assert!(classify(&longer).is_err());
        }
    }

    #[test]
    fn other_stun_messages_go_to_the_control_plane() {
        // A Binding request with no attributes.
        let mut binding = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        binding.extend_from_slice(&[9u8; 12]);
        assert_eq!(classify(&binding), Ok(ClientMessage::Stun));
        assert_eq!(classify(&binding[..19]), Err(DecodeError::Truncated));
        binding[2..4].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(classify(&binding), Err(DecodeError::Truncated));
    }

    #[test]
    fn garbage_never_panics_and_bit_flips_never_change_the_peer_silently() {
        let mut rng = Rng(4);
        for _ in 0..20_000 {
            let len = rng.below(120);
            let mut datagram = rng.bytes(len);
            // Bias half of the cases towards plausible headers.
            if len >= 8 && rng.next() & 1 == 0 {
                datagram[0] &= 0x3F;
                datagram[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let body = (len.saturating_sub(STUN_HEADER_LEN) & !3) as u16;
                datagram[2..4].copy_from_slice(&body.to_be_bytes());
            }
            let _ = classify(&datagram);
            let _ = decode_data_indication(&datagram);
        }
        let t = rng.transaction();
        let peer: SocketAddr = "198.51.100.7:3478".parse().unwrap();
        let m = encode_send_indication(&t, peer, b"payload!");
        for bit in 0..m.len() * 8 {
            let mut flipped = m.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            if let Ok(ClientMessage::Send { peer: p, data }) = classify(&flipped) {
                // Only flips inside the transaction ID, the address or the data survive.
                let byte = bit / 8;
                let inside = (8..20).contains(&byte) || (24..32).contains(&byte) || byte >= 36;
                assert!(inside, "flip at byte {byte} accepted");
                assert!(p != peer || data != b"payload!" || (8..20).contains(&byte));
            }
        }
    }
}
