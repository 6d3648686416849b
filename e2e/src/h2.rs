//! Raw HTTP/2 frames, for tests whose client must do what no well-behaved client library
//! would (floods of resets, bodies sent after the answer).

use tokio::io::{AsyncRead, AsyncReadExt};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One frame: type, flags, stream, payload.
pub type Frame = (u8, u8, u32, Vec<u8>);

/// A frame's bytes on the wire.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The next frame read from `r`.
pub async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await?;
    let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
    Ok((head[3], head[4], stream, payload))
}

/// Frame types (RFC 9113, section 6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
}

/// An HPACK integer (RFC 7541, section 5.1) with an `n`-bit prefix, `high` holding the bits
/// of the first byte above the prefix.
pub fn hpack_int(n: u32, high: u8, value: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if value < max {
        return vec![high | u8::try_from(value).expect("under the prefix")];
    }
    let mut out = vec![high | u8::try_from(max).expect("prefix")];
    let mut rest = value - max;
    while rest >= 128 {
        out.push(u8::try_from(rest % 128).expect("7 bits") | 0x80);
        rest /= 128;
    }
    out.push(u8::try_from(rest).expect("7 bits"));
    out
}

/// A header field as an HPACK literal with a new name: added to the dynamic table when
/// `index`, else not indexed.
pub fn hpack_literal(name: &[u8], value: &[u8], index: bool) -> Vec<u8> {
    let mut out = vec![if index { 0x40 } else { 0x00 }];
    out.extend(hpack_int(7, 0, name.len()));
    out.extend_from_slice(name);
    out.extend(hpack_int(7, 0, value.len()));
    out.extend_from_slice(value);
    out
}

/// The header block of a request (`GET`, or `POST` when `post`) for `path` at `authority`,
/// scheme `http`, without Huffman coding.
pub fn request_block(post: bool, path: &str, authority: &str) -> Vec<u8> {
    // Static table: 2 `:method GET`, 3 `:method POST`, 6 `:scheme http`, 4 `:path /`
    // (as a name), 1 `:authority` (as a name).
    let mut out = vec![if post { 0x83 } else { 0x82 }, 0x86];
    out.extend(hpack_int(4, 0, 4));
    out.extend(hpack_int(7, 0, path.len()));
    out.extend_from_slice(path.as_bytes());
    out.extend(hpack_int(4, 0, 1));
    out.extend(hpack_int(7, 0, authority.len()));
    out.extend_from_slice(authority.as_bytes());
    out
}

/// One SETTINGS parameter's bytes.
pub fn setting(id: u16, value: u32) -> [u8; 6] {
    let (i, v) = (id.to_be_bytes(), value.to_be_bytes());
    [i[0], i[1], v[0], v[1], v[2], v[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541_examples() {
        // C.1.1: 10 in a 5-bit prefix; C.1.2: 1337 in a 5-bit prefix.
        assert_eq!(hpack_int(5, 0, 10), vec![0x0a]);
        assert_eq!(hpack_int(5, 0, 1337), vec![0x1f, 0x9a, 0x0a]);
        assert_eq!(hpack_int(7, 0x80, 127), vec![0xff, 0x00]);
    }
}
