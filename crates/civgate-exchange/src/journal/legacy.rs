//! What an earlier release stored, brought up to this release's rules when the journal opens
//! (on either store; SQLite's older table layouts are upgraded first, in `sqlite.rs`).

/// Brings what an earlier release wrote up to this release's rules, in the caller's
/// transaction (`$conn`: a `&mut` SQLite or PostgreSQL connection):
/// - consumer groups and rejections without an owner (`agency = ''`) are given the agency the
///   policy names for them ([`crate::policy::owner_of_legacy_group`]); if any cannot be, the
///   open fails with what to add to the config, and nothing is changed;
/// - population events without an audience are given theirs ([`crate::address::audience_of`]; an
///   answer goes to the producer of the event it answers, found through `in_reply_to` or the
///   old `birth_event_id`, or by province when that event is gone);
/// - once, after the upgrade that added `journal_answers`: the answers already stored are
///   recorded there, so a request answered before the upgrade is not answered twice.
macro_rules! adopt_legacy {
    ($conn:expr, $policy:expr) => {
        async {
            let policy: &crate::policy::Policy = $policy;
            let legacy: Vec<(String, String)> = sqlx::query_as(
                "SELECT topic, grp FROM journal_groups WHERE agency = '' \
                 UNION SELECT topic, grp FROM journal_rejections WHERE agency = ''",
            )
            .fetch_all(&mut *$conn)
            .await?;
            let mut problems = Vec::new();
            let mut owners = Vec::new();
            for (topic, grp) in legacy {
                match crate::policy::owner_of_legacy_group(policy, &topic, &grp) {
                    Ok(a) => owners.push((topic, grp, a)),
                    Err(e) => problems.push(e),
                }
            }
            anyhow::ensure!(
                problems.is_empty(),
                "the journal cannot be opened until its consumer groups have owners:\n  {}",
                problems.join("\n  ")
            );
            for (topic, grp, agency) in &owners {
                sqlx::query("UPDATE journal_groups SET agency = $1 WHERE topic = $2 AND grp = $3 AND agency = ''")
                    .bind(agency.as_str())
                    .bind(topic)
                    .bind(grp)
                    .execute(&mut *$conn)
                    .await?;
                sqlx::query("UPDATE journal_rejections SET agency = $1 WHERE topic = $2 AND grp = $3 AND agency = ''")
                    .bind(agency.as_str())
                    .bind(topic)
                    .bind(grp)
                    .execute(&mut *$conn)
                    .await?;
                tracing::info!(topic, group = grp.as_str(), agency = agency.as_str(), "consumer group of an earlier release assigned to its agency");
            }
            let unaddressed: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT seq, payload FROM journal_events \
                 WHERE topic = 'population' AND audience IS NULL ORDER BY seq",
            )
            .fetch_all(&mut *$conn)
            .await?;
            let n = unaddressed.len();
            for (seq, payload) in unaddressed {
                let event = <crate::pb::v1::Event as prost::Message>::decode(payload.as_slice()).ok();
                let mut answered_producer = None;
                if let Some(id) = event.as_ref().and_then(crate::address::answered) {
                    answered_producer = sqlx::query_scalar::<_, String>(
                        "SELECT producer FROM journal_events WHERE event_id = $1",
                    )
                    .bind(id)
                    .fetch_optional(&mut *$conn)
                    .await?;
                }
                // An event that does not decode is kept from everyone.
                let audience = event
                    .as_ref()
                    .and_then(|e| e.payload.as_ref())
                    .and_then(|p| crate::address::audience_of(p, answered_producer.as_deref()))
                    .unwrap_or_else(|| " ".to_owned());
                sqlx::query("UPDATE journal_events SET audience = $1 WHERE topic = 'population' AND seq = $2")
                    .bind(audience)
                    .bind(seq)
                    .execute(&mut *$conn)
                    .await?;
            }
            if n > 0 {
                tracing::info!(events = n, "population events of an earlier release addressed");
            }
            let pending: Option<String> = sqlx::query_scalar(
                "SELECT name FROM journal_backfills WHERE name = 'answers'",
            )
            .fetch_optional(&mut *$conn)
            .await?;
            if pending.is_some() {
                // Pages in (topic, seq) order, so an earlier release's first answer of a kind
                // is the one kept.
                let (mut topic, mut seq, mut filled) = (String::new(), 0i64, 0u64);
                loop {
                    let rows: Vec<(String, i64, String, Vec<u8>)> = sqlx::query_as(
                        "SELECT topic, seq, event_id, payload FROM journal_events                          WHERE (topic, seq) > ($1, $2) ORDER BY topic, seq LIMIT 10000",
                    )
                    .bind(&topic)
                    .bind(seq)
                    .fetch_all(&mut *$conn)
                    .await?;
                    let Some(last) = rows.last() else { break };
                    (topic, seq) = (last.0.clone(), last.1);
                    for (_, _, event_id, payload) in rows {
                        let Ok(event) = <crate::pb::v1::Event as prost::Message>::decode(payload.as_slice()) else {
                            continue;
                        };
                        let (Some(asked), Some(p)) = (crate::address::answered(&event), event.payload.as_ref()) else {
                            continue;
                        };
                        filled += sqlx::query(
                            "INSERT INTO journal_answers (asked, kind, event_id) VALUES ($1, $2, $3) \
                             ON CONFLICT (asked, kind) DO NOTHING",
                        )
                        .bind(asked)
                        .bind(crate::validate::topic_of(p).1)
                        .bind(&event_id)
                        .execute(&mut *$conn)
                        .await?
                        .rows_affected();
                    }
                }
                sqlx::query("DELETE FROM journal_backfills WHERE name = 'answers'")
                    .execute(&mut *$conn)
                    .await?;
                tracing::info!(answers = filled, "answers of an earlier release recorded (one of each kind per request)");
            }
            Ok::<_, anyhow::Error>(())
        }
    };
}
pub(super) use adopt_legacy;
