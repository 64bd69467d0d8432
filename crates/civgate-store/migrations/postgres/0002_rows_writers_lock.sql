-- Version 2: the rows writers lock. A journal batch begins with `SELECT … FROM journal_heads
-- … FOR UPDATE` and an audit batch with `SELECT … FROM audit_meta … FOR UPDATE`: one round trip
-- that both serialises the replicas' writers (held until commit) and, under READ COMMITTED,
-- returns the latest committed head / size even after waiting for another replica.
INSERT INTO journal_heads (topic, head) VALUES ('civil-status', 0), ('population', 0)
    ON CONFLICT (topic) DO NOTHING;
INSERT INTO audit_meta (key, value) VALUES ('size', 0) ON CONFLICT (key) DO NOTHING;
