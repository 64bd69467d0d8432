-- Version 5: the audit indexes `(agency, idx)` and `(time_ms)`, written with every record,
-- give way to the agencies and time range in each block's summary (`audit/subjects.rs`).
-- Replicas of an older build that are running keep working (they store summaries without
-- these columns, which searches then scan until a newer replica completes them), but their
-- searches by agency or time lose the index, and an older build refuses to start on it.
ALTER TABLE audit_subject_blocks
    ADD COLUMN agencies TEXT,
    ADD COLUMN first_time_ms BIGINT,
    ADD COLUMN last_time_ms BIGINT;
DROP INDEX IF EXISTS audit_leaves_agency;
DROP INDEX IF EXISTS audit_leaves_time;
