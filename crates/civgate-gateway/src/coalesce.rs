//! Write coalescing for the HTTP/2 connections (clients → gateway, gateway → directory).
//!
//! h2 flushes its connection every time it is polled, and the connection task is polled after
//! every stream that answers: under load, each ~500-byte answer (and each forwarded look-up)
//! left in its own TLS record and its own `writev` — 1.9 system calls per call measured at
//! 12,000 calls/s, each one a trip through the loopback TCP stack that the receiver pays for too.
//!
//! [`Coalesced`] sits between h2 and TLS. Writes go to a plaintext buffer. A flush with bytes
//! pending does not write at once: it asks the tokio worker to wake the connection when it has
//! run the tasks already waiting (the mechanism behind `tokio::task::yield_now`), and reports
//! success. h2 goes on queuing frames from the other streams that answer meanwhile. When the
//! wake-up comes, h2 polls the connection again and its next flush writes everything in a few
//! large TLS records and one system call. The buffer is also written when it reaches
//! [`HIGH_WATER`], on shutdown, and on a read after the wake-up.
//!
//! The deferral is bounded: a tokio worker wakes deferred tasks before it parks and at every
//! maintenance tick (every 61 tasks), so bytes wait at most one round of already-runnable tasks.
//! Outside a tokio runtime the wake-up is immediate.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker, ready},
};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Pending bytes beyond which a write first drains the buffer (back-pressure).
pub(crate) const HIGH_WATER: usize = 64 * 1024;

/// Buffer capacity a connection keeps after a drain; a burst's larger buffer is given back, so
/// thousands of mostly idle connections do not each hold up to 64 KiB.
pub(crate) const KEEP_CAPACITY: usize = 16 * 1024;

pin_project! {
    /// An I/O stream whose writes are gathered until the connection's tasks have had a turn.
    pub(crate) struct Coalesced<T> {
        #[pin]
        io: T,
        buf: Vec<u8>,
        // Bytes of `buf` already written.
        pos: usize,
        // Set while a deferred flush is scheduled.
        deferred: Option<Arc<Deferral>>,
    }
}

/// A wake-up requested from the scheduler for a deferred flush.
#[derive(Default)]
struct Deferral {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Wake for Deferral {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        let waker = self.waker.lock().map(|mut w| w.take()).unwrap_or(None);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Deferral {
    /// Asks the current tokio worker to wake `cx`'s task once the tasks already runnable have
    /// run (immediately when not on a tokio worker).
    fn schedule(cx: &Context<'_>) -> Arc<Self> {
        let d = Arc::new(Self::default());
        d.remember(cx);
        let waker = Waker::from(d.clone());
        let mut inner = Context::from_waker(&waker);
        // `yield_now` registers the waker it is polled with in the worker's deferred list on
        // its first poll; the future itself is not needed afterwards.
        let yielded = std::pin::pin!(tokio::task::yield_now());
        let _ = yielded.poll(&mut inner);
        d
    }

