-- The case of a request (its portal dossier code) is no longer an index of `journal_requests`
-- written by every commit: dossier codes come in no order, so each request's index entry
-- landed on its own page. A request with a case is queued in `journal_request_cases_pending`
-- (by the trigger, in event order: appended pages) and moved into `journal_request_cases` by
-- the writers in passes (every 10 s at the latest), sorted, many per page. A lookup by case reads both tables in one
-- statement; a request is in one or the other (the move is one statement), never in neither.
CREATE TABLE journal_request_cases (
    case_reference TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (case_reference, event_id)
);
CREATE TABLE journal_request_cases_pending (
    event_id TEXT PRIMARY KEY,
    case_reference TEXT NOT NULL
);
CREATE FUNCTION journal_requests_case_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO journal_request_cases_pending (event_id, case_reference)
    SELECT event_id, case_reference FROM new_requests WHERE case_reference <> ''
    ON CONFLICT (event_id) DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER journal_requests_case_pending AFTER INSERT ON journal_requests
    REFERENCING NEW TABLE AS new_requests
    FOR EACH STATEMENT EXECUTE FUNCTION journal_requests_case_pending();
INSERT INTO journal_request_cases (case_reference, event_id)
SELECT case_reference, event_id FROM journal_requests WHERE case_reference <> '' ORDER BY 1, 2;
DROP INDEX IF EXISTS journal_requests_by_case;
