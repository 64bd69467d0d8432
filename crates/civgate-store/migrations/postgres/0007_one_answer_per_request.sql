-- One answer of each kind per request: which event answers which (`asked`: the event_id it is
-- in_reply_to; `kind`: the answer's payload, e.g. personal_id_assigned). The answers an earlier
-- release stored are filled in when the journal opens, once (`journal_backfills`).
CREATE TABLE IF NOT EXISTS journal_answers (
    asked TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (asked, kind)
);
CREATE TABLE IF NOT EXISTS journal_backfills (name TEXT PRIMARY KEY);
INSERT INTO journal_backfills (name) VALUES ('answers') ON CONFLICT (name) DO NOTHING;
