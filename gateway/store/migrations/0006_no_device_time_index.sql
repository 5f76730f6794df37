-- observations had an index on (device_id, time) that no query reads: charts, rollups and
-- the rules read by (elder_id, metric, time). It cost about 5 us of PostgreSQL CPU per
-- message (17 % of the batch transaction; `python -m eldercare.gateway.bench.txcost`).
-- A query by device over a short range is served by the BRIN on time; add an index back
-- when a query needs one. device_events keeps its (device_id, time) index: events are few.
DROP INDEX IF EXISTS observations_device_time_idx;
