-- What the hotlines need to know about an elder besides who they are (the request body's
-- `elder` object, shared/spec/hotline-dispatch.md): where home is, medications, allergies,
-- emergency contacts and the family doctor. Personal data, so in elder_profiles with the rest
-- of it (read by the dispatcher and authorised roles only), never in care_plans, which the
-- rules and analysts read. Written by `eldercare elders set-profile` (gateway/store/profiles.py);
-- read into each dispatch's body by gateway/store/dispatches.py.
--
-- Adding columns with constant defaults rewrites nothing (PostgreSQL 11+).

ALTER TABLE elder_profiles
    -- The home's position (WGS 84). An alert raised by an event that carried the device's
    -- position sends that one instead (docs/dispatch.md).
    ADD COLUMN latitude  double precision CHECK (latitude BETWEEN -90 AND 90),
    ADD COLUMN longitude double precision CHECK (longitude BETWEEN -180 AND 180),
    -- As the family doctor wrote them ("amlodipine 5mg once daily"); empty: none known.
    ADD COLUMN medications text[] NOT NULL DEFAULT '{}',
    ADD COLUMN allergies   text[] NOT NULL DEFAULT '{}',
    -- [{"name", "relation", "phone"}, ...], first to call first.
    ADD COLUMN emergency_contacts jsonb NOT NULL DEFAULT '[]'
        CHECK (jsonb_typeof(emergency_contacts) = 'array'
               AND NOT jsonb_path_exists(emergency_contacts, '$[*] ? (@.type() != "object")')),
    -- {"name", "clinic", "phone"}, or NULL: none known.
    ADD COLUMN family_doctor jsonb CHECK (jsonb_typeof(family_doctor) = 'object'),
    -- Who changed the profile last (a staff account or "cli:<user>"), as care_plans keeps it.
    ADD COLUMN updated_by text,
    ADD CONSTRAINT elder_profiles_location_whole CHECK ((latitude IS NULL) = (longitude IS NULL));
