//! Fewer, larger socket writes: a connection's writes are held until its
//! flush, and a flush first lets every other ready task run once.
//!
//! An HTTP/2 connection is one task that writes the frames its streams have
//! queued, then flushes. A call that has to wait (on a database, say) is
//! finished by its own task, so under load the connection task is woken,
//! writes one or two replies and flushes, over and over: one `writev` per
//! reply or two, and as many reads and wake-ups on the client's side.
//! Deferring the flush by one turn of the scheduler lets the other calls
//! that are about to finish queue their replies too, and one write carries
//! them all. This is the "flush consolidation" that Netty offers as a
//! handler, and what grpc-go's writer does by writing only when it has
//! nothing left to batch.
//!
//! The delay is one pass over the tasks already ready to run (microseconds),
//! never a timer: an idle server flushes at once. It is taken only while the
//! connection has calls running in tasks of their own ([`CallTasks`]): the
//! calls that finish in the connection's task have queued their replies
//! before it writes, and a self-wake costs a wake-up of the other worker
//! thread (4% of a GetUser call's CPU, 7% of an AddUser's, BENCHMARKS.md).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Most bytes held back before they are written anyway: bounds the memory of
/// a connection, and large writes (listing pages) go out with little delay.
pub const MAX_HELD: usize = 64 * 1024;

/// Whether a connection has calls running in tasks of their own, whose
/// replies a flush waits one turn of the scheduler for. Set by the
/// connection; shared with its [`BatchedWrites`]. Until set, flushes wait.
#[derive(Debug, Clone)]
pub struct CallTasks(Arc<AtomicBool>);

impl CallTasks {
    pub fn set(&self, running: bool) {
        self.0.store(running, Ordering::Relaxed);
    }

    fn running(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for CallTasks {
    fn default() -> Self {
        CallTasks(Arc::new(AtomicBool::new(true)))
    }
}

/// An I/O stream whose writes are batched until a flush, and whose flushes
/// wait for one turn of the scheduler while its connection has call tasks.
#[derive(Debug)]
pub struct BatchedWrites<T> {
    inner: T,
    call_tasks: CallTasks,
    /// Bytes written by the caller and not yet to the socket.
    held: Vec<u8>,
    /// How much of `held` has reached the socket.
    sent: usize,
    /// Whether the flush under way has already given way to other tasks.
    yielded: bool,
}

impl<T> BatchedWrites<T> {
    pub fn new(inner: T) -> Self {
        BatchedWrites {
            inner,
            call_tasks: CallTasks::default(),
            held: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<T> BatchedWrites<T> {
    /// The flag through which the connection says whether it has call
    /// tasks.
    pub fn call_tasks(&self) -> CallTasks {
        self.call_tasks.clone()
    }
}

impl<T: AsyncWrite + Unpin> BatchedWrites<T> {
    /// Makes room for `len` more bytes, sending what is held if they would
    /// not fit. `true`: `len` bytes are too many to hold, write them
    /// directly (nothing is held any more).
    fn poll_make_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.held.len() + len > MAX_HELD {
            ready!(self.poll_send_held(cx))?;
        }
        Poll::Ready(Ok(len >= MAX_HELD))
    }

    /// Writes out everything held.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        // Give back a buffer grown by a burst of large writes.
        if self.held.capacity() > MAX_HELD {
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if ready!(this.poll_make_room(cx, buf.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len: usize = bufs.iter().map(|buf| buf.len()).sum();
        if ready!(this.poll_make_room(cx, len))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            this.held.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.held.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if !this.yielded && this.call_tasks.running() {
            // Waking itself while it runs puts the task at the back of the
            // run queue (tokio treats it as a yield): the tasks already
            // ready run first, and queue their frames with this flush.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_send_held(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_held(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The socket's addresses, for the transport's `ConnectInfo` (and, through
/// tonic's impl for the TLS stream around it, a TLS connection's).
impl<T: Connected> Connected for BatchedWrites<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// What has arrived at the other end so far, without waiting.
    fn arrived(peer: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut buf = vec![0; 4 * MAX_HELD];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(peer).poll_read(&mut cx, &mut read) {
            Poll::Ready(result) => {
                result.unwrap();
                read.filled().to_vec()
            }
            Poll::Pending => Vec::new(),
        }
    }

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_go_out_together() {
        let (ours, mut peer) = duplex(4 * MAX_HELD);
        let mut io = BatchedWrites::new(ours);
        io.write_all(b"one ").await.unwrap();
        io.write_all(b"two").await.unwrap();
        assert!(arrived(&mut peer).is_empty(), "held until the flush");
        io.flush().await.unwrap();
        assert_eq!(arrived(&mut peer), b"one two");
    }

    #[tokio::test]
    async fn a_flush_gives_way_once_then_completes() {
        let (ours, mut peer) = duplex(4 * MAX_HELD);
        let mut io = BatchedWrites::new(ours);
        io.write_all(b"x").await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert!(arrived(&mut peer).is_empty());
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(arrived(&mut peer), b"x");
        // Nothing held: a flush completes at once.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn without_call_tasks_a_flush_does_not_give_way() {
        let (ours, mut peer) = duplex(4 * MAX_HELD);
        let mut io = BatchedWrites::new(ours);
        io.call_tasks().set(false);
        io.write_all(b"x").await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(arrived(&mut peer), b"x");
    }

    #[tokio::test]
    async fn held_bytes_are_bounded() {
        let (ours, mut peer) = duplex(4 * MAX_HELD);
        let mut io = BatchedWrites::new(ours);
        let chunk = vec![7u8; MAX_HELD / 2 + 1];
        io.write_all(&chunk).await.unwrap();
        assert!(arrived(&mut peer).is_empty());
        // A second chunk would pass the bound: the first goes out.
        io.write_all(&chunk).await.unwrap();
        assert_eq!(arrived(&mut peer).len(), chunk.len());
        assert!(io.held.len() <= MAX_HELD);
        // A write as large as the bound is not copied at all.
        io.write_all(&vec![1u8; MAX_HELD]).await.unwrap();
        assert_eq!(arrived(&mut peer).len(), chunk.len() + MAX_HELD);
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_held() {
        let (ours, mut peer) = duplex(4 * MAX_HELD);
        let mut io = BatchedWrites::new(ours);
        io.write_all(b"last words").await.unwrap();
        io.shutdown().await.unwrap();
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last words");
    }
}
