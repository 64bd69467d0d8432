//! `civgate cases …`: who is late, and a case's steps, from `Exchange.ListOpenRequests` (with
//! an auditor's certificate every agency's requests; with a registry's, its own).

use anyhow::Result;
use clap::Subcommand;

use crate::{
    cli::{Gateway, channel},
    pb::v1::{ListOpenRequestsRequest, OpenRequest, exchange_client::ExchangeClient},
};

#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Unanswered requests past their due time, oldest first, naming the agency awaited.
    Overdue {
        #[command(flatten)]
        gateway: Gateway,
        /// Only those awaiting this agency.
        #[arg(long)]
        awaiting: Option<String>,
    },
    /// Every step of one case (its dossier code), answered or not.
    Show {
        #[command(flatten)]
        gateway: Gateway,
        case: String,
    },
}

pub async fn run(cmd: Command) -> Result<()> {
    let (gateway, req) = match cmd {
        Command::Overdue { gateway, awaiting } => (
            gateway,
            ListOpenRequestsRequest {
                overdue_only: true,
                awaiting_agency_id: awaiting.unwrap_or_default(),
                ..Default::default()
            },
        ),
        Command::Show { gateway, case } => (
            gateway,
            ListOpenRequestsRequest {
                case_reference: case,
                ..Default::default()
            },
        ),
    };
    let mut client = ExchangeClient::new(channel(&gateway).await?);
    let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let mut token = String::new();
    let mut rows = Vec::new();
    loop {
        let page = client
            .list_open_requests(ListOpenRequestsRequest {
                page_size: 1_000,
                page_token: token,
                ..req.clone()
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        rows.extend(page.requests);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    print!("{}", table(&rows, now));
    Ok(())
}

/// The requests as the command prints them: a header, one row each, a count.
pub fn table(rows: &[OpenRequest], now_ms: i64) -> String {
    let mut out = format!(
        "{:<32}  {:<18}  {:<10}  {:<24}  {:<20}  {:<16}  {:<25}  state\n",
        "request", "case", "kind", "answer awaited", "awaiting", "from", "due (Vietnam time)"
    );
    for r in rows {
        out.push_str(&line(r, now_ms));
        out.push('\n');
    }
    out.push_str(&format!("{} request(s)\n", rows.len()));
    out
}

/// One request as a table row.
fn line(r: &OpenRequest, now_ms: i64) -> String {
    let state = if r.answered_at_unix_ms > 0 {
        format!(
            "answered {} by {}{}",
            vn_time(r.answered_at_unix_ms),
            r.answered_by_agency_id,
            if r.late { " (late)" } else { "" }
        )
    } else if r.overdue {
        format!("OVERDUE by {}", span(now_ms - r.due_at_unix_ms))
    } else {
        format!("open, {} left", span(r.due_at_unix_ms - now_ms))
    };
    format!(
        "{:<32}  {:<18}  {:<10}  {:<24}  {:<20}  {:<16}  {:<25}  {state}",
        r.event_id,
        if r.case_reference.is_empty() {
            "-"
        } else {
            &r.case_reference
        },
        r.kind,
        r.answer_kind,
        r.awaiting_agency_ids.join(","),
        r.producer_agency_id,
        vn_time(r.due_at_unix_ms),
    )
}

/// A time as `YYYY-MM-DD HH:MM:SS` in Vietnam.
fn vn_time(ms: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(|t| t.to_offset(crate::domain::VIETNAM))
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// A duration as days, hours, minutes, seconds (the largest two units).
fn span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {}s", s % 60),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_say_open_overdue_or_answered() {
        let mut r = OpenRequest {
            event_id: "e1".into(),
            kind: "birth".into(),
            case_reference: "HP-1".into(),
            answer_kind: "personal_id_assigned".into(),
            producer_agency_id: "registry-hp".into(),
            awaiting_agency_ids: vec!["population".into()],
            due_at_unix_ms: 1_796_000_000_000,
            ..Default::default()
        };
        let now = r.due_at_unix_ms - 90_000;
        assert!(
            line(&r, now).ends_with("open, 1m 30s left"),
            "{}",
            line(&r, now)
        );
        r.overdue = true;
        let later = r.due_at_unix_ms + 2 * 86_400_000 + 3_600_000;
        assert!(
            line(&r, later).ends_with("OVERDUE by 2d 1h"),
            "{}",
            line(&r, later)
        );
        r.answered_at_unix_ms = later;
        r.answered_by_agency_id = "population".into();
        r.late = true;
        assert!(
            line(&r, later).ends_with("by population (late)"),
            "{}",
            line(&r, later)
        );
        assert!(line(&r, later).contains("population"));
        assert_eq!(vn_time(0), "1970-01-01 07:00:00");
    }
}
