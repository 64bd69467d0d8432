//! Group fsync off the writers' path, for the embedded store.
//!
//! A writer's connection runs with `synchronous=NORMAL`: a commit writes its WAL frames and
//! returns without an fsync (SQLite keeps the file consistent on power loss, but the last
//! commits could roll back). The writer then hands what the commit makes visible — receipts,
//! responses, raised heads, the log's size — to [`Durability::after_commit`], and goes on
//! to its next batch at once. A [`Syncer`] thread fsyncs the WAL file; a follow-up runs only
//! after an fsync that *began after its commit returned* has succeeded, and follow-ups run in
//! commit order. So nothing leaves the process before it is on disk, as with
//! `synchronous=FULL`, but the next batch's inserts overlap the previous batch's fsync, and one
//! fsync covers every commit that finished while the previous one was running.
//!
//! WAL recovery keeps a prefix of the log, so a commit that is durable implies every earlier
//! commit of the file is too: derived data written back into the store (subject filters) may
//! be built from commits not yet durable.
//!
//! An fsync that fails is final: writeback errors may have dropped pages, so no later fsync
//! can vouch for them. Every waiting and later follow-up gets the error (the calls answer
//! `UNAVAILABLE`) until the process is restarted and SQLite recovers what is on disk.

use std::{
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
};

use tokio::sync::{mpsc, watch};

/// What a follow-up learns: its commit is durable, or why it cannot be.
pub type Durable = Result<(), Arc<str>>;

type FollowUp = Box<dyn FnOnce(Durable) + Send>;

/// How commits of a writer become durable.
#[derive(Clone)]
pub enum Durability {
    /// The commit itself was durable (PostgreSQL; SQLite with `synchronous=FULL`).
    AtCommit,
    /// The store file's WAL is fsynced by a [`Syncer`] after commits.
    Synced(Syncer, mpsc::UnboundedSender<(u64, FollowUp)>),
}

impl Durability {
    /// Follow-ups of `syncer`'s commits run on their own task, in the order they are given.
    pub fn synced(syncer: Syncer) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, FollowUp)>();
        let s = syncer.clone();
        tokio::spawn(async move {
            while let Some((ticket, f)) = rx.recv().await {
                f(s.durable(ticket).await);
            }
        });
        Self::Synced(syncer, tx)
    }

    /// Call right after a commit returned: `f` runs once the commit is durable (or cannot be),
    /// after the follow-ups of earlier commits. With [`AtCommit`](Self::AtCommit), now.
    pub fn after_commit(&self, f: impl FnOnce(Durable) + Send + 'static) {
        match self {
            Self::AtCommit => f(Ok(())),
            Self::Synced(s, tx) => {
                let ticket = s.committed();
                if let Err(mpsc::error::SendError((_, f))) = tx.send((ticket, Box::new(f))) {
                    f(Err("the store's durability task stopped".into()));
                }
            }
        }
    }

    /// Waits until every commit so far is durable.
    pub async fn sync(&self) -> Durable {
        match self {
            Self::AtCommit => Ok(()),
            Self::Synced(s, _) => s.durable(s.committed()).await,
        }
    }
}

/// The fsync thread of one file. Cheap to clone; the thread ends with the last clone.
#[derive(Clone)]
pub struct Syncer(Arc<Handle>);

struct Handle(Arc<Shared>);

struct Shared {
    /// Tickets handed out so far (one per commit), and whether the owner is gone.
    state: Mutex<(u64, bool)>,
    wake: Condvar,
    /// Every ticket up to `Ok(n)` is durable, or the fsync failed.
    synced: watch::Sender<Result<u64, Arc<str>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.0.wake.notify_one();
    }
}

