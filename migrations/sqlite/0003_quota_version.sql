-- Funding versions: raised with every change of what a user or key was granted (top-ups, edits of the
-- remaining quota), so the balance ledger applies each change once and in order.
ALTER TABLE users ADD COLUMN quota_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE tokens ADD COLUMN quota_version INTEGER NOT NULL DEFAULT 1;
