//! Incremental decoders for streamed upstream answers: newline-delimited JSON (Ollama)
//! and server-sent events (Gemini, OpenAI-compatible servers). Bytes arrive in chunks
//! that split lines anywhere; a decoder keeps the unfinished rest, and refuses a line
//! longer than its limit instead of buffering without bound.

/// A line longer than the decoder's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineTooLong;

/// Splits a byte stream into lines (`\n`, with an optional `\r` before it).
#[derive(Debug, Default)]
pub struct Lines {
    buffer: Vec<u8>,
    /// Where the next line starts in `buffer`.
    start: usize,
    limit: usize,
}

impl Lines {
    /// A decoder refusing lines over `limit` bytes.
    pub fn new(limit: usize) -> Lines {
        Lines {
            buffer: Vec::new(),
            start: 0,
            limit,
        }
    }

    /// Adds the next chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete line, without its line ending.
    pub fn next_line(&mut self) -> Option<Result<&[u8], LineTooLong>> {
        let rest = &self.buffer[self.start..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line_start = self.start;
                self.start += end + 1;
                let mut line = &self.buffer[line_start..line_start + end];
                if let Some(stripped) = line.strip_suffix(b"\r") {
                    line = stripped;
                }
                if line.len() > self.limit {
                    return Some(Err(LineTooLong));
                }
                Some(Ok(line))
            }
            None if rest.len() > self.limit => Some(Err(LineTooLong)),
            None => None,
        }
    }

    /// What is left after the last complete line (a last line without its newline).
    pub fn rest(&self) -> &[u8] {
        &self.buffer[self.start..]
    }
}

/// One server-sent event: its `event:` name, if any, and its `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` fields, joined with newlines.
    pub data: String,
}

/// Splits a byte stream into server-sent events (blank-line separated; `data:`,
/// `event:` and comment lines, as the WHATWG spec reads them).
#[derive(Debug, Default)]
pub struct SseDecoder {
    lines: Lines,
    event: Option<String>,
    data: Option<String>,
}

impl SseDecoder {
    /// A decoder refusing lines over `limit` bytes.
    pub fn new(limit: usize) -> SseDecoder {
        SseDecoder {
            lines: Lines::new(limit),
            event: None,
            data: None,
        }
    }

    /// Adds the next chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.lines.push(chunk);
    }

    /// The next complete event.
    pub fn next_event(&mut self) -> Option<Result<SseEvent, LineTooLong>> {
        loop {
            let line = match self.lines.next_line()? {
                Ok(line) => String::from_utf8_lossy(line).into_owned(),
                Err(error) => return Some(Err(error)),
            };
            if line.is_empty() {
                match self.data.take() {
                    Some(data) => {
                        return Some(Ok(SseEvent {
                            event: self.event.take(),
                            data,
                        }))
                    }
                    None => {
                        self.event = None;
                        continue;
                    }
                }
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                "event" => self.event = Some(value.to_owned()),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_found_across_chunks_and_crlf_is_trimmed() {
        let mut lines = Lines::new(100);
        lines.push(b"{\"a\":1}\r\n{\"b\"");
        assert_eq!(lines.next_line(), Some(Ok(&b"{\"a\":1}"[..])));
        assert_eq!(lines.next_line(), None);
        lines.push(b":2}\n");
        assert_eq!(lines.next_line(), Some(Ok(&b"{\"b\":2}"[..])));
        assert_eq!(lines.next_line(), None);
        lines.push(b"tail");
        assert_eq!(lines.rest(), b"tail");
    }

    #[test]
    fn a_line_over_the_limit_is_refused_even_before_it_ends() {
        let mut lines = Lines::new(4);
        lines.push(b"abcdefgh");
        assert_eq!(lines.next_line(), Some(Err(LineTooLong)));
    }

    #[test]
    fn events_join_their_data_lines_and_skip_comments() {
        let mut sse = SseDecoder::new(1000);
        sse.push(b": keep-alive\n\nevent: message_start\ndata: {\"a\":\ndata: 1}\n\ndata: [DO");
        assert_eq!(
            sse.next_event(),
            Some(Ok(SseEvent {
                event: Some("message_start".into()),
                data: "{\"a\":\n1}".into()
            }))
        );
        assert_eq!(sse.next_event(), None);
        sse.push(b"NE]\r\n\r\n");
        assert_eq!(
            sse.next_event(),
            Some(Ok(SseEvent {
                event: None,
                data: "[DONE]".into()
            }))
        );
    }
}
