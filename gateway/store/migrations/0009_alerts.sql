-- Alerts, their history, the outbox asking for their dispatch, and follow-up tasks.
-- Written by the rules (alerts/engine.py decides, gateway/store/alerts.py writes) in the
-- transaction of the readings or events that raised them, or of the timer that fired.

-- One row per alert. At most one *active* alert per (elder, rule): further matches add to it.
CREATE TABLE alerts (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    elder_id      text NOT NULL REFERENCES elders (elder_id),
    rule          text NOT NULL,
    -- What dispatch acts on; raised_severity is what the rule decided (a late emergency is
    -- acted on as urgent, with the delay stated).
    severity      text NOT NULL CHECK (severity IN ('follow_up', 'urgent', 'emergency')),
    raised_severity text NOT NULL CHECK (raised_severity IN ('follow_up', 'urgent', 'emergency')),
    state         text NOT NULL DEFAULT 'open' CHECK (state IN (
                      'open', 'dispatched', 'acknowledged', 'escalated', 'condition_cleared',
                      'resolved', 'auto_closed', 'superseded')),
    route         text NOT NULL,
    device_id     text,
    -- When the first evidence happened (reading or event time) and when the gateway raised it.
    observed_at   timestamptz NOT NULL,
    raised_at     timestamptz NOT NULL,
    late          boolean NOT NULL DEFAULT false,
    late_by_s     double precision,
    title_zh      text NOT NULL,
    title_en      text NOT NULL,
    -- What raised it: thresholds, window, first readings or event; see alerts/decisions.py.
    evidence      jsonb NOT NULL,
    matches       integer NOT NULL DEFAULT 1,
    last_value    double precision,
    last_at       timestamptz NOT NULL,
    confirmed     boolean NOT NULL DEFAULT false,
    superseded_by uuid REFERENCES alerts (id),
    outcome       text,
    updated_at    timestamptz NOT NULL,
    closed_at     timestamptz
);
CREATE UNIQUE INDEX alerts_one_active ON alerts (elder_id, rule)
    WHERE state IN ('open', 'dispatched', 'acknowledged', 'escalated', 'condition_cleared');
CREATE INDEX alerts_elder_closed ON alerts (elder_id, rule, closed_at DESC) WHERE closed_at IS NOT NULL;
CREATE INDEX alerts_raised ON alerts (raised_at DESC);
CREATE INDEX alerts_active_state ON alerts (state, severity)
    WHERE state IN ('open', 'dispatched', 'acknowledged', 'escalated', 'condition_cleared');

-- Every change of an alert, append-only: who, when, from, to, why.
CREATE TABLE alert_history (
    id            bigserial PRIMARY KEY,
    alert_id      uuid NOT NULL REFERENCES alerts (id),
    at            timestamptz NOT NULL,
    actor         text NOT NULL,
    from_state    text,
    to_state      text NOT NULL,
    from_severity text,
    to_severity   text NOT NULL,
    reason        text NOT NULL
);
CREATE INDEX alert_history_alert ON alert_history (alert_id, id);
CREATE FUNCTION alert_history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'alert_history is append-only';
END $$;
CREATE TRIGGER alert_history_no_change BEFORE UPDATE OR DELETE ON alert_history
    FOR EACH ROW EXECUTE FUNCTION alert_history_append_only();

-- The transactional outbox: one row per dispatch the rules ask for (a new alert, an upgrade).
-- The dispatcher (next issue) claims rows with FOR UPDATE SKIP LOCKED, woken by
-- NOTIFY eldercare_outbox, which PostgreSQL sends when the writing transaction commits.
CREATE TABLE alert_outbox (
    id          bigserial PRIMARY KEY,
    alert_id    uuid NOT NULL REFERENCES alerts (id),
    reason      text NOT NULL CHECK (reason IN ('raised', 'upgraded')),
    severity    text NOT NULL,
    route       text NOT NULL,
    created_at  timestamptz NOT NULL,
    claimed_at  timestamptz,
    done_at     timestamptz
);
CREATE INDEX alert_outbox_pending ON alert_outbox (id) WHERE done_at IS NULL;

-- Follow-up work: the family doctor team's queue (and the 12349 service desk's).
CREATE TABLE tasks (
    id           bigserial PRIMARY KEY,
    elder_id     text NOT NULL REFERENCES elders (elder_id),
    kind         text NOT NULL,
    assignee     text NOT NULL,
    state        text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'done', 'cancelled', 'escalated')),
    due_at       timestamptz NOT NULL,
    created_at   timestamptz NOT NULL,
    source_alert uuid REFERENCES alerts (id),
    source_rule  text,
    done_at      timestamptz,
    done_by      text,
    outcome      text
);
CREATE INDEX tasks_open_due ON tasks (assignee, due_at) WHERE state IN ('open', 'escalated');
CREATE INDEX tasks_elder ON tasks (elder_id, created_at DESC);
-- One open task per alert: repeats of a rule add evidence to its alert, not tasks.
CREATE UNIQUE INDEX tasks_one_open_per_alert ON tasks (source_alert) WHERE state IN ('open', 'escalated');
