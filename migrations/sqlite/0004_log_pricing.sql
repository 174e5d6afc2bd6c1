-- How each request was priced: cached prompt tokens, and the ratios or price used (JSON, as New API's
-- `other` column).
ALTER TABLE logs ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE logs ADD COLUMN other TEXT NOT NULL DEFAULT '';
