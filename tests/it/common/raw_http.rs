//! An HTTP/1.1 client on one keep-alive connection that never re-sends a request, as
//! Python's `http.client` and `httpx` behave: a request whose connection closes before
//! its answer is reported as lost, never retried behind the test's back (Rust's pooled
//! clients quietly re-send on a connection closed under them, which hides lost answers).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer as it came off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the server said it closes the connection after this answer.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// How a request ended without an answer.
#[derive(Debug)]
pub enum NoAnswer {
    /// A new connection could not be opened: the server never had the request.
    Refused(String),
    /// The connection failed or closed before a complete answer (the data loss).
    Lost(String),
    /// No answer within the client's timeout.
    TimedOut,
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Refused(why) => write!(f, "connection refused: {why}"),
            NoAnswer::Lost(why) => write!(f, "lost: {why}"),
            NoAnswer::TimedOut => write!(f, "no answer in time"),
        }
    }
}

/// A request to send: method, path, extra headers and body.
pub struct RawRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
    /// Send the head and the body in separate writes with this pause between them, as
    /// clients whose body is not ready with the head do.
    pub body_after: Option<Duration>,
}

/// A client on one connection at a time; it opens a new one only when the server said
/// `Connection: close` (or a request failed), never to re-send a request.
pub struct KeepAliveClient {
    addr: String,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
    timeout: Duration,
    /// Connections opened so far.
    pub connections: u64,
}

impl KeepAliveClient {
    /// A client of `addr` (`host:port`) whose requests give up after `timeout`.
    pub fn new(addr: &str, timeout: Duration) -> KeepAliveClient {
        KeepAliveClient {
            addr: addr.to_owned(),
            stream: None,
            buffer: Vec::new(),
            timeout,
            connections: 0,
        }
    }

    /// Sends `request` once and reads its answer. The connection is kept for the next
    /// request unless the answer said `Connection: close` or the request failed.
    pub async fn send(&mut self, request: &RawRequest<'_>) -> Result<RawResponse, NoAnswer> {
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(Ok(response)) => {
                if response.closes() {
                    self.stream = None;
                }
                Ok(response)
            }
            Ok(Err(error)) => {
                self.stream = None;
                Err(error)
            }
            Err(_) => {
                self.stream = None;
                Err(NoAnswer::TimedOut)
            }
        }
    }

    async fn exchange(&mut self, request: &RawRequest<'_>) -> Result<RawResponse, NoAnswer> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| NoAnswer::Refused(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            self.stream = Some(stream);
            self.buffer.clear();
            self.connections += 1;
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(NoAnswer::Lost("no connection".into()));
        };
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {}\r\n",
            request.method,
            request.path,
            request.body.len()
        );
        for (name, value) in request.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let written = match request.body_after {
            None => {
                let mut all = head.into_bytes();
                all.extend_from_slice(request.body);
                stream.write_all(&all).await
            }
            Some(pause) => {
                let head_written = stream.write_all(head.as_bytes()).await;
                tokio::time::sleep(pause).await;
                match head_written {
                    Ok(()) => stream.write_all(request.body).await,
                    Err(error) => Err(error),
                }
            }
        };
        // A write that fails may still have an answer waiting (an early 413, say).
        let write_error = written.err().map(|e| e.to_string());
        read_response(stream, &mut self.buffer, request.method == "HEAD")
            .await
            .map_err(|e| {
                NoAnswer::Lost(match write_error {
                    Some(w) => format!("{e} (after the write failed: {w})"),
                    None => e,
                })
            })
    }
}

/// Reads one answer from `stream`, keeping bytes past it in `buffer`.
async fn read_response(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    head_only: bool,
) -> Result<RawResponse, String> {
    let head_end = loop {
        if let Some(at) = find(buffer, b"\r\n\r\n") {
            break at;
        }
        fill(stream, buffer).await?;
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    buffer.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let body = if head_only || status == 204 || status == 304 {
        Vec::new()
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| "bad content-length")?;
        while buffer.len() < length {
            fill(stream, buffer).await?;
        }
        buffer.drain(..length).collect()
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        read_chunked(stream, buffer).await?
    } else {
        // Delimited by the close.
        let mut rest = std::mem::take(buffer);
        stream
            .read_to_end(&mut rest)
            .await
            .map_err(|e| e.to_string())?;
        rest
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

async fn read_chunked(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(at) = find(buffer, b"\r\n") {
                break at;
            }
            fill(stream, buffer).await?;
        };
        let size_text = String::from_utf8_lossy(&buffer[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        buffer.drain(..line_end + 2);
        while buffer.len() < size + 2 {
            fill(stream, buffer).await?;
        }
        body.extend(buffer.drain(..size));
        buffer.drain(..2);
        if size == 0 {
            return Ok(body);
        }
    }
}

async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) => Err("server closed the connection without an answer".into()),
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(format!("connection failed: {e}")),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
