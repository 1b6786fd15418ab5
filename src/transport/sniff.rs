//! Telling HTTP/2 from HTTP/1.1 on a plaintext connection by its first
//! bytes, for the port that serves gRPC and the playground page.
//!
//! An HTTP/2 client with prior knowledge (every gRPC client in plaintext)
//! opens with the 24-byte preface `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`; an
//! HTTP/1.1 request never does (`GET /`, `POST /` differ within two bytes).
//! [`sniff`] reads only until the bytes read so far stop matching the
//! preface, or match it whole, and hands them back in a [`Prefixed`]
//! stream, which replays them before reading the socket again: h2 and
//! hyper then read the connection from its first byte.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// What every HTTP/2 connection opens with (RFC 9113, section 3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection's first bytes show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The HTTP/2 preface: gRPC.
    Http2,
    /// Anything else, taken for HTTP/1.1 (the playground).
    Http1,
}

/// Reads the start of `io` until it shows its protocol. Fails when the
/// connection ends (or fails) first. The caller bounds the wait (the
/// handshake timeout).
pub async fn sniff<IO: AsyncRead + Unpin>(mut io: IO) -> io::Result<(Protocol, Prefixed<IO>)> {
    let mut read = [0; HTTP2_PREFACE.len()];
    let mut len = 0;
    let protocol = loop {
        let n = io.read(&mut read[len..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
        if read[..len] != HTTP2_PREFACE[..len] {
            break Protocol::Http1;
        }
        if len == HTTP2_PREFACE.len() {
            break Protocol::Http2;
        }
    };
    let prefix = Prefix {
        bytes: read,
        at: 0,
        len,
    };
    Ok((
        protocol,
        Prefixed {
            prefix: Some(prefix),
            inner: io,
        },
    ))
}

/// The bytes [`sniff`] read, still to be replayed.
#[derive(Debug)]
struct Prefix {
    bytes: [u8; HTTP2_PREFACE.len()],
    at: usize,
    len: usize,
}

/// An I/O stream that first reads back the bytes [`sniff`] took from it.
/// Once they are read it costs one branch per read (the prefix is gone);
/// writes go straight through, vectored writes included.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: Option<Prefix>,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(prefix) = &mut this.prefix {
            let n = buf.remaining().min(prefix.len - prefix.at);
            buf.put_slice(&prefix.bytes[prefix.at..prefix.at + n]);
            prefix.at += n;
            if prefix.at == prefix.len {
                this.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Sniffs what `chunks` send, written one chunk at a time (as a slow
    /// client's packets arrive); returns the protocol and every byte the
    /// stream then reads.
    async fn sniffed(chunks: &[&[u8]]) -> io::Result<(Protocol, Vec<u8>)> {
        let (mut client, server) = tokio::io::duplex(1024);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let (protocol, mut io) = sniff(server).await?;
        writer.await.unwrap();
        let mut read = Vec::new();
        io.read_to_end(&mut read).await?;
        Ok((protocol, read))
    }

    #[tokio::test]
    async fn the_preface_is_http2_and_is_replayed_whole() {
        let frames = b"\0\0\0\x04\0\0\0\0\0";
        let whole = [&HTTP2_PREFACE[..], frames].concat();
        assert_eq!(
            sniffed(&[&whole]).await.unwrap(),
            (Protocol::Http2, whole.clone())
        );
        // Byte by byte, as a client may send it.
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(sniffed(&bytes).await.unwrap(), (Protocol::Http2, whole));
    }

    #[tokio::test]
    async fn an_http1_request_is_told_apart_at_its_first_differing_byte() {
        for request in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\n\r\n",
        ] {
            let (protocol, read) = sniffed(&[&request[..1], &request[1..]]).await.unwrap();
            assert_eq!((protocol, read.as_slice()), (Protocol::Http1, request));
        }
        // "PRI * HTTP/1.1" shares the preface's first 11 bytes.
        let request = b"PRI * HTTP/1.1\r\n\r\n";
        assert_eq!(
            sniffed(&[request]).await.unwrap(),
            (Protocol::Http1, request.to_vec())
        );
    }

    #[tokio::test]
    async fn a_connection_that_ends_before_showing_its_protocol_fails() {
        let err = sniffed(&[b"PRI * HT"]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            sniffed(&[]).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn a_small_read_buffer_takes_the_prefix_in_pieces() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let (_, mut io) = sniff(server).await.unwrap();
        let mut read = Vec::new();
        let mut two = [0; 2];
        loop {
            let n = io.read(&mut two).await.unwrap();
            if n == 0 {
                break;
            }
            read.extend_from_slice(&two[..n]);
        }
        assert_eq!(read, b"GET / HTTP/1.1\r\n");
    }
}
