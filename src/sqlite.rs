//! SQLite connection settings shared by every embedded store (audit log, journal, reference
//! directory): WAL, synchronous FULL (a commit survives power loss), created if missing.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

/// Options for the database file at `path`; a locked database is waited on for `busy`.
pub fn options(path: &Path, busy: Duration) -> Result<SqliteConnectOptions, sqlx::Error> {
    Ok(
        SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(busy),
    )
}
