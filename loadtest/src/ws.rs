//! A lean graphql-transport-ws subscriber for the `fanout` scenario: the
//! WebSocket handshake and frames written and read by hand on one raw
//! connection, so that ten thousand of them cost the load tool little.
//! Only what a server sends a client is read: unfragmented text, ping,
//! pong and close frames, unmasked.

use anyhow::bail;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The handshake's key and the answer RFC 6455 (section 1.3) gives for it.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// Client frames must be masked. The key only guards proxies that
/// misread WebSocket traffic as HTTP, which a loopback load tool has
/// none of, so it is fixed.
const MASK: [u8; 4] = [0x5a, 0x1c, 0x93, 0xe7];

/// The answer to the protocol's `ping`.
pub const PONG: &str = r#"{"type":"pong"}"#;

/// A graphql-transport-ws message from the server, read without copying
/// its payload.
#[derive(serde::Deserialize)]
pub struct ServerMessage<'a> {
    /// `next`, `ping`, `connection_ack`, ...
    #[serde(rename = "type", borrow)]
    pub kind: std::borrow::Cow<'a, str>,
    /// A `next` message's result.
    #[serde(borrow)]
    pub payload: Option<&'a serde_json::value::RawValue>,
}

/// Opens a graphql-transport-ws connection to `base` (`http://host:port`)
/// as `token`'s caller and subscribes (id "1") to `query` with
/// `variables`; returns the socket with a decoder holding whatever came
/// after the server's `connection_ack`.
pub async fn open(
    base: &str,
    token: &str,
    query: &str,
    variables: &Value,
) -> anyhow::Result<(std::net::TcpStream, Decoder)> {
    let request = |authority: &str| {
        format!(
            "GET /graphql HTTP/1.1\r\nhost: {authority}\r\nconnection: Upgrade\r\n\
             upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: {KEY}\r\n\
             sec-websocket-protocol: graphql-transport-ws\r\n\r\n"
        )
    };
    let (mut stream, raw) = crate::http::open_stream(base, request, |response| {
        if response.code != Some(101) {
            bail!("refused with {:?}", response.code);
        }
        let accepted = response.headers.iter().any(|header| {
            header.name.eq_ignore_ascii_case("sec-websocket-accept") && header.value == ACCEPT
        });
        if !accepted {
            bail!("the server did not accept the WebSocket handshake");
        }
        Ok(())
    })
    .await?;
    let mut decoder = Decoder {
        raw,
        replies: Vec::new(),
    };
    let init =
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}});
    let mut out = Vec::new();
    text_frame(init.to_string().as_bytes(), &mut out);
    stream.write_all(&out).await?;
    let mut acknowledged = false;
    let mut buffer = vec![0; 4096];
    loop {
        let mut pings = 0;
        decoder.feed(&[], |text| {
            match serde_json::from_str::<ServerMessage>(text).map(|message| message.kind) {
                Ok(kind) if kind == "connection_ack" => acknowledged = true,
                Ok(kind) if kind == "ping" => pings += 1,
                _ => {}
            }
        })?;
        for _ in 0..pings {
            decoder.reply(PONG);
        }
        if acknowledged {
            break;
        }
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            bail!("no connection_ack: the server closed the connection");
        }
        decoder.raw.extend_from_slice(&buffer[..n]);
    }
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}});
    out.clear();
    text_frame(subscribe.to_string().as_bytes(), &mut out);
    out.append(&mut decoder.replies);
    stream.write_all(&out).await?;
    Ok((stream.into_std()?, decoder))
}

/// Turns a WebSocket's bytes, as they are read, into text messages, and
/// queues the answers its pings need.
pub struct Decoder {
    /// Bytes read and not yet decoded.
    raw: Vec<u8>,
    /// Frames to send the server: pongs.
    replies: Vec<u8>,
}

impl Decoder {
    /// Takes `bytes` just read and hands `each` every text message they
    /// complete; an error once the connection is over (closed, or a frame
    /// this client does not read).
    pub fn feed(&mut self, bytes: &[u8], mut each: impl FnMut(&str)) -> anyhow::Result<()> {
        self.raw.extend_from_slice(bytes);
        let mut used = 0;
        let outcome = loop {
            let Some((head, length)) = frame_head(&self.raw[used..]) else {
                break Ok(());
            };
            let start = used + head;
            let Some(payload) = self.raw.get(start..start + length) else {
                break Ok(());
            };
            used = start + length;
            let first = self.raw[start - head];
            if first & 0x80 == 0 {
                break Err(anyhow::anyhow!("a fragmented message"));
            }
            if self.raw[start - head + 1] & 0x80 != 0 {
                break Err(anyhow::anyhow!("a masked frame from the server"));
            }
            match first & 0x0f {
                0x1 => match std::str::from_utf8(payload) {
                    Ok(text) => each(text),
                    Err(error) => break Err(error.into()),
                },
                0x9 => frame(0xa, payload, &mut self.replies),
                0xa => {}
                0x8 => break Err(anyhow::anyhow!("closed by the server")),
                opcode => break Err(anyhow::anyhow!("an unexpected frame (opcode {opcode})")),
            }
        };
        self.raw.drain(..used);
        outcome
    }

