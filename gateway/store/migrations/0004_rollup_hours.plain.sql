-- Rollup bookkeeping per (elder, metric, hour) instead of per UTC day, so that a refresh
-- recomputes what changed and a series query reads raw rows only for the hours that changed.
--
-- A statement trigger on observations marks the hours its rows touch (inserted, updated or
-- deleted through the observations table), in the transaction holding the rows, so no writer
-- has to know about rollups. The maintenance job moves the marks to rollup_pending_hours (a
-- short transaction that waits for in-flight writers), then recomputes the pending hours and
-- deletes their marks in one transaction. Series queries read the marked hours of the elder and
-- metric asked for from raw rows, so answers are exact at every moment.
-- The day marks of 0002 (rollup_dirty / rollup_pending) are no longer read; the maintenance job
-- empties rollup_dirty, which the ingest writer may still fill.

CREATE TABLE rollup_dirty_hours (
    elder_id text NOT NULL,
    metric   text NOT NULL,
    hour     timestamptz NOT NULL,
    PRIMARY KEY (elder_id, metric, hour)
);
CREATE TABLE rollup_pending_hours (LIKE rollup_dirty_hours INCLUDING ALL);

-- Rows without an elder are not rolled up, so they mark nothing. Marks go in sorted, so two
-- writers marking the same hours never deadlock.
CREATE FUNCTION mark_rollup_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO rollup_dirty_hours (elder_id, metric, hour)
        SELECT DISTINCT elder_id, metric, date_bin('1 hour', time, '2000-01-01 00:00 UTC')
        FROM new_rows WHERE elder_id IS NOT NULL
        ORDER BY 1, 2, 3
        ON CONFLICT DO NOTHING;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO rollup_dirty_hours (elder_id, metric, hour)
        SELECT DISTINCT elder_id, metric, date_bin('1 hour', time, '2000-01-01 00:00 UTC')
        FROM old_rows WHERE elder_id IS NOT NULL
        ORDER BY 1, 2, 3
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

-- Created first: it waits for the writers in flight, and holds new ones back until this
-- migration commits, so the day marks converted below are complete.
CREATE TRIGGER observations_mark_rollup_inserts
    AFTER INSERT ON observations REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mark_rollup_hours();
CREATE TRIGGER observations_mark_rollup_updates
    AFTER UPDATE ON observations REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mark_rollup_hours();
CREATE TRIGGER observations_mark_rollup_deletes
    AFTER DELETE ON observations REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mark_rollup_hours();

-- Days still dirty or pending become marks of every hour with raw rows or rollup buckets.
WITH days AS (
    SELECT day FROM rollup_dirty UNION SELECT day FROM rollup_pending
), spans AS (
    SELECT day::timestamp AT TIME ZONE 'UTC' AS lo, (day + 1)::timestamp AT TIME ZONE 'UTC' AS hi
    FROM days
)
INSERT INTO rollup_dirty_hours (elder_id, metric, hour)
SELECT o.elder_id, o.metric, date_bin('1 hour', o.time, '2000-01-01 00:00 UTC')
FROM spans s JOIN observations o ON o.time >= s.lo AND o.time < s.hi
WHERE o.elder_id IS NOT NULL
UNION
SELECT r.elder_id, r.metric, date_bin('1 hour', r.bucket, '2000-01-01 00:00 UTC')
FROM spans s JOIN observations_1m r ON r.bucket >= s.lo AND r.bucket < s.hi
ON CONFLICT DO NOTHING;
DELETE FROM rollup_dirty;
DELETE FROM rollup_pending;
