//! What an earlier release stored, brought up to this release's rules when the journal opens
//! (on either store; SQLite's older table layouts are upgraded first, in `sqlite.rs`).

/// Brings what an earlier release wrote up to this release's rules, in the caller's
/// transaction (`$conn`: a `&mut` SQLite or PostgreSQL connection):
/// - consumer groups and rejections without an owner (`agency = ''`) are given the agency the
///   policy names for them ([`crate::policy::owner_of_legacy_group`]); if any cannot be, the
///   open fails with what to add to the config, and nothing is changed;
/// - population events without an audience are given theirs ([`crate::address::audience_of`]; an
///   answer goes to the producer of the event it answers, found through `in_reply_to` or the
///   old `birth_event_id`, or by province when that event is gone).
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
            Ok::<_, anyhow::Error>(())
        }
    };
}
pub(super) use adopt_legacy;
