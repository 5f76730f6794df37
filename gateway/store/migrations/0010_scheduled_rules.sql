-- The scheduled rules (gateway/jobs.py): recorded health check-ups, an index for an elder's
-- alerts of a rule (the follow-ups look up the newest trend alert that pulls them forward),
-- and escalations of overdue tasks in the outbox.

-- Health check-ups, recorded by staff (`eldercare elders checkup`, the API later). Each one
-- opens a checkup_results follow-up whose task ("inform the elder of the results") is due
-- 30 days after it. Recording the same check-up twice is one check-up.
CREATE TABLE checkups (
    id          bigserial PRIMARY KEY,
    elder_id    text NOT NULL REFERENCES elders (elder_id),
    at          timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL,
    recorded_by text NOT NULL,
    -- The follow-up alert it raised (none when an older check-up is recorded after a newer one).
    alert_id    uuid REFERENCES alerts (id),
    UNIQUE (elder_id, at)
);

CREATE INDEX alerts_elder_rule_raised ON alerts (elder_id, rule, raised_at DESC);

-- An open task past due goes to its rule's overdue route (the team lead) once: the
-- dispatcher notifies that route for an outbox row of reason 'escalated'.
ALTER TABLE alert_outbox DROP CONSTRAINT alert_outbox_reason_check;
ALTER TABLE alert_outbox ADD CONSTRAINT alert_outbox_reason_check
    CHECK (reason IN ('raised', 'upgraded', 'escalated'));
