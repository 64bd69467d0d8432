-- Consumer groups belong to agencies: `agency` joins the keys of groups and dead letters
-- (`''` until the journal's open assigns an earlier release's groups from the config), and
-- events record who they are addressed to (`audience`; NULL: every consumer of the topic).
ALTER TABLE journal_events ADD COLUMN IF NOT EXISTS audience TEXT;
CREATE INDEX IF NOT EXISTS journal_unaddressed ON journal_events (seq) WHERE topic = 'population' AND audience IS NULL;
ALTER TABLE journal_groups ADD COLUMN IF NOT EXISTS agency TEXT NOT NULL DEFAULT '';
ALTER TABLE journal_groups DROP CONSTRAINT IF EXISTS journal_groups_pkey;
ALTER TABLE journal_groups ADD PRIMARY KEY (topic, agency, grp);
ALTER TABLE journal_rejections ADD COLUMN IF NOT EXISTS agency TEXT NOT NULL DEFAULT '';
ALTER TABLE journal_rejections DROP CONSTRAINT IF EXISTS journal_rejections_pkey;
ALTER TABLE journal_rejections ADD PRIMARY KEY (topic, seq, agency, grp);
