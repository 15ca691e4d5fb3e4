//! Reading one output stream of a stage: the agent's start line, the script's bytes, the
//! agent's exit line (see `agent`).
//!
//! Every byte comes from inside the job environment, so nothing here trusts it: the lines the
//! agent writes are read with a fixed bound, the bytes before the start line are discarded
//! with a bound (a transport whose streams outlive a stage may carry a late writer's bytes),
//! the script's bytes are passed on as they come and never collected, and the search for the
//! exit line is linear (`memchr::memmem`), however the job shapes its output.

use std::borrow::Cow;

use memchr::memmem::Finder;

/// The byte each agent line starts with (ASCII record separator): job output almost never
/// holds it, so the search for the exit line almost never has to hold bytes back.
const MARK: u8 = 0x1e;

/// Bytes of a stream that may come before the start line, discarded, before the stream is
/// taken as broken.
pub const JUNK_LIMIT: usize = 1 << 20;

/// Bytes after `start ` or `exit `: a number and a newline.
const NUMBER_LIMIT: usize = 16;

/// The stage's two agent lines, for one nonce.
#[derive(Debug, Clone)]
pub struct Tag {
    start: Vec<u8>,
    exit: Vec<u8>,
}

impl Tag {
    /// The lines of stage `nonce`.
    pub fn new(nonce: &str) -> Tag {
        let prefix = |word: &str| {
            let mut line = vec![MARK];
            line.extend_from_slice(format!("drover-{nonce} {word} ").as_bytes());
            line
        };
        Tag {
            start: prefix("start"),
            exit: prefix("exit"),
        }
    }
}

/// What a stream has shown so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// The process group of the script, from the start line.
    pub started: Option<u32>,
    /// The script's exit status, from the exit line.
    pub exited: Option<i32>,
}

/// Why a stream cannot be read as a stage's output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// More than [`JUNK_LIMIT`] bytes came before the start line.
    #[error("more than {} KiB came before the stage agent's start line", JUNK_LIMIT / 1024)]
    NoStart,
    /// A start or exit line did not end in a number and a newline.
    #[error("the stage agent's {0} line is malformed")]
    Malformed(&'static str),
}

enum State {
    /// Looking for the start line; `held` may be the beginning of it.
    Start { held: Vec<u8>, skipped: usize },
    /// The number after `start `.
    Pgid(Vec<u8>),
    /// The script's bytes; `held` may be the beginning of the exit line.
    Body { held: Vec<u8> },
    /// The number after `exit `.
    Status(Vec<u8>),
    /// The exit line has been read; later bytes are not the stage's.
    Done,
}

/// One output stream of one stage.
pub struct Wire {
    start: Finder<'static>,
    exit: Finder<'static>,
    state: State,
    seen: Seen,
}

impl Wire {
    /// A reader for a stream of the stage tagged `tag`.
    pub fn new(tag: &Tag) -> Wire {
        Wire {
            start: Finder::new(&tag.start).into_owned(),
            exit: Finder::new(&tag.exit).into_owned(),
            state: State::Start {
                held: Vec::new(),
                skipped: 0,
            },
            seen: Seen::default(),
        }
    }

    /// What the stream has shown so far.
    pub fn seen(&self) -> Seen {
        self.seen
    }

    /// Whether the exit line has been read.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Takes the stream's next bytes, passing the script's to `emit` as they come.
    pub fn feed(&mut self, data: &[u8], emit: &mut dyn FnMut(&[u8])) -> Result<Seen, WireError> {
        let mut input: Cow<'_, [u8]> = Cow::Borrowed(data);
        while !input.is_empty() {
            input = match &mut self.state {
                State::Done => break,
                State::Start { held, skipped } => {
                    let joined = join(held, input);
                    match self.start.find(&joined) {
                        Some(at) => {
                            self.state = State::Pgid(Vec::new());
                            rest(joined, at + self.start.needle().len())
                        }
                        None => {
                            let keep = partial_match(&joined, self.start.needle());
                            *skipped += joined.len() - keep;
                            if *skipped > JUNK_LIMIT {
                                return Err(WireError::NoStart);
                            }
                            *held = joined[joined.len() - keep..].to_vec();
                            break;
                        }
                    }
                }
                State::Pgid(number) => match take_number(number, &input, "start")? {
                    Some((value, used)) => {
                        let pgid = u32::try_from(value)
                            .ok()
                            .filter(|pgid| *pgid > 1)
                            .ok_or(WireError::Malformed("start"))?;
                        self.seen.started = Some(pgid);
                        self.state = State::Body { held: Vec::new() };
                        rest(input, used)
                    }
                    None => break,
                },
                State::Body { held } => {
                    let joined = join(held, input);
                    match self.exit.find(&joined) {
                        Some(at) => {
                            emit(&joined[..at]);
                            self.state = State::Status(Vec::new());
                            rest(joined, at + self.exit.needle().len())
                        }
                        None => {
                            let keep = partial_match(&joined, self.exit.needle());
                            emit(&joined[..joined.len() - keep]);
                            *held = joined[joined.len() - keep..].to_vec();
                            break;
                        }
                    }
                }
                State::Status(number) => match take_number(number, &input, "exit")? {
                    Some((value, _)) => {
                        self.seen.exited =
                            Some(i32::try_from(value).map_err(|_| WireError::Malformed("exit"))?);
                        self.state = State::Done;
                        break;
                    }
                    None => break,
                },
            };
        }
        Ok(self.seen)
    }
}

