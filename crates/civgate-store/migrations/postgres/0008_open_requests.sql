-- Cases with statutory deadlines: one row per (request event, answer kind) a flow asks for,
-- written with the request; the answer closes it (answered_at_ms, answer_event, answered_by)
-- and records whether it came after due_at_ms (late = 1). `awaiting` is the topic whose
-- producers answer.
CREATE TABLE IF NOT EXISTS journal_requests (
    event_id TEXT NOT NULL,
    answer TEXT NOT NULL,
    flow TEXT NOT NULL,
    producer TEXT NOT NULL,
    kind TEXT NOT NULL,
    case_reference TEXT NOT NULL,
    awaiting TEXT NOT NULL,
    opened_at_ms BIGINT NOT NULL,
    due_at_ms BIGINT NOT NULL,
    answered_at_ms BIGINT,
    answer_event TEXT,
    answered_by TEXT,
    late BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (event_id, answer)
);
CREATE INDEX IF NOT EXISTS journal_requests_open ON journal_requests (due_at_ms) WHERE answered_at_ms IS NULL;
CREATE INDEX IF NOT EXISTS journal_requests_case ON journal_requests (case_reference) WHERE case_reference <> '';
CREATE INDEX IF NOT EXISTS journal_requests_producer ON journal_requests (producer, event_id);
CREATE INDEX IF NOT EXISTS journal_requests_answered ON journal_requests (answered_at_ms) WHERE answered_at_ms IS NOT NULL;
-- The social-insurance agency's topic: its head row (the writers' lock takes every topic's).
INSERT INTO journal_heads (topic, head) VALUES ('social-insurance', 0) ON CONFLICT (topic) DO NOTHING;
