//! A second look at HTTP/1 request framing, as the bytes arrive.
//!
//! hyper accepts a request that carries both `Transfer-Encoding: chunked` and
//! `Content-Length` (RFC 9112 §6.3 lets a server frame it by the chunked coding and close
//! afterwards), and it drops the `Content-Length` before the request reaches us, so the
//! conflict is invisible at the service. It is the classic smuggling frame, and a proxy
//! should refuse it outright. [`Sniffed`] wraps the client connection and follows the
//! framing of each request with the same head parser hyper uses (`httparse`); the n-th
//! head that carries both headers is recorded, and the service refuses that request
//! with `400` and closes.
//!
//! The scanner only ever adds refusals: whenever it cannot follow the stream (a parse
//! error, an upgrade or `CONNECT`, HTTP/2, an oversized head) it stops looking and hyper's
//! own parser stays the judge.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The request extension marking a request whose head carried both framings.
#[derive(Debug, Clone, Copy)]
pub struct AmbiguousFrame;

/// Larger heads are refused by hyper anyway; past this the scanner stops looking.
const MAX_HEAD: usize = 1024 * 1024;
const MAX_HEADERS: usize = 256;
const FEW_HEADERS: usize = 32;

/// Shared between a connection's scanner and its service: the 1-based number of the
/// first request whose head carried both `Transfer-Encoding` and `Content-Length`
/// (0: none). hyper ends the connection after such a request, so one slot is enough.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<AtomicU64>);

