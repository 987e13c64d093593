//! A lean GraphQL over SSE subscriber for the `sse` scenario: one raw
//! HTTP/1.1 connection, its head parsed with httparse, its chunked body
//! decoded and split into events by hand, so that ten thousand of them
//! cost the load tool little.

use std::borrow::Cow;

use anyhow::{Context, bail};

/// One server-sent event, borrowed from the stream's buffer.
pub struct Event<'a> {
    /// Its `event:` field.
    pub kind: &'a str,
    /// Its `id:` field.
    pub id: Option<&'a str>,
    /// Its `data:` lines, joined.
    pub data: Cow<'a, str>,
}

/// POSTs `query` to `base`/graphql with `Accept: text/event-stream`, and
/// returns the socket once the response's head is read, with a decoder
/// holding whatever of the body came with it.
pub async fn open(
    base: &str,
    token: &str,
    query: &str,
) -> anyhow::Result<(std::net::TcpStream, Decoder)> {
    let body = serde_json::json!({ "query": query }).to_string();
    let request = |authority: &str| {
        format!(
            "POST /graphql HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {token}\r\n\
             accept: text/event-stream\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (stream, raw) = crate::http::open_stream(base, request, |response| {
        if response.code != Some(200) {
            bail!("refused with {:?}", response.code);
        }
        let chunked = response.headers.iter().any(|header| {
            header.name.eq_ignore_ascii_case("transfer-encoding")
                && header.value.eq_ignore_ascii_case(b"chunked")
        });
        if !chunked {
            bail!("expected a chunked event stream");
        }
        Ok(())
    })
    .await?;
    Ok((
        stream.into_std()?,
        Decoder {
            raw,
            body: Vec::with_capacity(1024),
            chunk_left: 0,
        },
    ))
}

/// Turns an event stream's bytes, as they are read, into events.
pub struct Decoder {
    /// Bytes read and not yet decoded (chunk framing included).
    raw: Vec<u8>,
    /// Decoded body not yet split into events.
    body: Vec<u8>,
    /// Body bytes left in the current chunk.
    chunk_left: usize,
}

impl Decoder {
    /// Takes `bytes` just read and hands `each` every event they complete
    /// (keep-alive comments skipped).
    pub fn feed(&mut self, bytes: &[u8], mut each: impl FnMut(Event<'_>)) -> anyhow::Result<()> {
        self.raw.extend_from_slice(bytes);
        self.decode()?;
        let mut start = 0;
        while let Some(end) = find_pair(&self.body[start..], b'\n', b'\n') {
            // Read where it lies: a copy of every event would cost this
            // tool, which shares the cores with the server.
            let text = std::str::from_utf8(&self.body[start..start + end])?;
            start += end + 2;
            let mut event = Event {
                kind: "message",
                id: None,
                data: Cow::Borrowed(""),
            };
            let mut any = false;
            let mut data_lines = false;
            for line in text.lines().filter(|line| !line.starts_with(':')) {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                any |= !line.is_empty();
                match field {
                    "event" => event.kind = value,
                    "id" => event.id = Some(value),
                    "data" if !data_lines => {
                        event.data = Cow::Borrowed(value);
                        data_lines = true;
                    }
                    "data" => {
                        // Lines of one event's data are joined by a newline.
                        let data = event.data.to_mut();
                        data.push('\n');
                        data.push_str(value);
                    }
                    _ => {}
                }
            }
            if any {
                each(event);
            }
        }
        self.body.drain(..start);
        Ok(())
    }

    /// Moves whole chunk data from `raw` to `body`.
    fn decode(&mut self) -> anyhow::Result<()> {
        let mut used = 0;
        loop {
            let raw = &self.raw[used..];
            if self.chunk_left > 0 {
                let take = self.chunk_left.min(raw.len());
                if take == 0 {
                    break;
                }
                self.body.extend_from_slice(&raw[..take]);
                self.chunk_left -= take;
                used += take;
                continue;
            }
            // A chunk's framing: [CRLF after the previous chunk] size CRLF.
            let start = usize::from(raw.starts_with(b"\r\n")) * 2;
            let Some(line_end) = find_pair(&raw[start..], b'\r', b'\n') else {
                break;
            };
            let size = std::str::from_utf8(&raw[start..start + line_end])?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            if size == 0 {
                bail!("the stream ended");
            }
            used += start + line_end + 2;
            self.chunk_left = size;
        }
        self.raw.drain(..used);
        Ok(())
    }
}

/// Where `first` followed by `second` begins in `bytes`. A `memmem`
/// searcher is built for each search, which costs more than these short
/// searches themselves.
fn find_pair(bytes: &[u8], first: u8, second: u8) -> Option<usize> {
    memchr::memchr_iter(first, bytes).find(|&at| bytes.get(at + 1) == Some(&second))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events `feed` hands over, as (kind, id, data).
    fn events(decoder: &mut Decoder, bytes: &[u8]) -> Vec<(String, Option<String>, String)> {
        let mut events = Vec::new();
        decoder
            .feed(bytes, |event| {
                events.push((
                    event.kind.to_owned(),
                    event.id.map(str::to_owned),
                    event.data.into_owned(),
                ))
            })
            .unwrap();
        events
    }

    fn decoder() -> Decoder {
        Decoder {
            raw: Vec::new(),
            body: Vec::new(),
            chunk_left: 0,
        }
    }

    /// Two events and a keep-alive comment, in chunks that do not follow
    /// the events' bounds: read whole or split at any byte, the same two
    /// events come out.
    #[test]
    fn events_come_out_whole_wherever_the_reads_split() {
        let body = ":\n\nevent: next\nid: 7\ndata: {\"a\":\n\
                    data: 1}\n\nevent: complete\ndata:\n\n";
        let (first, second) = body.split_at(20);
        let stream = format!(
            "{:x}\r\n{first}\r\n{:x};ext=1\r\n{second}\r\n",
            first.len(),
            second.len()
        );
        let expected = vec![
            (
                "next".to_owned(),
                Some("7".to_owned()),
                "{\"a\":\n1}".to_owned(),
            ),
            ("complete".to_owned(), None, String::new()),
        ];
        for split in 0..=stream.len() {
            let mut decoder = decoder();
            let (head, tail) = stream.as_bytes().split_at(split);
            let mut got = events(&mut decoder, head);
            got.extend(events(&mut decoder, tail));
            assert_eq!(got, expected, "split at {split}");
        }
    }

    /// As the SSE standard reads them: every `data` line counts, an empty
    /// one too, joined by newlines.
    #[test]
    fn data_lines_are_joined_by_newlines_empty_ones_too() {
        let body = "data:\ndata: x\n\n";
        let stream = format!("{:x}\r\n{body}\r\n", body.len());
        let got = events(&mut decoder(), stream.as_bytes());
        assert_eq!(got, vec![("message".to_owned(), None, "\nx".to_owned())]);
    }

    #[test]
    fn a_bad_chunk_size_or_the_last_chunk_is_an_error() {
        assert!(decoder().feed(b"zz\r\n", |_| {}).is_err());
        assert!(decoder().feed(b"0\r\n\r\n", |_| {}).is_err());
    }
}
