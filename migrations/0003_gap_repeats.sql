-- 0003_gap_repeats: identical gaps recorded one after another are one row with a count.
--
-- A server that closes every stream at once, without ids, would otherwise add a row per
-- reconnection (thousands an hour). `repeats` counts the occurrences folded into the row,
-- `last_at` is the newest of them (`at` stays the first); `seq` is the newest occurrence's.

ALTER TABLE gaps ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1 CHECK (repeats >= 1);
ALTER TABLE gaps ADD COLUMN last_at TEXT NOT NULL DEFAULT '';
UPDATE gaps SET last_at = at;
