-- NEWS2 marks (alerts/news2_marks.py): per elder, for each measured NEWS2 parameter and each
-- score 1, 2, 3, the time of the newest reading of it scoring at least that much. The ingest
-- writer upserts a batch's marks (element-wise greatest) and reads the row back in the same
-- statement; the rules bound the NEWS2 aggregate with it and look up the elder's history only
-- when the bound reaches a threshold. The row lock orders two batches that mark one elder.
-- One row per elder who ever scored (it stays small: no retention needed); marks older than
-- NEWS2's window simply no longer count.
CREATE TABLE news2_marks (
    elder_id   text PRIMARY KEY,
    -- 15 times (respiration rate, SpO2, systolic BP, heart rate, temperature; x scores 1-3),
    -- NULL where no reading scored that much.
    marks      timestamptz[] NOT NULL CHECK (cardinality(marks) = 15),
    updated_at timestamptz NOT NULL DEFAULT now()
);
