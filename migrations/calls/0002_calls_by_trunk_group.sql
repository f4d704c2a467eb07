-- Listing one trunk group's calls, newest first (the API's /v1/trunk-groups/{id}/calls).
CREATE INDEX calls_trunk_group ON calls (trunk_group, started_at_ms);
