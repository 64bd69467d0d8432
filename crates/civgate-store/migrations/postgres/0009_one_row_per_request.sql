-- Open requests: one row per request event instead of one per step. The steps (flow, answer,
-- due time, and once answered: when, by which event, of which agency) are one JSON column;
-- `due_at_ms` is the earliest due time of the steps still open (NULL once all are answered),
-- `answered_at_ms` the time of the latest answer. A request costs its publish one row and two
-- index entries (open by due time, case) instead of a row and three index entries per step.
DROP INDEX IF EXISTS journal_requests_open;
DROP INDEX IF EXISTS journal_requests_case;
DROP INDEX IF EXISTS journal_requests_producer;
DROP INDEX IF EXISTS journal_requests_answered;
ALTER TABLE journal_requests RENAME TO journal_request_steps;
CREATE TABLE journal_requests (
    event_id TEXT PRIMARY KEY,
    producer TEXT NOT NULL,
    kind TEXT NOT NULL,
    case_reference TEXT NOT NULL,
    opened_at_ms BIGINT NOT NULL,
    due_at_ms BIGINT,
    answered_at_ms BIGINT,
    steps TEXT NOT NULL
);
INSERT INTO journal_requests (event_id, producer, kind, case_reference, opened_at_ms, due_at_ms, answered_at_ms, steps)
SELECT event_id, min(producer), min(kind), min(case_reference), min(opened_at_ms),
       min(due_at_ms) FILTER (WHERE answered_at_ms IS NULL), max(answered_at_ms),
       json_agg(CASE WHEN answered_at_ms IS NULL THEN json_build_array(flow, answer, due_at_ms)
                ELSE json_build_array(flow, answer, due_at_ms, answered_at_ms, answer_event, coalesce(answered_by, '')) END
                ORDER BY answer)::text
FROM journal_request_steps GROUP BY event_id;
DROP TABLE journal_request_steps;
CREATE INDEX journal_requests_due ON journal_requests (due_at_ms) WHERE due_at_ms IS NOT NULL;
CREATE INDEX journal_requests_by_case ON journal_requests (case_reference) WHERE case_reference <> '';
CREATE INDEX journal_requests_last_answer ON journal_requests (answered_at_ms) WHERE answered_at_ms IS NOT NULL;
