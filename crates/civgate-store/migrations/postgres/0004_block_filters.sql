-- Version 4: the audit log's subjects index `(personal_id, idx)` — a random index page per
-- record in every commit — gives way to one Bloom filter per block of 4,096 entries, built from
-- the leaves after the block is complete (`audit/subjects.rs`). Replicas of an older build
-- stop writing (their inserts into `audit_subjects` fail); upgrade them together.
CREATE TABLE audit_subject_blocks (
    block BIGINT PRIMARY KEY,
    filter BYTEA NOT NULL
);
DROP TABLE audit_subjects;
