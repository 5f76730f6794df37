-- The plain variant of this version replaces the day marks of its rollup tables by
-- (elder, metric, hour) marks written by a trigger. TimescaleDB keeps such marks itself (its
-- continuous-aggregate invalidation logs, read by gateway/store/timescale.py), so nothing
-- changes here.
SELECT 1;
