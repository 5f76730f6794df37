-- A counter of care-plan changes. The ingest path needs every batch's elders' plan stamps
-- (a plan set a moment ago applies to the next reading); reading one row per batch and all
-- stamps only when it moved costs far less than probing each elder's plan in every batch
-- (gateway/store/elder_rules.py). Any statement that changes care_plans moves it, in its own
-- transaction: a reader never sees a plan without the count that announces it.
CREATE TABLE care_plan_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint NOT NULL
);
INSERT INTO care_plan_version (version) VALUES (0);

CREATE FUNCTION care_plan_version_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE care_plan_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER care_plans_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON care_plans
    FOR EACH STATEMENT EXECUTE FUNCTION care_plan_version_bump();
