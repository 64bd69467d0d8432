//! SQLite connection settings shared by every embedded store (audit log, journal, reference
//! directory): WAL, synchronous FULL (a commit survives power loss), created if missing.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, bail};
use sqlx::{
    Connection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous},
};

/// The embedded store's file in a data directory. The journal and the audit log share it, so a
/// publish's event and its audit record commit in one transaction (one WAL append, one fsync).
pub fn store_path(dir: &Path) -> PathBuf {
    dir.join("civgate.sqlite")
}

/// Creates the data directory owner-only (0700) if missing and makes the store file and its
/// WAL owner-only (0600), whatever the umask: they hold event payloads with names and IDs.
/// An existing directory others can read is left as the operator made it, with a warning.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    } else if let Ok(m) = std::fs::metadata(dir)
        && m.permissions().mode() & 0o007 != 0
    {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", m.permissions().mode() & 0o777),
            "the data directory is open to other users; chmod 700 it");
    }
    let store = store_path(dir);
    // SQLite gives its -wal and -shm files the main file's mode: create it owner-only first.
    // Never open a store file that exists: SQLite's locks are POSIX record locks, which belong
    // to the process, and closing any descriptor of the file drops all of them — the audit
    // log's open connections would then hold no lock, and another process's SQLite closing
    // the file (an operator's `sqlite3`) would take itself for the last user, checkpoint and
    // delete the WAL under them: every commit after that is lost at restart.
    if !store.exists() {
        match std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&store)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", store.display())),
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let f = PathBuf::from(format!("{}{suffix}", store.display()));
        if f.exists() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", f.display()))?;
        }
    }
    Ok(())
}

/// The exclusive lock on a data directory, held for as long as the process that took it runs
/// (the kernel drops it when the process ends, kill -9 included). Two gateways writing one
/// store file would each assign the same sequences and audit indexes.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] std::fs::File);