    fn remember(&self, cx: &Context<'_>) {
        if let Ok(mut w) = self.waker.lock() {
            match w.as_ref() {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

impl<T> Coalesced<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            pos: 0,
            deferred: None,
        }
    }

    #[cfg(test)]
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Bytes accepted and not yet handed to the inner stream.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl<T: AsyncWrite> Coalesced<T> {
    /// Writes the whole buffer to the inner stream.
    fn poll_drain(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        while *this.pos < this.buf.len() {
            let n = ready!(this.io.as_mut().poll_write(cx, &this.buf[*this.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *this.pos += n;
        }
        this.buf.clear();
        this.buf.shrink_to(KEEP_CAPACITY);
        *this.pos = 0;
        *this.deferred = None;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A deferred flush whose turn has come is written even if h2 only reads this time.
        if self.pending() > 0
            && self.deferred.as_ref().is_some_and(|d| d.fired())
            && let Poll::Ready(Err(e)) = self.as_mut().poll_drain(cx)
        {
            return Poll::Ready(Err(e));
        }
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending() >= HIGH_WATER {
            ready!(self.as_mut().poll_drain(cx))?;
        }
        let n = buf.len().min(HIGH_WATER);
        self.project().buf.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.pending() >= HIGH_WATER {
            ready!(self.as_mut().poll_drain(cx))?;
        }
        let this = self.project();
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(HIGH_WATER - n);
            this.buf.extend_from_slice(&b[..take]);
            n += take;
            if n == HIGH_WATER {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending() > 0 {
            let due = match &self.deferred {
                None => {
                    let d = Deferral::schedule(cx);
                    let fired = d.fired();
                    *self.as_mut().project().deferred = Some(d);
                    fired
                }
                Some(d) => {
                    d.remember(cx);
                    d.fired()
                }
            };
            if !due {
                // The deferral wakes this task; h2 flushes again when polled.
                return Poll::Ready(Ok(()));
            }
            ready!(self.as_mut().poll_drain(cx))?;
        }
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_drain(cx))?;
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An inner stream that counts the writes that reach it.
    struct Counting {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Counting {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn flushes_in_one_turn_are_written_once_after_the_turn() {
        // On a worker thread: `block_on`'s own thread has no deferred list.
        tokio::spawn(flushes_in_one_turn()).await.unwrap();
    }

    async fn flushes_in_one_turn() {
        let mut c = Coalesced::new(Counting {
            writes: 0,
            bytes: Vec::new(),
        });
        for i in 0..10u8 {
            c.write_all(&[i; 100]).await.unwrap();
            // Reports success at once, and writes nothing yet.
            c.flush().await.unwrap();
        }
        assert_eq!(c.get_ref().writes, 0);
        assert_eq!(c.pending(), 1_000);
        // The deferral fires once this task yields; the next flush writes everything at once.
        let d = c.deferred.clone().unwrap();
        while !d.fired() {
            tokio::task::yield_now().await;
        }
        c.flush().await.unwrap();
        assert_eq!(c.get_ref().writes, 1);
        assert_eq!(c.pending(), 0);
        let expected: Vec<u8> = (0..10u8).flat_map(|i| [i; 100]).collect();
        assert_eq!(c.get_ref().bytes, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_deferral_wakes_the_flushing_task() {
        tokio::spawn(deferral_wakes()).await.unwrap();
    }

    async fn deferral_wakes() {
        // A task that flushes, then waits for nothing but the deferral's wake-up.
        let mut c = Coalesced::new(Counting {
            writes: 0,
            bytes: Vec::new(),
        });
        c.write_all(b"hello").await.unwrap();
        c.flush().await.unwrap();
        std::future::poll_fn(|cx| {
            let _ = Pin::new(&mut c).poll_flush(cx);
            if c.pending() == 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        assert_eq!(c.get_ref().bytes, b"hello");
    }

    #[tokio::test]
    async fn shutdown_and_high_water_write_at_once() {
        let mut c = Coalesced::new(Counting {
            writes: 0,
            bytes: Vec::new(),
        });
        c.write_all(&vec![7u8; HIGH_WATER + 10]).await.unwrap();
        // The second chunk found the buffer full and drained it first.
        assert_eq!(c.get_ref().writes, 1);
        c.shutdown().await.unwrap();
        assert_eq!(c.pending(), 0);
        assert_eq!(c.get_ref().bytes.len(), HIGH_WATER + 10);
        // The burst's buffer is not kept.
        assert!(c.buf.capacity() <= KEEP_CAPACITY);
        let mut b = [0u8; 4];
        assert_eq!(c.read(&mut b).await.unwrap(), 0);
    }

    #[test]
    fn outside_a_runtime_the_flush_is_immediate() {
        let mut c = Coalesced::new(Counting {
            writes: 0,
            bytes: Vec::new(),
        });
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(
            Pin::new(&mut c).poll_write(&mut cx, b"abc"),
            Poll::Ready(Ok(3))
        ));
        assert!(matches!(
            Pin::new(&mut c).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(c.get_ref().writes, 1);
    }
}
