//! The reference directory's embedded store (SQLite through sqlx): the synthetic population,
//! loaded once per (seed, size) and reused across restarts.

use std::{path::Path, time::Instant};

use anyhow::{Context, Result};
use sqlx::{
    Row, SqlitePool,
    sqlite::{SqlitePoolOptions, SqliteRow},
};

use crate::{
    domain::{PersonalId, Sex, fold, format_date, parse_date},
    synth::{CitizenRecord, MaritalStatus, Population},
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS citizens (
    personal_id TEXT PRIMARY KEY,
    full_name TEXT NOT NULL,
    name_folded TEXT NOT NULL,
    date_of_birth TEXT NOT NULL,
    sex INTEGER NOT NULL,
    marital_status INTEGER NOT NULL,
    place_of_birth TEXT NOT NULL,
    hometown TEXT NOT NULL,
    ethnicity TEXT NOT NULL,
    religion TEXT NOT NULL,
    nationality TEXT NOT NULL,
    blood_type TEXT NOT NULL,
    father_id TEXT,
    mother_id TEXT,
    spouse_id TEXT,
    perm_province TEXT NOT NULL,
    perm_address TEXT NOT NULL,
    cur_province TEXT NOT NULL,
    cur_address TEXT NOT NULL,
    date_of_death TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS citizens_search ON citizens (name_folded, date_of_birth);
-- Numbers cancelled and re-issued (Decree 70/2024): the old number, the new one.
CREATE TABLE IF NOT EXISTS reissued (old_id TEXT PRIMARY KEY, new_id TEXT NOT NULL) WITHOUT ROWID;
";

const COLUMNS: &str = "personal_id, full_name, name_folded, date_of_birth, sex, marital_status, \
    place_of_birth, hometown, ethnicity, religion, nationality, blood_type, father_id, mother_id, \
    spouse_id, perm_province, perm_address, cur_province, cur_address, date_of_death";
const NCOLS: usize = 20;

#[derive(Clone)]
pub struct DirectoryStore {
    pool: SqlitePool,
}

impl DirectoryStore {
    /// Opens (creating if needed) `dir/directory.sqlite`.
    pub async fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("directory.sqlite");
        let opts = crate::sqlite::options(&path, std::time::Duration::from_secs(5))?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Ensures the store holds exactly the population (seed, n); returns whether it loaded.
    pub(crate) async fn ensure_population(&self, seed: u64, n: usize) -> Result<bool> {
        // The generator's version: a store loaded by an earlier generator is loaded again.
        let want = format!("seed={seed} citizens={n} generator=2");
        let have: Option<String> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'population'")
                .fetch_optional(&self.pool)
                .await?;
        if have.as_deref() == Some(want.as_str()) {
            return Ok(false);
        }
        let started = Instant::now();
        let mut conn = self.pool.acquire().await?;
        // Bulk load: a crash mid-load leaves no 'population' marker, so it reloads next time.
        sqlx::raw_sql("PRAGMA synchronous = OFF; DELETE FROM meta; DELETE FROM citizens; DELETE FROM reissued;")
            .execute(&mut *conn)
            .await?;
        const ROWS: usize = 500;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut batch: Vec<CitizenRecord> = Vec::with_capacity(ROWS);
        let mut loaded = 0usize;
        for r in Population::new(seed, n) {
            batch.push(r);
            if batch.len() == ROWS {
                insert(&mut tx, &batch).await?;
                loaded += batch.len();
                batch.clear();
                if loaded.is_multiple_of(200_000) {
                    tx.commit().await?;
                    tx = sqlx::Connection::begin(&mut *conn).await?;
                    tracing::info!(loaded, "loading synthetic population");
                }
            }
        }
        if !batch.is_empty() {
            insert(&mut tx, &batch).await?;
        }
        sqlx::query("INSERT INTO meta (key, value) VALUES ('population', ?)")
            .bind(&want)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        sqlx::raw_sql("PRAGMA synchronous = FULL; ANALYZE;")
            .execute(&mut *conn)
            .await?;
        tracing::info!(
            citizens = n,
            seed,
            ms = started.elapsed().as_millis() as u64,
            "synthetic population loaded"
        );
        Ok(true)
    }

    /// Records for the given IDs (absent IDs are skipped).
    pub(crate) async fn get_many(&self, ids: &[PersonalId]) -> Result<Vec<CitizenRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; ids.len()].join(",");
        let sql = format!("SELECT {COLUMNS} FROM citizens WHERE personal_id IN ({placeholders})");
        // Built only from constants and `?` placeholders.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in ids {
            q = q.bind(id.as_str());
        }
        q.fetch_all(&self.pool)
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Citizens by folded name and date of birth, optionally province of registration.
    pub async fn search(
        &self,
        folded_name: &str,
        date_of_birth: &str,
        province: Option<&str>,
        limit: u32,
    ) -> Result<Vec<CitizenRecord>> {
        let mut sql =
            format!("SELECT {COLUMNS} FROM citizens WHERE name_folded = ? AND date_of_birth = ?");
        if province.is_some() {
            sql.push_str(" AND substr(personal_id, 1, 3) = ?");
        }
        sql.push_str(" ORDER BY personal_id LIMIT ?");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(fold(folded_name))
            .bind(date_of_birth);
        if let Some(p) = province {
            q = q.bind(p);
        }
        q.bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Inserts or replaces one citizen (used when the directory applies events).
    pub(crate) async fn upsert(&self, r: &CitizenRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM citizens WHERE personal_id = ?")
            .bind(r.personal_id.as_str())
            .execute(&mut *tx)
            .await?;
        insert(&mut tx, std::slice::from_ref(r)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Cancels `old` and gives its citizen the number `new.personal_id` (with `new`'s data),
    /// in one transaction: the record moves, the family's references follow it, and the old
    /// number maps to the new one.
    pub(crate) async fn reissue(&self, old: &PersonalId, new: &CitizenRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM citizens WHERE personal_id = ?1",
            "UPDATE citizens SET father_id = ?2 WHERE father_id = ?1",
            "UPDATE citizens SET mother_id = ?2 WHERE mother_id = ?1",
            "UPDATE citizens SET spouse_id = ?2 WHERE spouse_id = ?1",
            "INSERT INTO reissued (old_id, new_id) VALUES (?1, ?2)",
        ] {
            sqlx::query(sql)
                .bind(old.as_str())
                .bind(new.personal_id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        insert(&mut tx, std::slice::from_ref(new)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The number `old` was re-issued as, if it was.
    pub(crate) async fn reissued_as(&self, old: &PersonalId) -> Result<Option<PersonalId>> {
        let new: Option<String> =
            sqlx::query_scalar("SELECT new_id FROM reissued WHERE old_id = ?")
                .bind(old.as_str())
                .fetch_optional(&self.pool)
                .await?;
        new.map(|s| PersonalId::parse(&s).map_err(|e| anyhow::anyhow!("reissued {s}: {e}")))
            .transpose()
    }

    pub async fn count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM citizens")
            .fetch_one(&self.pool)
            .await?)
    }
}

async fn insert(tx: &mut sqlx::SqliteConnection, rows: &[CitizenRecord]) -> Result<()> {
    let one = format!("({})", vec!["?"; NCOLS].join(","));
    let sql = format!(
        "INSERT INTO citizens ({COLUMNS}) VALUES {}",
        vec![one.as_str(); rows.len()].join(",")
    );
    // Built only from constants and `?` placeholders.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for r in rows {
        q = q
            .bind(r.personal_id.as_str())
            .bind(&r.full_name)
            .bind(fold(&r.full_name))
            .bind(format_date(r.date_of_birth))
            .bind(sex_code(r.sex))
            .bind(marital_code(r.marital_status))
            .bind(&r.place_of_birth)
            .bind(&r.hometown)
            .bind(&r.ethnicity)
            .bind(&r.religion)
            .bind(&r.nationality)
            .bind(&r.blood_type)
            .bind(r.father.as_ref().map(|i| i.as_str().to_owned()))
            .bind(r.mother.as_ref().map(|i| i.as_str().to_owned()))
            .bind(r.spouse.as_ref().map(|i| i.as_str().to_owned()))
            .bind(&r.permanent_province)
            .bind(&r.permanent_address)
            .bind(&r.current_province)
            .bind(&r.current_address)
            .bind(r.date_of_death.map(format_date));
    }
    q.execute(&mut *tx).await?;
    Ok(())
}

fn sex_code(s: Sex) -> i64 {
    match s {
        Sex::Male => 1,
        Sex::Female => 2,
    }
}

fn marital_code(m: MaritalStatus) -> i64 {
    match m {
        MaritalStatus::Single => 1,
        MaritalStatus::Married => 2,
        MaritalStatus::Divorced => 3,
        MaritalStatus::Widowed => 4,
    }
}

fn from_row(row: &SqliteRow) -> Result<CitizenRecord> {
    let id = |col: &str| -> Result<Option<PersonalId>> {
        let v: Option<String> = row.try_get(col)?;
        v.map(|s| PersonalId::parse(&s).map_err(|e| anyhow::anyhow!("corrupt {col} {s:?}: {e}")))
            .transpose()
    };
    let date = |col: &str| -> Result<Option<time::Date>> {
        let v: Option<String> = row.try_get(col)?;
        v.map(|s| parse_date(&s).map_err(|e| anyhow::anyhow!("corrupt {col}: {e}")))
            .transpose()
    };
    Ok(CitizenRecord {
        personal_id: id("personal_id")?.context("personal_id is null")?,
        full_name: row.try_get("full_name")?,
        date_of_birth: date("date_of_birth")?.context("date_of_birth is null")?,
        sex: if row.try_get::<i64, _>("sex")? == 2 {
            Sex::Female
        } else {
            Sex::Male
        },
        marital_status: match row.try_get::<i64, _>("marital_status")? {
            2 => MaritalStatus::Married,
            3 => MaritalStatus::Divorced,
            4 => MaritalStatus::Widowed,
            _ => MaritalStatus::Single,
        },
        place_of_birth: row.try_get("place_of_birth")?,
        hometown: row.try_get("hometown")?,
        ethnicity: row.try_get("ethnicity")?,
        religion: row.try_get("religion")?,
        nationality: row.try_get("nationality")?,
        blood_type: row.try_get("blood_type")?,
        father: id("father_id")?,
        mother: id("mother_id")?,
        spouse: id("spouse_id")?,
        permanent_province: row.try_get("perm_province")?,
        permanent_address: row.try_get("perm_address")?,
        current_province: row.try_get("cur_province")?,
        current_address: row.try_get("cur_address")?,
        date_of_death: date("date_of_death")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loads_once_and_finds_by_id_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirectoryStore::open(dir.path()).await.unwrap();
        assert!(store.ensure_population(5, 2_000).await.unwrap());
        assert!(!store.ensure_population(5, 2_000).await.unwrap());
        assert_eq!(store.count().await.unwrap(), 2_000);
        let people: Vec<_> = Population::new(5, 2_000).collect();
        let got = store
            .get_many(&[people[10].personal_id.clone()])
            .await
            .unwrap();
        assert_eq!(got, vec![people[10].clone()]);
        let p = &people[42];
        let found = store
            .search(&p.full_name, &format_date(p.date_of_birth), None, 10)
            .await
            .unwrap();
        assert!(found.contains(p));
    }
}