impl Verdicts {
    /// Whether request number `n` (1-based, in arrival order) must be refused.
    pub fn ambiguous(&self, n: u64) -> bool {
        self.0.load(Ordering::Acquire) == n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Head,
    ChunkSize,
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Line(Line),
    /// Body bytes to pass over, then the next state.
    Skip {
        left: u64,
        then: Line,
    },
    Off,
}

#[derive(Debug)]
struct Scanner {
    state: State,
    line: Vec<u8>,
    heads: u64,
    verdicts: Verdicts,
}

impl Scanner {
    fn new(verdicts: Verdicts) -> Self {
        Scanner {
            state: State::Line(Line::Head),
            line: Vec::new(),
            heads: 0,
            verdicts,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Off => return,
                State::Skip { left, then } => {
                    let n = left.min((data.len() - i) as u64);
                    // n <= data.len() - i, so it fits in usize.
                    i += usize::try_from(n).unwrap_or(data.len() - i);
                    let left = left - n;
                    self.state = if left == 0 {
                        State::Line(then)
                    } else {
                        State::Skip { left, then }
                    };
                }
                State::Line(kind) => {
                    // Lines are short; copy up to the next LF in one go.
                    let rest = &data[i..];
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(p) => {
                            self.line.extend_from_slice(&rest[..=p]);
                            i += p + 1;
                            self.line_done(kind);
                        }
                        None => {
                            self.line.extend_from_slice(rest);
                            i = data.len();
                        }
                    }
                    if self.line.len() > MAX_HEAD {
                        self.off();
                    }
                }
            }
        }
    }

    fn off(&mut self) {
        self.state = State::Off;
        self.line = Vec::new();
    }

    fn blank(line: &[u8]) -> bool {
        line == b"\r\n" || line == b"\n"
    }

    fn line_done(&mut self, kind: Line) {
        match kind {
            Line::Head => {
                // Empty lines before a request line are skipped (RFC 9112 §2.2).
                if Self::blank(&self.line) {
                    self.line.clear();
                    return;
                }
                let l = &self.line;
                if l.ends_with(b"\n\r\n") || l.ends_with(b"\n\n") {
                    self.head();
                }
            }
            Line::ChunkSize => {
                let text = std::mem::take(&mut self.line);
                let digits: Vec<u8> = text
                    .iter()
                    .copied()
                    .take_while(u8::is_ascii_hexdigit)
                    .collect();
                let size = std::str::from_utf8(&digits)
                    .ok()
                    .filter(|d| !d.is_empty())
                    .and_then(|d| u64::from_str_radix(d, 16).ok());
                self.state = match size {
                    None => State::Off,
                    Some(0) => State::Line(Line::Trailer),
                    Some(n) => State::Skip {
                        left: n,
                        then: Line::ChunkEnd,
                    },
                };
            }
            Line::ChunkEnd => {
                let ok = Self::blank(&self.line);
                self.line.clear();
                self.state = if ok {
                    State::Line(Line::ChunkSize)
                } else {
                    State::Off
                };
            }
            Line::Trailer => {
                let end = Self::blank(&self.line);
                self.line.clear();
                if end {
                    self.state = State::Line(Line::Head);
                }
            }
        }
    }

    /// A complete head is in `line`: record it and set up its body.
    fn head(&mut self) {
        let mut head = std::mem::take(&mut self.line);
        self.parse_head(&head);
        // The buffer goes back for the next head: no allocation per request.
        if self.state != State::Off {
            head.clear();
            self.line = head;
        }
    }

    fn parse_head(&mut self, head: &[u8]) {
        // Most heads have a few headers: a small array first, the full one only when
        // it does not fit (zeroing 256 slots per request shows in profiles).
        let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
        let mut many;
        let mut req = httparse::Request::new(&mut few);
        let parsed = match req.parse(head) {
            Err(httparse::Error::TooManyHeaders) => {
                many = [httparse::EMPTY_HEADER; MAX_HEADERS];
                req = httparse::Request::new(&mut many);
                req.parse(head)
            }
            other => other,
        };
        match parsed {
            Ok(httparse::Status::Complete(_)) => {}
            // hyper refuses what httparse cannot read; nothing more to follow.
            _ => return self.off(),
        }
        self.heads += 1;
        let method = req.method.unwrap_or("");
        let mut te: Option<&[u8]> = None;
        let mut cl: Option<u64> = None;
        let mut has_cl = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // The last coding decides (RFC 9112 §6.3); later lines come last.
                te = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("content-length") {
                has_cl = true;
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                match (cl, v) {
                    (None, Some(v)) => cl = Some(v),
                    (Some(a), Some(b)) if a == b => {}
                    // hyper refuses it; stop following.
                    _ => return self.off(),
                }
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if te.is_some() && has_cl {
            let _ = self.verdicts.0.compare_exchange(
                0,
                self.heads,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            // hyper closes the connection after this request.
            return self.off();
        }
        if method.eq_ignore_ascii_case("CONNECT") || method == "PRI" || upgrade {
            // A tunnel or another protocol follows: not ours to read.
            return self.off();
        }
        self.state = match (te, cl) {
            (Some(v), _) => {
                let last = v
                    .rsplit(|&b| b == b',')
                    .next()
                    .map(|c| c.trim_ascii())
                    .unwrap_or_default();
                if last.eq_ignore_ascii_case(b"chunked") {
                    State::Line(Line::ChunkSize)
                } else {
                    State::Off
                }
            }
            (None, Some(n)) if n > 0 => State::Skip {
                left: n,
                then: Line::Head,
            },
            _ => State::Line(Line::Head),
        };
    }
}

/// A client connection whose incoming bytes pass through the framing scanner.
pub struct Sniffed<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> Sniffed<S> {
    /// Wraps `inner`; the service reads the verdicts through the returned handle.
    pub fn new(inner: S) -> (Self, Verdicts) {
        let verdicts = Verdicts::default();
        let s = Sniffed {
            inner,
            scanner: Scanner::new(verdicts.clone()),
        };
        (s, verdicts)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.scanner.feed(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `bytes` in pieces of `step` and returns the verdict slot.
    fn scan(bytes: &[u8], step: usize) -> (u64, State) {
        let v = Verdicts::default();
        let mut s = Scanner::new(v.clone());
        for piece in bytes.chunks(step) {
            s.feed(piece);
        }
        (v.0.load(Ordering::Acquire), s.state)
    }

    fn every_split(bytes: &[u8]) -> Vec<(u64, State)> {
        [1, 2, 3, 7, 64, bytes.len().max(1)]
            .iter()
            .map(|&step| scan(bytes, step))
            .collect()
    }

    #[test]
    fn follows_keep_alive_requests_of_every_framing() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 45\r\n\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\
POST /y HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n\r\n\
1c;ext=1\r\nContent-Length: 3\r\n\r\nabcdefg\r\n0\r\nX-Trailer: 1\r\n\r\n\
\r\nGET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        for (bad, state) in every_split(stream) {
            assert_eq!(bad, 0);
            assert_eq!(state, State::Line(Line::Head));
        }
    }

    #[test]
    fn flags_the_request_that_carries_both_framings() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for (bad, state) in every_split(stream) {
            assert_eq!(bad, 2);
            assert_eq!(state, State::Off);
        }
        let te_first =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        assert_eq!(scan(te_first, 5).0, 1);
    }

    #[test]
    fn heads_with_more_headers_than_the_first_try_holds_are_followed() {
        // 40 headers: past the 32 slots of the first parse, within MAX_HEADERS.
        let mut head = b"POST / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..40 {
            head.extend_from_slice(format!("X-Filler-{i}: {i}\r\n").as_bytes());
        }
        let mut both = head.clone();
        both.extend_from_slice(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(scan(&both, 7).0, 1);
        let mut plain = head;
        plain.extend_from_slice(b"Content-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n");
        let (bad, state) = scan(&plain, 7);
        assert_eq!(bad, 0);
        assert_eq!(state, State::Line(Line::Head));
    }

    #[test]
    fn stops_looking_where_it_cannot_follow() {
        for stream in [
            &b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"G\0T / HTTP/1.1\r\n\r\n",
        ] {
            for (bad, state) in every_split(stream) {
                assert_eq!(bad, 0, "{stream:?}");
                assert_eq!(state, State::Off, "{stream:?}");
            }
        }
    }
}
