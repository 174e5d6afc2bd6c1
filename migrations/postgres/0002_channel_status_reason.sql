-- Why and when the gateway last disabled a channel by itself (status 3).
ALTER TABLE channels ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE channels ADD COLUMN status_time BIGINT NOT NULL DEFAULT 0;