/// Takes `dir/civgate.lock`, or says which directory is in use.
pub fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    use std::os::unix::fs::OpenOptionsExt;
    if !dir.exists() {
        prepare_dir(dir)?;
    }
    let path = dir.join("civgate.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "data directory {} is in use by another civgate process (it holds {}): stop that one, or give this one another --data-dir",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Earlier releases kept the audit log in `audit.sqlite` and the journal in `journal.sqlite`.
/// If the store file does not exist yet, the audit file becomes it (its WAL folded in first,
/// then renamed: the audit log is the larger of the two and is never copied). The journal's
/// rows are copied in by the journal when it opens. Safe to call again after a crash.
pub async fn adopt_legacy_audit(dir: &Path) -> anyhow::Result<()> {
    let store = store_path(dir);
    let old = dir.join("audit.sqlite");
    if store.exists() || !old.exists() {
        return Ok(());
    }
    settle(&old).await?;
    std::fs::rename(&old, &store)
        .with_context(|| format!("renaming {} to {}", old.display(), store.display()))?;
    tracing::info!(from = %old.display(), to = %store.display(), "audit log file adopted as the store file");
    Ok(())
}

/// Folds a database's WAL into its main file and checks that nothing is left beside it, so the
/// main file alone holds every committed transaction (and can be renamed or attached).
pub async fn settle(path: &Path) -> anyhow::Result<()> {
    let mut conn = sqlx::SqliteConnection::connect_with(&options(path, Duration::from_secs(5))?)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    sqlx::raw_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .with_context(|| format!("checkpointing {}", path.display()))?;
    conn.close().await?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::metadata(&side) {
            Ok(m) if suffix == "-wal" && m.len() > 0 => {
                bail!(
                    "{} still holds transactions (is another process using it?)",
                    side.display()
                )
            }
            Ok(_) => std::fs::remove_file(&side)
                .with_context(|| format!("removing {}", side.display()))?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// Options for the database file at `path`; a locked database is waited on for `busy`.
pub fn options(path: &Path, busy: Duration) -> Result<SqliteConnectOptions, sqlx::Error> {
    Ok(
        SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(busy)
            // Statement journals and temporary b-trees stay in memory: a multi-row INSERT in a
            // group commit otherwise creates, writes and unlinks a temporary file.
            .pragma("temp_store", "memory")
            // 16 MiB of page cache per connection (default 2 MiB): keeps the interior pages of
            // the indexes that every commit touches.
            .pragma("cache_size", "-16384")
            // Rows a query may queue on the way from sqlx's worker thread before that thread
            // waits (default 50). With room for a whole multi-row read, the worker runs the
            // query through instead of handing over one row per wake-up once the queue is
            // full. (Measured on catch-up while it still read events row by row: 1.15x; the
            // journal now reads a page as one row, `Journal::read`.)
            .row_buffer_size(1024),
    )
}

/// A write transaction sent to SQLite as one multi-statement query — `BEGIN IMMEDIATE`, the
/// statements, `COMMIT` — which sqlx's worker thread runs in one go, binding the `?`
/// parameters in order across the statements.
///
/// Why: every statement sent separately is a round trip to that thread (a channel send, a
/// wake-up, a reply). On a busy 2-core machine each round trip cost ~120 µs of scheduling, and
/// a group commit of six statements spent most of its time waiting for them.
/// Most rows one [`Batch::insert_rows`] statement carries (a power of two; 256 rows of 8
/// columns stay far below SQLite's 32,766 parameters).
pub(crate) const ROWS_PER_INSERT: usize = 256;

#[derive(Default)]
pub struct Batch {
    sql: String,
    args: sqlx::sqlite::SqliteArguments,
    statements: usize,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one statement (without its `;`).
    pub fn statement(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self.sql.push_str(";\n");
        self.statements += 1;
        self
    }

    /// Appends the `INSERT OR ROLLBACK` of `rows`, `width` columns each, into `into` (the table
    /// and its columns: `t (a, b)`), as `INSERT OR ROLLBACK INTO into SELECT * FROM (VALUES …)
    /// WHERE column1 IS NOT NULL`, and binds each row with `bind`. The VALUES list is padded
    /// with rows of NULLs (which the WHERE drops) to a power of two, at most
    /// [`ROWS_PER_INSERT`] rows per statement. A batch's text therefore takes few distinct
    /// forms, and SQLite prepares each form once (`commit` keeps them) instead of parsing every
    /// batch anew — on a busy writer that parse was a fifth of SQLite's time. The first column
    /// must never be NULL in a real row.
    ///
    /// `OR ROLLBACK`: a batch is all or nothing anyway (`commit`), so a failing row may as well
    /// end the transaction at once. With the default `OR ABORT`, SQLite keeps a statement
    /// journal for every multi-row insert inside a transaction — a copy of each page before the
    /// statement changes it, to undo just that statement — which cost the journal's writer
    /// ~6% of its time.
    pub fn insert_rows<T>(
        &mut self,
        into: &str,
        width: usize,
        rows: &[T],
        mut bind: impl FnMut(&mut Self, &T) -> Result<(), sqlx::Error>,
    ) -> Result<&mut Self, sqlx::Error> {
        let row = format!("({})", vec!["?"; width].join(", "));
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let padded = chunk.len().next_power_of_two();
            let mut sql = String::with_capacity(into.len() + 96 + padded * (row.len() + 1));
            sql.push_str("INSERT OR ROLLBACK INTO ");
            sql.push_str(into);
            sql.push_str(" SELECT * FROM (VALUES ");
            for i in 0..padded {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&row);
            }
            sql.push_str(") WHERE column1 IS NOT NULL");
            self.statement(&sql);
            for r in chunk {
                bind(self, r)?;
            }
            for _ in 0..(padded - chunk.len()) * width {
                self.bind(Option::<i64>::None)?;
            }
        }
        Ok(self)
    }

    /// Binds the next `?` parameter.
    pub fn bind<'t, T>(&mut self, value: T) -> Result<&mut Self, sqlx::Error>
    where
        T: sqlx::Encode<'t, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
    {
        use sqlx::Arguments;
        self.args.add(value).map_err(sqlx::Error::Encode)?;
        Ok(self)
    }

    /// Runs the statements in one transaction, durable when this returns `Ok`. On an error
    /// nothing of the batch stays: the transaction is rolled back.
    pub async fn commit(self, conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
        if self.statements == 0 {
            return Ok(());
        }
        let sql = format!("BEGIN IMMEDIATE;\n{}COMMIT;", self.sql);
        // Built by our own code from constant statement texts and `?` placeholders. Kept in
        // the connection's statement cache (least recently used out): the texts take few forms
        // (see `insert_rows`), so most batches run statements SQLite has already prepared.
        let result = sqlx::query_with(sqlx::AssertSqlSafe(sql), self.args)
            .persistent(true)
            .execute(&mut *conn)
            .await;
        if result.is_err() {
            // The failing statement stopped the script before COMMIT (or COMMIT itself failed):
            // end the transaction so the connection is clean for the next batch. "No
            // transaction is active" is fine too.
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        }
        result.map(|_| ())
    }
}

/// `sql` with its numbered placeholders (`$1`, `$2`, … each used once, in order) turned into
/// `?`: numbered placeholders in a multi-statement [`Batch`] would all count from its first
/// argument.
pub fn anonymous(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `e` is a UNIQUE / PRIMARY KEY constraint violation.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_is_locked_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path()).unwrap();
        let err = lock_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another civgate process"), "{err}");
        drop(held);
        lock_dir(dir.path()).unwrap();
    }
    use sqlx::Connection;

    #[test]
    fn numbered_placeholders_become_anonymous() {
        assert_eq!(
            anonymous("INSERT INTO t VALUES ($1, $2), ($3, $10) -- $x"),
            "INSERT INTO t VALUES (?, ?), (?, ?) -- $x"
        );
    }

    /// A new database in `dir` holding the table `schema` creates.
    async fn table(dir: &Path, schema: &'static str) -> sqlx::SqliteConnection {
        let mut conn = sqlx::SqliteConnection::connect_with(
            &options(&dir.join("t.sqlite"), Duration::from_secs(1)).expect("options"),
        )
        .await
        .expect("open");
        sqlx::raw_sql(schema)
            .execute(&mut conn)
            .await
            .expect("schema");
        conn
    }

    /// Padded inserts store exactly the rows given — none of the NULL padding — for every size
    /// around the powers of two and beyond one statement's rows; the same forms run again
    /// from the statement cache, and a cached batch that fails still leaves nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn padded_inserts_store_exactly_the_rows_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = table(
            dir.path(),
            "CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB, w TEXT NOT NULL)",
        )
        .await;
        let (mut next, mut batches) = (0i64, 0i64);
        for round in 0..2 {
            for n in [0usize, 1, 2, 3, 4, 5, 255, 256, 257, 300] {
                let rows: Vec<i64> = (next..next + n as i64).collect();
                next += n as i64;
                let mut b = Batch::new();
                b.insert_rows("t (k, v, w)", 3, &rows, |b, k| {
                    // A NULL in a later column of a real row is kept.
                    let v = (k % 2 == 0).then(|| k.to_le_bytes().to_vec());
                    b.bind(*k)?.bind(v)?.bind(format!("r{round}"))?;
                    Ok(())
                })
                .expect("bind");
                // Other statements of the batch bind after the padding, in order.
                b.statement("INSERT INTO t (k, v, w) VALUES (-1 - ?, NULL, 'marker')");
                b.bind(batches).expect("bind");
                batches += 1;
                b.commit(&mut conn).await.expect("commit");
            }
        }
        let (count, sum): (i64, i64) =
            sqlx::query_as("SELECT count(*), coalesce(sum(k), 0) FROM t WHERE k >= 0")
                .fetch_one(&mut conn)
                .await
                .expect("count");
        assert_eq!((count, sum), (next, next * (next - 1) / 2));
        let nulls: i64 = sqlx::query_scalar("SELECT count(*) FROM t WHERE k >= 0 AND v IS NULL")
            .fetch_one(&mut conn)
            .await
            .expect("nulls");
        assert_eq!(nulls, next / 2);
        let markers: i64 = sqlx::query_scalar("SELECT count(*) FROM t WHERE w = 'marker'")
            .fetch_one(&mut conn)
            .await
            .expect("markers");
        assert_eq!(markers, batches);

        // A cached form whose insert collides: nothing of the batch stays, and the next runs.
        let mut bad = Batch::new();
        bad.insert_rows("t (k, v, w)", 3, &[next, 0], |b, k| {
            b.bind(*k)?.bind(Option::<Vec<u8>>::None)?.bind("bad")?;
            Ok(())
        })
        .expect("bind");
        let e = bad.commit(&mut conn).await.expect_err("duplicate key");
        assert!(is_unique_violation(&e), "{e}");
        let mut good = Batch::new();
        good.insert_rows("t (k, v, w)", 3, &[next, next + 1], |b, k| {
            b.bind(*k)?.bind(Option::<Vec<u8>>::None)?.bind("good")?;
            Ok(())
        })
        .expect("bind");
        good.commit(&mut conn)
            .await
            .expect("commit after a failure");
        let bad_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM t WHERE w = 'bad'")
            .fetch_one(&mut conn)
            .await
            .expect("bad");
        assert_eq!(bad_rows, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_one_transaction_and_a_failure_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = table(
            dir.path(),
            "CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB NOT NULL)",
        )
        .await;

        let mut ok = Batch::new();
        ok.statement("INSERT INTO t (k, v) VALUES (?, ?), (?, ?)");
        ok.bind("a").unwrap().bind(&b"1"[..]).unwrap();
        ok.bind("b").unwrap().bind(&b"2"[..]).unwrap();
        ok.statement("INSERT INTO t (k, v) VALUES (?, ?)");
        ok.bind("c").unwrap().bind(&b"3"[..]).unwrap();
        ok.commit(&mut conn).await.expect("commit");

        // The second statement collides: the first one's row must not stay either.
        let mut bad = Batch::new();
        bad.statement("INSERT INTO t (k, v) VALUES (?, ?)");
        bad.bind("d").unwrap().bind(&b"4"[..]).unwrap();
        bad.statement("INSERT INTO t (k, v) VALUES (?, ?)");
        bad.bind("a").unwrap().bind(&b"5"[..]).unwrap();
        let e = bad.commit(&mut conn).await.expect_err("duplicate key");
        assert!(is_unique_violation(&e), "{e}");

        let keys: Vec<String> = sqlx::query_scalar("SELECT k FROM t ORDER BY k")
            .fetch_all(&mut conn)
            .await
            .expect("read");
        assert_eq!(keys, ["a", "b", "c"]);
        // And the connection takes the next batch.
        let mut next = Batch::new();
        next.statement("INSERT INTO t (k, v) VALUES (?, ?)");
        next.bind("d").unwrap().bind(&b"4"[..]).unwrap();
        next.commit(&mut conn)
            .await
            .expect("commit after a failure");
    }
}
