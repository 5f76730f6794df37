-- Care plans: what the rules need to know about an elder (alerts/careplan.py, CarePlan):
-- condition names, time zone, lives alone, NEWS2 SpO2 scale, personal rule overrides and
-- disabled rules. No personal data: that stays in elder_profiles.
CREATE TABLE care_plans (
    elder_id   text PRIMARY KEY REFERENCES elders (elder_id) ON DELETE CASCADE,
    plan       jsonb NOT NULL CHECK (jsonb_typeof(plan) = 'object'),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Who set it (a staff account or "cli:<user>"), for the audit trail.
    updated_by text NOT NULL
);
