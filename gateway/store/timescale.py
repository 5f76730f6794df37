"""What TimescaleDB knows about its continuous aggregates that the series queries need.

Real-time continuous aggregates answer from the materialisation below the watermark, and
TimescaleDB re-materialises a range only when a refresh covers it: late rows in an already
materialised range are not in the answer until then. TimescaleDB logs the time ranges such rows
touch (``continuous_aggs_hypertable_invalidation_log``, moved per aggregate into
``continuous_aggs_materialization_invalidation_log`` by a refresh, deleted when the refresh
that re-materialises them commits). Those ranges, plus everything past each aggregate's
watermark, are where an aggregate of ``observations`` may be out of date; the series queries
read them from raw rows. No writer needs to know.
"""

from __future__ import annotations

from psycopg import sql

#: (lo, hi) spans where some aggregate of ``observations`` may be out of date, clipped to
#: [%(lo)s, %(hi)s). Times in the catalog are TimescaleDB's internal microseconds since the Unix
#: epoch, with sentinels far outside the timestamp range; the logged upper bound is inclusive.
#: Clipping happens on those integers, so no sentinel is ever converted.
STALE_SPANS = sql.SQL(
    "WITH ht AS ("
    " SELECT h.id FROM _timescaledb_catalog.hypertable h"
    " WHERE h.schema_name = current_schema() AND h.table_name = 'observations'"
    "), caggs AS ("
    " SELECT ca.mat_hypertable_id AS id FROM _timescaledb_catalog.continuous_agg ca"
    " JOIN ht ON ca.raw_hypertable_id = ht.id"
    "), logged AS ("
    " SELECT l.lowest_modified_value AS lo, l.greatest_modified_value AS last"
    " FROM _timescaledb_catalog.continuous_aggs_hypertable_invalidation_log l"
    " JOIN ht ON l.hypertable_id = ht.id"
    " UNION ALL"
    " SELECT l.lowest_modified_value, l.greatest_modified_value"
    " FROM _timescaledb_catalog.continuous_aggs_materialization_invalidation_log l"
    " JOIN caggs ON l.materialization_id = caggs.id"
    " UNION ALL"
    " SELECT _timescaledb_functions.cagg_watermark(caggs.id), 9223372036854775807 FROM caggs"
    "), asked AS ("
    " SELECT _timescaledb_functions.to_unix_microseconds(%(lo)s) AS lo,"
    " _timescaledb_functions.to_unix_microseconds(%(hi)s) AS hi"
    ")"
    " SELECT _timescaledb_functions.to_timestamp(greatest(l.lo, a.lo)),"
    " _timescaledb_functions.to_timestamp(least(l.last, a.hi - 1) + 1)"
    " FROM logged l, asked a WHERE l.lo < a.hi AND l.last >= a.lo ORDER BY 1"
)
