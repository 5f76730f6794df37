-- Time series on plain PostgreSQL: weekly range partitions (created ahead by the maintenance
-- job), BRIN on time, and rollup tables kept exact by the dirty-day bookkeeping below.
-- The TimescaleDB variant of this version is 0002_timeseries.timescale.sql; both create the
-- same tables and column names, so queries do not care which one ran.

CREATE TABLE store_info (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO store_info (key, value) VALUES ('flavour', 'plain');

-- Partitions are named observations_pYYYYMMDD after the Monday (UTC) their week starts.
-- The DEFAULT partition is a safety net for rows outside every created week; the maintenance
-- job moves such rows into a week's partition when it creates it.
CREATE TABLE observations (
    time      timestamptz NOT NULL,
    device_id text NOT NULL,
    elder_id  text,
    metric    text NOT NULL,
    value     double precision NOT NULL,
    flags     text[] NOT NULL DEFAULT '{}'
) PARTITION BY RANGE (time);
CREATE TABLE observations_default PARTITION OF observations DEFAULT;
CREATE INDEX observations_time_brin ON observations USING brin (time);
CREATE INDEX observations_elder_metric_time_idx ON observations (elder_id, metric, time);
CREATE INDEX observations_device_time_idx ON observations (device_id, time);

CREATE TABLE device_events (
    time      timestamptz NOT NULL,
    device_id text NOT NULL,
    elder_id  text,
    kind      text NOT NULL,
    details   jsonb NOT NULL DEFAULT '{}',
    flags     text[] NOT NULL DEFAULT '{}',
    msg_id    text
) PARTITION BY RANGE (time);
CREATE TABLE device_events_default PARTITION OF device_events DEFAULT;
CREATE INDEX device_events_time_brin ON device_events USING brin (time);
CREATE INDEX device_events_device_time_idx ON device_events (device_id, time);
CREATE INDEX device_events_elder_time_idx ON device_events (elder_id, time);

-- UTC days whose observations changed since their rollups were computed. The ingest writer
-- inserts the days a batch touched (in the batch's transaction); the maintenance job moves
-- them to rollup_pending (a short transaction that waits for in-flight writers), then
-- recomputes the pending days and deletes them in one transaction. Series queries compute
-- days listed in either table from raw rows, so answers are exact at every moment.
CREATE TABLE rollup_dirty (
    day date PRIMARY KEY
);
CREATE TABLE rollup_pending (
    day date PRIMARY KEY
);

-- Rollups per elder and metric, buckets aligned on UTC (date_bin, origin 2000-01-01 00:00 UTC).
-- avg = sum / count. Rows without an elder are not rolled up.
CREATE TABLE observations_1m (
    bucket   timestamptz NOT NULL,
    elder_id text NOT NULL,
    metric   text NOT NULL,
    min      double precision NOT NULL,
    max      double precision NOT NULL,
    sum      double precision NOT NULL,
    count    bigint NOT NULL,
    PRIMARY KEY (elder_id, metric, bucket)
);
CREATE TABLE observations_1h (LIKE observations_1m INCLUDING ALL);
CREATE TABLE observations_1d (LIKE observations_1m INCLUDING ALL);
