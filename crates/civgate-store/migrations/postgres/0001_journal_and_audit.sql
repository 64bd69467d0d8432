-- Version 1: the journal (events, rejections, heads, consumer groups) and the audit log (leaves, meta, subjects, subtree hashes, checkpoints).
CREATE TABLE IF NOT EXISTS journal_events (
    topic TEXT NOT NULL,
    seq BIGINT NOT NULL,
    event_id TEXT NOT NULL UNIQUE,
    producer TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    payload BYTEA NOT NULL,
    payload_hash BYTEA NOT NULL,
    recorded_at_ms BIGINT NOT NULL,
    PRIMARY KEY (topic, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS journal_idempotency ON journal_events (producer, idempotency_key);
CREATE TABLE IF NOT EXISTS journal_rejections (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    seq BIGINT NOT NULL,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (topic, seq, grp)
);
CREATE TABLE IF NOT EXISTS journal_heads (
    topic TEXT PRIMARY KEY,
    head BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal_groups (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    acked BIGINT NOT NULL,
    PRIMARY KEY (topic, grp)
);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS audit_leaves (
    idx BIGINT PRIMARY KEY,
    leaf BYTEA NOT NULL,
    time_ms BIGINT NOT NULL,
    agency TEXT NOT NULL,
    method TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_leaves_agency ON audit_leaves (agency, idx);
CREATE INDEX IF NOT EXISTS audit_leaves_time ON audit_leaves (time_ms);
CREATE TABLE IF NOT EXISTS audit_subjects (
    personal_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    PRIMARY KEY (personal_id, idx)
);
CREATE TABLE IF NOT EXISTS audit_nodes (
    level BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    size BIGINT PRIMARY KEY,
    note TEXT NOT NULL,
    time_ms BIGINT NOT NULL
);
