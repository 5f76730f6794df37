-- Dispatches: one row per (alert, channel, route step) the dispatcher must deliver, and every
-- attempt at it (hotline-dispatch.md). The row is its own durable timer: a pending dispatch is
-- due at next_attempt_at; a dispatcher claims due rows with FOR UPDATE SKIP LOCKED and leases
-- them until claimed_until, delivers outside any transaction, then records the outcome. A
-- dispatcher killed between claim and outcome leaves a lease that runs out: another one takes
-- the row again (at-least-once, with the same id as webhook-id / Idempotency-Key).

CREATE TABLE dispatches (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    alert_id        uuid NOT NULL REFERENCES alerts (id),
    outbox_id       bigint REFERENCES alert_outbox (id),
    channel         text NOT NULL,
    -- The route and its step this dispatch belongs to (alerts/default_rules.toml [routes]).
    route           text NOT NULL,
    step            integer NOT NULL,
    -- False for channels that are told but whose acknowledgement does not stop escalation
    -- (family contacts: "notify" in the spec's table).
    counts_as_ack   boolean NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN (
                        'pending', 'delivered', 'acknowledged', 'failed', 'superseded')),
    -- The hotline's own progress, forward only (accepted < en_route < on_scene < closed;
    -- declined ends it and escalates).
    ack_status      text CHECK (ack_status IN ('accepted', 'en_route', 'on_scene', 'closed', 'declined')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    claimed_until   timestamptz,
    created_at      timestamptz NOT NULL,
    delivered_at    timestamptz,
    acked_at        timestamptz,
    reference       text,
    last_error      text,
    -- A notice about an earlier dispatch of this channel ('superseded': someone else
    -- acknowledged first, or the alert was resolved), delivered like any dispatch. Notices
    -- have no outbox row and never count as acknowledgements or escalate.
    notice          text CHECK (notice IN ('superseded')),
    notice_of       uuid UNIQUE REFERENCES dispatches (id),
    CHECK ((notice IS NULL) = (notice_of IS NULL)),
    UNIQUE (alert_id, outbox_id, channel)
);
-- "Due pending dispatches", in due order: small, whatever has been delivered over the years.
CREATE INDEX dispatches_due ON dispatches (next_attempt_at) WHERE state = 'pending';
CREATE INDEX dispatches_alert ON dispatches (alert_id, step);

-- Every attempt: when, how long, what came back (the audit trail of delivery).
CREATE TABLE dispatch_attempts (
    id            bigserial PRIMARY KEY,
    dispatch_id   uuid NOT NULL REFERENCES dispatches (id),
    number        integer NOT NULL,
    started_at    timestamptz NOT NULL,
    latency_ms    double precision NOT NULL,
    outcome       text NOT NULL CHECK (outcome IN ('delivered', 'retryable', 'permanent')),
    status        integer,
    reason        text,
    retry_after_s double precision,
    next_attempt_at timestamptz,
    dispatcher    text NOT NULL
);
CREATE INDEX dispatch_attempts_dispatch ON dispatch_attempts (dispatch_id, number);

-- Every acknowledgement a hotline sent, moved the dispatch or not (repeats and out-of-order
-- ones are kept too: the audit trail shows what each hotline said, when).
CREATE TABLE dispatch_acks (
    id          bigserial PRIMARY KEY,
    dispatch_id uuid NOT NULL REFERENCES dispatches (id),
    at          timestamptz NOT NULL,
    channel     text NOT NULL,
    status      text NOT NULL,
    moved       boolean NOT NULL,
    operator    text,
    reference   text,
    note        text
);
CREATE INDEX dispatch_acks_dispatch ON dispatch_acks (dispatch_id, id);
