-- The audit log's search index gets a second level: a summary per group of 64 blocks
-- (262,144 entries) — its agencies, its time range, and postings (32 bits of each personal
-- ID's hash and the blocks of the group naming it, one row per hash shard). Built in the
-- background from the leaves like the block summaries; a group without one is searched block
-- by block. Each block's summary gets its chunks (time range and agencies per 256 entries),
-- which agency and time searches scan instead of whole blocks; the summaries of blocks already
-- built are completed in the background.
CREATE TABLE audit_block_groups (
    grp BIGINT PRIMARY KEY,
    indexed INTEGER NOT NULL,
    agencies TEXT,
    first_time_ms BIGINT,
    last_time_ms BIGINT
);
CREATE TABLE audit_group_postings (key BIGINT PRIMARY KEY, postings BYTEA NOT NULL);
ALTER TABLE audit_subject_blocks ADD COLUMN chunks BYTEA;
