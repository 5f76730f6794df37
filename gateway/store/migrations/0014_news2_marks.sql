-- NEWS2 marks (alerts/news2_marks.py): per elder, for each measured NEWS2 parameter and each
-- score 1, 2, 3, the time of the newest reading of it scoring at least that much. The ingest
-- writer upserts a batch's marks (column-wise greatest) and reads the row back in the same
-- statement; the rules bound the NEWS2 aggregate with it and look up the elder's history only
-- when the bound reaches a threshold. The row lock orders two batches that mark one elder.
-- One row per elder who ever scored (it stays small: no retention needed); marks older than
-- NEWS2's window simply no longer count. Plain columns, not an array: greatest() of two
-- columns costs far less than merging arrays in a subquery, and a half-empty page keeps the
-- updates HOT (no index touched).
CREATE TABLE news2_marks (
    elder_id           text PRIMARY KEY,
    respiration_rate_1 timestamptz, respiration_rate_2 timestamptz, respiration_rate_3 timestamptz,
    spo2_1             timestamptz, spo2_2             timestamptz, spo2_3             timestamptz,
    systolic_bp_1      timestamptz, systolic_bp_2      timestamptz, systolic_bp_3      timestamptz,
    heart_rate_1       timestamptz, heart_rate_2       timestamptz, heart_rate_3       timestamptz,
    body_temperature_1 timestamptz, body_temperature_2 timestamptz, body_temperature_3 timestamptz
) WITH (fillfactor = 50);
