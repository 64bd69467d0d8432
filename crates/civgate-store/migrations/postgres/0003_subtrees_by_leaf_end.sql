-- Version 3: subtree hashes keyed by `(leaf_end, level)` — one past the last leaf a subtree
-- covers — so the hashes an append completes are adjacent in the index rather than at the end
-- of every level (`audit_nodes`, keyed by `(level, idx)`). Replicas of an older build stop
-- writing (their inserts fail, their calls answer UNAVAILABLE) and refuse to start
-- ("schema newer than this build"); upgrade them together.
CREATE TABLE audit_tree (
    leaf_end BIGINT NOT NULL,
    level BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (leaf_end, level)
);
INSERT INTO audit_tree (leaf_end, level, hash)
    SELECT (idx + 1) << (level::integer), level, hash FROM audit_nodes;
DROP TABLE audit_nodes;
