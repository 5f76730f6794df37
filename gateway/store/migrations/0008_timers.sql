-- Durable timers (see gateway/store/timers.py for the design): a row with a due time for
-- whatever must happen later unless something cancels it first (fall without recovery, bed
-- exit without return, operator-first SOS, dispatch retries and escalations). Any worker that
-- is alive claims due rows with FOR UPDATE SKIP LOCKED; the row lock goes with its connection,
-- so a crashed worker's timer is claimed again by another, and a row is fired exactly once.

CREATE TABLE timers (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- What fires (the handler's name), e.g. 'fall_no_recovery'.
    kind         text NOT NULL,
    -- Which one, e.g. an elder id or an alert id: at most one pending timer per (kind, key).
    key          text NOT NULL,
    -- When it was meant to fire; never moved by retries, so lateness stays measurable.
    due_at       timestamptz NOT NULL,
    -- When a worker may next take it: due_at, later after a handler failed (backoff).
    run_at       timestamptz NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    fired_at     timestamptz,
    cancelled_at timestamptz,
    -- Failed tries so far (the handler raised; its writes were rolled back) and the last error.
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    CHECK (fired_at IS NULL OR cancelled_at IS NULL)
);

-- Pending = neither fired nor cancelled. Both indexes hold pending rows only, so they stay as
-- small as the set of timers waiting, however many have fired over the years.
CREATE UNIQUE INDEX timers_pending_key ON timers (kind, key)
    WHERE fired_at IS NULL AND cancelled_at IS NULL;
-- "Next due pending": claim_due and next_due read it in run_at order.
CREATE INDEX timers_pending_run_at ON timers (run_at)
    WHERE fired_at IS NULL AND cancelled_at IS NULL;