impl Syncer {
    /// A syncer of the WAL of the SQLite database at `db` (`<db>-wal`). A missing WAL file
    /// holds nothing to sync (SQLite removes it only after folding it into the database).
    pub fn wal(db: &std::path::Path) -> std::io::Result<Self> {
        let wal = PathBuf::from(format!("{}-wal", db.display()));
        let name = format!("fsync {}", wal.display());
        Self::start(name, move || match std::fs::File::open(&wal) {
            Ok(f) => f.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
    }

    /// A syncer calling `sync` on its own thread whenever commits wait for it.
    pub fn start(
        name: String,
        mut sync: impl FnMut() -> std::io::Result<()> + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new((0, false)),
            wake: Condvar::new(),
            synced: watch::channel(Ok(0)).0,
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("civgate-fsync".into())
            .spawn(move || {
                let mut done = 0;
                loop {
                    let target = {
                        let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
                        while st.0 == done && !st.1 {
                            st = s.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                        if st.0 == done {
                            return;
                        }
                        st.0
                    };
                    // Every ticket up to `target` was handed out after its commit returned,
                    // so this fsync began after those commits.
                    match sync() {
                        Ok(()) => {
                            done = target;
                            drop(s.synced.send_replace(Ok(done)));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, what = %name, "fsync failed: commits can no longer be made durable; restart the gateway");
                            drop(
                                s.synced
                                    .send_replace(Err(format!("{name} failed: {e}").into())),
                            );
                            return;
                        }
                    }
                }
            })?;
        Ok(Self(Arc::new(Handle(shared))))
    }

    /// A ticket for a commit that has just returned.
    pub fn committed(&self) -> u64 {
        let s = &self.0.0;
        let ticket = {
            let mut st = s.state.lock().unwrap_or_else(|p| p.into_inner());
            st.0 += 1;
            st.0
        };
        s.wake.notify_one();
        ticket
    }

    /// Waits until `ticket`'s commit is durable.
    pub async fn durable(&self, ticket: u64) -> Durable {
        let mut rx = self.0.0.synced.subscribe();
        let seen = rx
            .wait_for(|s| s.as_ref().map_or(true, |n| *n >= ticket))
            .await
            .map(|s| s.clone());
        match seen {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the fsync thread stopped".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A sync function that blocks until the test lets it through, counting its calls.
    fn gated() -> (
        impl FnMut() -> std::io::Result<()> + Send + 'static,
        std::sync::mpsc::SyncSender<std::io::Result<()>>,
        Arc<AtomicUsize>,
    ) {
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(0);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let f = move || {
            c.fetch_add(1, Ordering::SeqCst);
            rx.recv().unwrap_or(Ok(()))
        };
        (f, tx, calls)
    }

    async fn pending(f: impl Future<Output = Durable>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_commit_is_durable_only_after_an_fsync_that_began_after_it() {
        let (f, release, calls) = gated();
        let s = Syncer::start("test".into(), f).unwrap();
        let first = s.committed();
        // The thread is now inside the fsync covering `first`; a commit returning meanwhile
        // is not covered by it.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let second = s.committed();
        assert!(pending(s.durable(first)).await, "no fsync has finished yet");
        release.send(Ok(())).unwrap();
        s.durable(first).await.unwrap();
        assert!(
            pending(s.durable(second)).await,
            "the fsync that just finished began before the second commit returned"
        );
        release.send(Ok(())).unwrap();
        s.durable(second).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn one_fsync_covers_every_commit_that_waited_for_it() {
        let (f, release, calls) = gated();
        let s = Syncer::start("test".into(), f).unwrap();
        let first = s.committed();
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let later: Vec<u64> = (0..10).map(|_| s.committed()).collect();
        release.send(Ok(())).unwrap();
        s.durable(first).await.unwrap();
        release.send(Ok(())).unwrap();
        for t in later {
            s.durable(t).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "ten commits, one fsync");
    }

    #[tokio::test]
    async fn a_failed_fsync_fails_every_waiting_and_later_commit() {
        let (f, release, calls) = gated();
        let s = Syncer::start("test".into(), f).unwrap();
        let d = Durability::synced(s.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..3 {
            let tx = tx.clone();
            d.after_commit(move |r| {
                let _ = tx.send((i, r));
            });
        }
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        release.send(Err(std::io::Error::other("EIO"))).unwrap();
        for i in 0..3 {
            let (j, r) = rx.recv().await.unwrap();
            assert_eq!(j, i, "follow-ups run in commit order");
            assert!(r.unwrap_err().contains("EIO"));
        }
        let tx2 = tx.clone();
        d.after_commit(move |r| {
            let _ = tx2.send((3, r));
        });
        assert!(rx.recv().await.unwrap().1.is_err(), "the failure is final");
        assert!(d.sync().await.is_err());
    }

    #[tokio::test]
    async fn follow_ups_run_in_commit_order_after_their_fsync() {
        let s = Syncer::start("test".into(), || Ok(())).unwrap();
        let d = Durability::synced(s);
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..1000 {
            let tx = tx.clone();
            d.after_commit(move |r| {
                r.unwrap();
                let _ = tx.send(i);
            });
        }
        for i in 0..1000 {
            assert_eq!(rx.recv().await.unwrap(), i);
        }
        d.sync().await.unwrap();
    }

    #[test]
    fn the_thread_ends_with_the_last_handle() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let s = Syncer::start("test".into(), move || {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        let weak = Arc::downgrade(&s.0.0);
        drop(s);
        for _ in 0..200 {
            if weak.upgrade().is_none() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the fsync thread still holds its state");
    }
}
