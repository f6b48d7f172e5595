-- question: Which calls were made after the grant they relied on was revoked or had expired, and how long after?
-- note: Calls whose current verdict is revoked_grant or expired_grant, latest first. The end of the grant is the
--   event_time of the grant_revoked that applied (facts.grants[].revocation_event_id) or the expires_at of the
--   grant version in force (facts.grants[].version_event_id); after_ms = call_time - ended_at (0: the call came
--   at the very moment of the revocation, which the revocation wins).
-- param tenant String: the tenant
-- param principal Nullable(String) = NULL: only this principal; NULL: every principal
-- param agent_id Nullable(String) = NULL: only this agent; NULL: every agent
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: calls at or after this time (RFC 3339); NULL: from the first
-- param until Nullable(DateTime64(3, 'UTC')) = NULL: calls at or before this time (RFC 3339); NULL: up to the last
-- column call_time: when the call was made
-- column call_id: the call
-- column principal: who the agent acted for
-- column agent_id: the agent
-- column session_id: the agent session
-- column server: the MCP server
-- column tool: the tool called
-- column verdict: revoked_grant or expired_grant
-- column grant_id: the grant the call relied on
-- column ended_by: revoked or expired
-- column ended_at: when the grant was revoked, or when it expired
-- column after_ms: how long after the end the call came, in milliseconds
-- column revoked_by: who revoked it (NULL for an expiry)
-- column reason: the revocation's reason (NULL for an expiry)
SELECT
    e.call_time AS call_time,
    e.call_id AS call_id,
    e.principal AS principal,
    e.agent_id AS agent_id,
    e.session_id AS session_id,
    e.server AS server,
    e.tool AS tool,
    e.verdict AS verdict,
    e.matched_grant_id AS grant_id,
    if(e.verdict = 'revoked_grant', 'revoked', 'expired') AS ended_by,
    if(e.verdict = 'revoked_grant', r.event_time, v.expires_at) AS ended_at,
    toUnixTimestamp64Milli(e.call_time) - toUnixTimestamp64Milli(ended_at) AS after_ms,
    r.revoked_by AS revoked_by,
    r.reason AS reason
FROM
(
    SELECT
        *,
        arrayFirst(
            g -> JSONExtractString(g, 'grant_id') = ifNull(matched_grant_id, ''), JSONExtractArrayRaw(facts, 'grants')
        ) AS grant_fact,
        JSONExtractString(grant_fact, 'version_event_id') AS version_event_id,
        JSONExtractString(grant_fact, 'revocation_event_id') AS revocation_event_id
    FROM {db}.evidence_current
    WHERE tenant = {tenant:String}
        AND verdict IN ('revoked_grant', 'expired_grant')
        AND ({principal:Nullable(String)} IS NULL OR principal = {principal:Nullable(String)})
        AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
        AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
        AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
) AS e
LEFT JOIN
(
    SELECT * FROM {db}.consent_events FINAL WHERE tenant = {tenant:String} AND event_type = 'grant_issued'
) AS v ON v.tenant = e.tenant AND v.event_id = e.version_event_id
LEFT JOIN
(
    SELECT * FROM {db}.consent_events FINAL WHERE tenant = {tenant:String} AND event_type = 'grant_revoked'
) AS r ON r.tenant = e.tenant AND r.event_id = e.revocation_event_id
ORDER BY call_time DESC, call_id
SETTINGS join_use_nulls = 1