/// `held` followed by `input`, copied only when something is held (rarely: see [`MARK`]).
fn join<'a>(held: &mut Vec<u8>, input: Cow<'a, [u8]>) -> Cow<'a, [u8]> {
    if held.is_empty() {
        return input;
    }
    let mut joined = std::mem::take(held);
    joined.extend_from_slice(&input);
    Cow::Owned(joined)
}

/// What follows the first `used` bytes.
fn rest(bytes: Cow<'_, [u8]>, used: usize) -> Cow<'_, [u8]> {
    match bytes {
        Cow::Borrowed(bytes) => Cow::Borrowed(&bytes[used..]),
        Cow::Owned(bytes) => Cow::Owned(bytes[used..].to_vec()),
    }
}

/// The length of the longest end of `data` that is a proper start of `needle` (which starts
/// with [`MARK`], so only an end holding that byte can be one).
fn partial_match(data: &[u8], needle: &[u8]) -> usize {
    let window = &data[data.len().saturating_sub(needle.len() - 1)..];
    let Some(first) = memchr::memchr(MARK, window) else {
        return 0;
    };
    (1..=window.len() - first)
        .rev()
        .find(|&n| data.ends_with(&needle[..n]))
        .unwrap_or(0)
}

/// Collects digits (an optional `-` first) up to a newline, at most [`NUMBER_LIMIT`] bytes;
/// returns the number and how many bytes of `input` it used once the newline is there.
fn take_number(
    number: &mut Vec<u8>,
    input: &[u8],
    line: &'static str,
) -> Result<Option<(i64, usize)>, WireError> {
    let malformed = WireError::Malformed(line);
    let (part, used) = match memchr::memchr(b'\n', input) {
        Some(end) => (&input[..end], Some(end + 1)),
        None => (input, None),
    };
    if number.len() + part.len() > NUMBER_LIMIT {
        return Err(malformed);
    }
    number.extend_from_slice(part);
    let Some(used) = used else { return Ok(None) };
    let text = std::str::from_utf8(number).map_err(|_| malformed.clone())?;
    let value = text.parse::<i64>().map_err(|_| malformed)?;
    Ok(Some((value, used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "00ff";

    fn line(word: &str, number: &str) -> Vec<u8> {
        let mut bytes = vec![MARK];
        bytes.extend_from_slice(format!("drover-{NONCE} {word} {number}\n").as_bytes());
        bytes
    }

    fn framed(body: &[u8], status: &str) -> Vec<u8> {
        [line("start", "1234"), body.to_vec(), line("exit", status)].concat()
    }

    /// Feeds `stream` in chunks of `size` bytes; returns what passed and what was seen.
    fn feed_in_chunks(stream: &[u8], size: usize) -> (Vec<u8>, Result<Seen, WireError>) {
        let mut wire = Wire::new(&Tag::new(NONCE));
        let mut out = Vec::new();
        let mut seen = Ok(Seen::default());
        for chunk in stream.chunks(size) {
            seen = wire.feed(chunk, &mut |bytes| out.extend_from_slice(bytes));
            if seen.is_err() {
                break;
            }
        }
        (out, seen)
    }

    #[test]
    fn the_script_bytes_pass_byte_exact_however_the_stream_is_cut() {
        let body = b"hello\xff\n\x1e not a line\n\x1edrover-00fe exit 1\nno newline at the end";
        let stream = framed(body, "3");
        for size in [1, 2, 3, 7, 64, stream.len()] {
            let (out, seen) = feed_in_chunks(&stream, size);
            assert_eq!(out, body, "chunks of {size}");
            assert_eq!(
                seen,
                Ok(Seen {
                    started: Some(1234),
                    exited: Some(3)
                }),
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn bytes_before_the_start_line_and_after_the_exit_line_are_not_the_stage_s() {
        let stream = [
            b"late writer".to_vec(),
            framed(b"ok", "0"),
            b"after".to_vec(),
        ]
        .concat();
        let (out, seen) = feed_in_chunks(&stream, 5);
        assert_eq!(out, b"ok");
        assert_eq!(seen.expect("valid").exited, Some(0));
    }

    #[test]
    fn a_flood_before_the_start_line_is_bounded() {
        let flood = vec![b'x'; JUNK_LIMIT + 10];
        let (_, seen) = feed_in_chunks(&flood, 64 * 1024);
        assert_eq!(seen, Err(WireError::NoStart));
    }

    #[test]
    fn a_flood_where_a_number_belongs_is_refused() {
        let mut stream = line("start", "1234");
        stream.truncate(stream.len() - 5);
        stream.extend(vec![b'9'; 1 << 20]);
        let (_, seen) = feed_in_chunks(&stream, 4096);
        assert_eq!(seen, Err(WireError::Malformed("start")));
        let mut stream = framed(b"", "0");
        stream.truncate(stream.len() - 2);
        stream.extend(b"x\n");
        let (_, seen) = feed_in_chunks(&stream, 3);
        assert_eq!(seen, Err(WireError::Malformed("exit")));
    }

    #[test]
    fn a_start_line_naming_init_or_no_group_is_refused() {
        for pgid in ["1", "0", "-5", "99999999999"] {
            let (_, seen) = feed_in_chunks(&line("start", pgid), 4);
            assert_eq!(seen, Err(WireError::Malformed("start")), "{pgid}");
        }
    }

    #[test]
    fn a_megabyte_without_a_newline_passes_in_linear_time() {
        // The old status reader rescanned its whole buffer per read: quadratic.
        let body = vec![MARK; 8 << 20];
        let stream = framed(&body, "0");
        let (out, seen) = feed_in_chunks(&stream, 4096);
        assert_eq!(out.len(), body.len());
        assert_eq!(seen.expect("valid").exited, Some(0));
    }
}