    /// Queues a text message for the server.
    pub fn reply(&mut self, text: &str) {
        text_frame(text.as_bytes(), &mut self.replies);
    }

    /// The frames queued for the server, taken.
    pub fn replies(&mut self) -> Option<Vec<u8>> {
        (!self.replies.is_empty()).then(|| std::mem::take(&mut self.replies))
    }
}

/// A server frame's header length and payload length, once its header is
/// all there; server frames are never masked.
fn frame_head(bytes: &[u8]) -> Option<(usize, usize)> {
    let second = *bytes.get(1)?;
    match second & 0x7f {
        126 => Some((
            4,
            usize::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
        )),
        127 => Some((
            10,
            usize::try_from(u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)).ok()?,
        )),
        length => Some((2, usize::from(length))),
    }
}

/// Appends a masked text frame carrying `payload` to `out`.
fn text_frame(payload: &[u8], out: &mut Vec<u8>) {
    frame(0x1, payload, out);
}

/// Appends a masked, final client frame of `opcode` carrying `payload`.
fn frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        length @ 0..126 => out.push(0x80 | length as u8),
        length @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(length as u16).to_be_bytes());
        }
        length => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(
        payload
            .iter()
            .zip(MASK.iter().cycle())
            .map(|(byte, mask)| byte ^ mask),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame: final, unmasked.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            length @ 0..126 => frame.push(length as u8),
            length => {
                frame.push(126);
                frame.extend_from_slice(&(length as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    fn decoder() -> Decoder {
        Decoder {
            raw: Vec::new(),
            replies: Vec::new(),
        }
    }

    /// A short and a long (16-bit length) text message and a ping between
    /// them: read whole or split at any byte, both texts come out, in
    /// order, and the ping's pong is queued once.
    #[test]
    fn messages_come_out_whole_wherever_the_reads_split() {
        let long = "x".repeat(300);
        let mut stream = server_frame(0x1, b"{\"type\":\"next\"}");
        stream.extend(server_frame(0x9, b"hi"));
        stream.extend(server_frame(0x1, long.as_bytes()));
        for split in 0..=stream.len() {
            let mut decoder = decoder();
            let mut texts = Vec::new();
            let (head, tail) = stream.split_at(split);
            decoder
                .feed(head, |text| texts.push(text.to_owned()))
                .unwrap();
            decoder
                .feed(tail, |text| texts.push(text.to_owned()))
                .unwrap();
            assert_eq!(
                texts,
                ["{\"type\":\"next\"}", long.as_str()],
                "split at {split}"
            );
            let mut pong = Vec::new();
            frame(0xa, b"hi", &mut pong);
            assert_eq!(decoder.replies(), Some(pong), "split at {split}");
            assert_eq!(decoder.replies(), None);
        }
    }

    /// What the client sends is masked, and unmasks to what it meant.
    #[test]
    fn client_frames_are_masked() {
        let payload = "y".repeat(200);
        let mut decoder = decoder();
        decoder.reply(&payload);
        let sent = decoder.replies().unwrap();
        assert_eq!(sent[0], 0x81, "final text frame");
        assert_eq!(sent[1], 0x80 | 126, "masked, 16-bit length");
        assert_eq!(u16::from_be_bytes([sent[2], sent[3]]), 200);
        let mask = &sent[4..8];
        let unmasked: Vec<u8> = sent[8..]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(byte, mask)| byte ^ mask)
            .collect();
        assert_eq!(unmasked, payload.as_bytes());
        assert_ne!(&sent[8..], payload.as_bytes());
    }

    /// A close, a fragment, a masked frame or binary data ends the
    /// connection as an error.
    #[test]
    fn what_a_server_must_not_send_is_an_error() {
        let mut fragment = server_frame(0x1, b"part");
        fragment[0] &= 0x7f;
        let mut masked = server_frame(0x1, b"");
        masked[1] |= 0x80;
        masked.extend_from_slice(&MASK);
        for bytes in [
            server_frame(0x8, b""),
            fragment,
            masked,
            server_frame(0x2, b"bin"),
        ] {
            assert!(decoder().feed(&bytes, |_| {}).is_err(), "{bytes:?}");
        }
    }
}
