-- Time series on TimescaleDB 2.x: hypertables with weekly chunks, compression and retention
-- policies, and real-time continuous aggregates for 1 minute / 1 hour / 1 day.
-- The plain-PostgreSQL variant of this version is 0002_timeseries.plain.sql; both create the
-- same tables and column names (observations_1m/_1h/_1d: bucket, elder_id, metric, min, max,
-- sum, count), so queries do not care which one ran.
--
-- Runs in one transaction: continuous aggregates are created WITH NO DATA (creating one WITH
-- DATA cannot run in a transaction block); the refresh policies fill them.
-- The retention periods below are the defaults (730 days); the maintenance job re-sets them
-- from ELDERCARE_RETENTION_OBSERVATIONS_DAYS when they differ.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE store_info (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO store_info (key, value) VALUES ('flavour', 'timescale');

CREATE TABLE observations (
    time      timestamptz NOT NULL,
    device_id text NOT NULL,
    elder_id  text,
    metric    text NOT NULL,
    value     double precision NOT NULL,
    flags     text[] NOT NULL DEFAULT '{}'
);
SELECT create_hypertable('observations', 'time', chunk_time_interval => INTERVAL '1 week');
CREATE INDEX observations_elder_metric_time_idx ON observations (elder_id, metric, time DESC);
CREATE INDEX observations_device_time_idx ON observations (device_id, time DESC);

CREATE TABLE device_events (
    time      timestamptz NOT NULL,
    device_id text NOT NULL,
    elder_id  text,
    kind      text NOT NULL,
    details   jsonb NOT NULL DEFAULT '{}',
    flags     text[] NOT NULL DEFAULT '{}',
    msg_id    text
);
SELECT create_hypertable('device_events', 'time', chunk_time_interval => INTERVAL '1 week');
CREATE INDEX device_events_device_time_idx ON device_events (device_id, time DESC);
CREATE INDEX device_events_elder_time_idx ON device_events (elder_id, time DESC);

-- Compression: chunks older than 7 days. Late rows (up to the buffer horizon, 30 days) still
-- insert into compressed chunks (supported since TimescaleDB 2.3; 2.11+ recommended).
ALTER TABLE observations SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'time DESC'
);
SELECT add_compression_policy('observations', compress_after => INTERVAL '7 days');

ALTER TABLE device_events SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'time DESC'
);
SELECT add_compression_policy('device_events', compress_after => INTERVAL '7 days');

SELECT add_retention_policy('observations', drop_after => INTERVAL '730 days');
SELECT add_retention_policy('device_events', drop_after => INTERVAL '730 days');

-- Continuous aggregates, real time (materialized_only = false): buckets past the last
-- refresh are computed from raw rows at query time. time_bucket on timestamptz aligns on
-- UTC, like date_bin with origin 2000-01-01 00:00 UTC on the plain path.
CREATE MATERIALIZED VIEW observations_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 minute', time) AS bucket,
       elder_id,
       metric,
       min(value) AS min,
       max(value) AS max,
       sum(value) AS sum,
       count(*)   AS count
FROM observations
WHERE elder_id IS NOT NULL
GROUP BY time_bucket(INTERVAL '1 minute', time), elder_id, metric
WITH NO DATA;

CREATE MATERIALIZED VIEW observations_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket,
       elder_id,
       metric,
       min(value) AS min,
       max(value) AS max,
       sum(value) AS sum,
       count(*)   AS count
FROM observations
WHERE elder_id IS NOT NULL
GROUP BY time_bucket(INTERVAL '1 hour', time), elder_id, metric
WITH NO DATA;

CREATE MATERIALIZED VIEW observations_1d
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', time) AS bucket,
       elder_id,
       metric,
       min(value) AS min,
       max(value) AS max,
       sum(value) AS sum,
       count(*)   AS count
FROM observations
WHERE elder_id IS NOT NULL
GROUP BY time_bucket(INTERVAL '1 day', time), elder_id, metric
WITH NO DATA;

CREATE INDEX observations_1m_elder_metric_bucket_idx ON observations_1m (elder_id, metric, bucket);
CREATE INDEX observations_1h_elder_metric_bucket_idx ON observations_1h (elder_id, metric, bucket);
CREATE INDEX observations_1d_elder_metric_bucket_idx ON observations_1d (elder_id, metric, bucket);

-- Refresh windows reach back past the buffer horizon (30 days) so that late, buffered rows
-- reach the aggregates; a refresh only recomputes the invalidated parts of its window.
SELECT add_continuous_aggregate_policy('observations_1m',
    start_offset => INTERVAL '35 days', end_offset => INTERVAL '1 minute',
    schedule_interval => INTERVAL '1 minute');
SELECT add_continuous_aggregate_policy('observations_1h',
    start_offset => INTERVAL '35 days', end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '5 minutes');
SELECT add_continuous_aggregate_policy('observations_1d',
    start_offset => INTERVAL '35 days', end_offset => INTERVAL '1 day',
    schedule_interval => INTERVAL '15 minutes');

-- Aggregates are kept as long as the raw rows, as on the plain path.
SELECT add_retention_policy('observations_1m', drop_after => INTERVAL '730 days');
SELECT add_retention_policy('observations_1h', drop_after => INTERVAL '730 days');
SELECT add_retention_policy('observations_1d', drop_after => INTERVAL '730 days');
