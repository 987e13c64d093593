//! `fanout-floor` and `sse-floor`: the same subscribers and changes as
//! `fanout` and `sse`, delivered by a process that does nothing else.
//!
//! This tool starts itself again as that process (`--serve-delivery-floor`).
//! It answers each subscriber's handshake (the WebSocket upgrade,
//! `connection_init` and `subscribe`; or the SSE request), and then, for
//! each change this tool announces on its stdin, frames one message, the
//! same size as the server's, and writes it to every socket, on as many
//! threads as the machine has cores. No database, no GraphQL, no
//! scheduler: one `write` per delivery. Its CPU per delivery and its
//! commit-to-receipt delay are what a delivery costs on this machine
//! before any server does any work, as `floor` is for `query`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, bail};
use tokio_tungstenite::tungstenite;

use crate::cpu::CpuMeter;
use crate::fanout::Transport;

/// The delivery floor's process, seen from this tool.
pub struct DeliveryFloor {
    child: Child,
    stdin: ChildStdin,
    /// `http://127.0.0.1:port`.
    pub base: String,
}

impl DeliveryFloor {
    /// Starts this tool again as the delivery floor for `transport`.
    pub fn start(transport: Transport) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-delivery-floor")
            .arg(match transport {
                Transport::WebSocket => "ws",
                Transport::Sse => "sse",
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the delivery floor")?;
        let stdin = child.stdin.take().context("the floor's stdin")?;
        let mut port = String::new();
        BufReader::new(child.stdout.take().context("the floor's stdout")?).read_line(&mut port)?;
        let port: u16 = port
            .trim()
            .parse()
            .context("the delivery floor did not name its port")?;
        Ok(Self {
            child,
            stdin,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// Announces change `number`: the floor writes it to every subscriber.
    pub fn change(&mut self, number: u64) -> anyhow::Result<()> {
        writeln!(self.stdin, "{number}")?;
        self.stdin.flush()?;
        Ok(())
    }

    pub fn cpu_meter(&self) -> CpuMeter {
        CpuMeter::new(Some(self.child.id()), None)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for DeliveryFloor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The floor's process: prints its port, then delivers every change named
/// on stdin until stdin ends.
pub fn serve(transport: &str) -> anyhow::Result<()> {
    let transport = match transport {
        "ws" => Transport::WebSocket,
        "sse" => Transport::Sse,
        other => bail!("--serve-delivery-floor takes ws or sse, not {other}"),
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards: Arc<Vec<Mutex<Vec<TcpStream>>>> =
        Arc::new((0..threads).map(|_| Mutex::default()).collect());
    let announced = Arc::new((Mutex::new(0_u64), Condvar::new()));

    let accepting = shards.clone();
    std::thread::spawn(move || {
        for (index, stream) in listener.incoming().enumerate() {
            let subscriber = stream.map_err(anyhow::Error::from).and_then(|stream| {
                stream.set_nodelay(true)?;
                match transport {
                    Transport::WebSocket => websocket_handshake(stream),
                    Transport::Sse => sse_handshake(stream),
                }
            });
            // A subscriber that failed its handshake is the tool's error
            // to count, not this process's.
            if let Ok(stream) = subscriber {
                let shard = &accepting[index % accepting.len()];
                shard.lock().unwrap_or_else(|e| e.into_inner()).push(stream);
            }
        }
    });

    for shard in 0..threads {
        let (shards, announced) = (shards.clone(), announced.clone());
        std::thread::spawn(move || {
            let mut sent = 0;
            loop {
                let latest = {
                    let (number, wake) = &*announced;
                    let mut number = number.lock().unwrap_or_else(|e| e.into_inner());
                    while *number == sent {
                        number = wake.wait(number).unwrap_or_else(|e| e.into_inner());
                    }
                    *number
                };
                let mut sockets = shards[shard].lock().unwrap_or_else(|e| e.into_inner());
                for change in sent + 1..=latest {
                    let message = framed(transport, change);
                    sockets.retain_mut(|socket| socket.write_all(&message).is_ok());
                }
                sent = latest;
            }
        });
    }

    for line in std::io::stdin().lock().lines() {
        let number: u64 = line?.trim().parse().context("a change number")?;
        let (latest, wake) = &*announced;
        *latest.lock().unwrap_or_else(|e| e.into_inner()) = number;
        wake.notify_all();
    }
    Ok(())
}

/// The server's `next` payload for change `number`, in the server's form:
/// its cursor (`1:` and an event id of six digits, as in a fresh
/// database) and the probe's status.
fn payload(number: u64) -> String {
    format!(
        r#"{{"data":{{"syncStateChanged":{{"resource":"fanout_probe","cursor":"{}","state":{{"lastSyncStatus":"NEVER_RUN","recordsSynced":{number}}}}}}}}}"#,
        cursor(number)
    )
}

/// The cursor of change `number`.
fn cursor(number: u64) -> String {
    format!("1:{:06}", 100_000 + number)
}

/// Change `number` framed for the wire, as the server frames it: an
/// unmasked WebSocket text frame around a `next` message, or a chunk
/// holding an SSE `next` event.
fn framed(transport: Transport, number: u64) -> Vec<u8> {
    let payload = payload(number);
    match transport {
        Transport::WebSocket => {
            let message = format!(r#"{{"type":"next","id":"1","payload":{payload}}}"#);
            let mut frame = vec![0x81];
            match message.len() {
                length @ 0..=125 => frame.push(length as u8),
                length @ 126..=65535 => {
                    frame.push(126);
                    frame.extend_from_slice(&(length as u16).to_be_bytes());
                }
                length => {
                    frame.push(127);
                    frame.extend_from_slice(&(length as u64).to_be_bytes());
                }
            }
            frame.extend_from_slice(message.as_bytes());
            frame
        }
        Transport::Sse => {
            let event = format!("event: next\nid: {}\ndata: {payload}\n\n", cursor(number));
            format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
        }
    }
}

/// Accepts a graphql-transport-ws subscriber: the upgrade,
/// `connection_init` answered with `connection_ack`, then its `subscribe`.
fn websocket_handshake(stream: TcpStream) -> anyhow::Result<TcpStream> {
    let raw = stream.try_clone()?;
    let mut socket = tungstenite::accept_hdr(stream, answer_with_subprotocol)?;
    let mut read_text = |expected: &str| -> anyhow::Result<()> {
        match socket.read()? {
            tungstenite::Message::Text(text) if text.contains(expected) => Ok(()),
            other => bail!("expected {expected}, got {other:?}"),
        }
    };
    read_text("connection_init")?;
    socket.send(tungstenite::Message::Text(
        r#"{"type":"connection_ack"}"#.into(),
    ))?;
    match socket.read()? {
        tungstenite::Message::Text(text) if text.contains(r#""id":"1""#) => {}
        other => bail!("expected a subscribe with id 1, got {other:?}"),
    }
    Ok(raw)
}

/// Names the subprotocol in the upgrade's answer, as the client requires.
#[expect(
    clippy::result_large_err,
    reason = "the callback's type is tungstenite's"
)]
fn answer_with_subprotocol(
    _: &tungstenite::handshake::server::Request,
    mut response: tungstenite::handshake::server::Response,
) -> Result<tungstenite::handshake::server::Response, tungstenite::handshake::server::ErrorResponse>
{
    response.headers_mut().insert(
        "sec-websocket-protocol",
        tungstenite::http::HeaderValue::from_static("graphql-transport-ws"),
    );
    Ok(response)
}

/// Accepts a GraphQL over SSE subscriber: reads its request (head and
/// body) and answers with the head of a chunked event stream.
fn sse_handshake(mut stream: TcpStream) -> anyhow::Result<TcpStream> {
    let mut request = Vec::with_capacity(1024);
    let mut buffer = [0; 4096];
    loop {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            bail!("the subscriber left before its request was whole");
        }
        request.extend_from_slice(&buffer[..read]);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut head = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(length) = head.parse(&request)? {
            let body = head
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case("content-length"))
                .and_then(|header| std::str::from_utf8(header.value).ok()?.parse().ok())
                .unwrap_or(0_usize);
            if request.len() >= length + body {
                break;
            }
        }
    }
    stream.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          transfer-encoding: chunked\r\nconnection: close\r\n\r\n",
    )?;
    Ok(stream)
}
