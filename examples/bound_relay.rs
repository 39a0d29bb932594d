//! The physical bound of a cache miss, for `scripts/bench.sh`: a relay that does nothing
//! but the round trips a miss cannot avoid.
//!
//! Per request it reads the client's request, sends the gateway's limiter pipeline
//! (`EVALSHA` of the token-bucket script plus a cache `GET`) to Redis and waits for both
//! replies, sends one fixed Ollama request to the upstream and reads its answer, then
//! answers the client with a fixed body. No parsing beyond message framing, no
//! validation, no logging, blocking sockets with one thread per connection: the fewest
//! system calls and wake-ups a miss can take. Its p50 minus the floor's p50 is the lowest
//! one-connection overhead any gateway could reach on the machine it runs on.
//!
//! ```text
//! bound_relay <listen port> <redis port> <upstream port> <script sha>
//! ```
//!
//! The script must already be loaded (`SCRIPT LOAD`); bench.sh does that.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};

/// Bucket policy sent with the script: effectively unlimited, like the bench's keys.
const BUCKET_KEY: &str = "ratelimit:v1:{bound-relay}";
const CAPACITY: &str = "1000000000";
const REFILL_RATE: &str = "1000000000";
/// A cache key that is never stored, so the `GET` reply is always nil (`$-1`).
const CACHE_KEY: &str = "cache:bound-relay-never-stored";

const UPSTREAM_BODY: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"question"}],"stream":false}"#;
const ANSWER: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                      content-length: 2\r\n\r\n{}";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, redis_port, upstream_port, sha] = args.as_slice() else {
        eprintln!("usage: bound_relay <listen port> <redis port> <upstream port> <script sha>");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(("127.0.0.1", port.parse().unwrap_or(0))) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("bound_relay: cannot listen on port {port}: {error}");
            std::process::exit(1);
        }
    };
    let pipeline = redis_pipeline(sha);
    let upstream_request = format!(
        "POST /api/chat HTTP/1.1\r\nhost: 127.0.0.1:{upstream_port}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{UPSTREAM_BODY}",
        UPSTREAM_BODY.len()
    );
    for client in listener.incoming().flatten() {
        let peers = (
            format!("127.0.0.1:{redis_port}"),
            format!("127.0.0.1:{upstream_port}"),
        );
        let (pipeline, upstream_request) = (pipeline.clone(), upstream_request.clone());
        std::thread::spawn(move || {
            if let Err(error) = relay(client, &peers.0, &peers.1, &pipeline, &upstream_request) {
                eprintln!("bound_relay: connection ended: {error}");
            }
        });
    }
}

/// The gateway's miss pipeline in RESP: the limiter script, then the cache lookup.
fn redis_pipeline(sha: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for command in [
        &["EVALSHA", sha, "1", BUCKET_KEY, CAPACITY, REFILL_RATE, "1"][..],
        &["GET", CACHE_KEY][..],
    ] {
        out.extend_from_slice(format!("*{}\r\n", command.len()).as_bytes());
        for arg in command {
            out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
    }
    out
}

/// Serves one client connection until it closes.
fn relay(
    mut client: TcpStream,
    redis_addr: &str,
    upstream_addr: &str,
    pipeline: &[u8],
    upstream_request: &str,
) -> io::Result<()> {
    let mut redis = TcpStream::connect(redis_addr)?;
    let mut upstream = TcpStream::connect(upstream_addr)?;
    for stream in [&client, &redis, &upstream] {
        stream.set_nodelay(true)?;
    }
    let mut buffer = Vec::with_capacity(16 * 1024);
    while read_http_message(&mut client, &mut buffer)? {
        redis.write_all(pipeline)?;
        read_until_nil_reply(&mut redis, &mut buffer)?;
        upstream.write_all(upstream_request.as_bytes())?;
        if !read_http_message(&mut upstream, &mut buffer)? {
            return Err(io::Error::other("upstream closed the connection"));
        }
        client.write_all(ANSWER.as_bytes())?;
    }
    Ok(())
}

/// Reads Redis replies until the last one, the cache `GET`'s nil, has arrived. Replies
/// come in order, so a buffer ending in `$-1\r\n` holds both.
fn read_until_nil_reply(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<()> {
    buffer.clear();
    while !buffer.ends_with(b"$-1\r\n") {
        if read_more(stream, buffer)? == 0 {
            return Err(io::Error::other("Redis closed the connection"));
        }
    }
    if buffer.starts_with(b"-") {
        return Err(io::Error::other("Redis answered the script with an error"));
    }
    Ok(())
}

/// Reads one HTTP/1.1 message framed by `Content-Length` into `buffer`; false when the
/// peer closed the connection before sending anything.
fn read_http_message(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<bool> {
    buffer.clear();
    loop {
        if let Some(head_end) = find(buffer, b"\r\n\r\n") {
            let body_len = content_length(&buffer[..head_end])?;
            if buffer.len() >= head_end + 4 + body_len {
                return Ok(true);
            }
        }
        if read_more(stream, buffer)? == 0 {
            return if buffer.is_empty() {
                Ok(false)
            } else {
                Err(io::Error::other("connection closed mid-message"))
            };
        }
    }
}

fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let read = stream.read(&mut chunk)?;
    buffer.extend_from_slice(&chunk[..read]);
    Ok(read)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `Content-Length` of a message head (0 when absent; chunked bodies are not used by
/// wrk or mock-llm).
fn content_length(head: &[u8]) -> io::Result<usize> {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    let Some(at) = head.find("\r\ncontent-length:") else {
        return Ok(0);
    };
    let value = head[at + "\r\ncontent-length:".len()..]
        .split("\r\n")
        .next()
        .unwrap_or("");
    value
        .trim()
        .parse()
        .map_err(|_| io::Error::other("bad Content-Length"))
}
