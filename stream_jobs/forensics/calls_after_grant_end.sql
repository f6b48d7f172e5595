-- question: Which calls were made after the grant they relied on was revoked or had expired, and how long after?
-- note: Calls whose current verdict is revoked_grant or expired_grant, latest first. The end of the grant is the
--   event_time of the grant_revoked that applied or the expires_at of the grant version in force: the
--   grant_revoked and grant_issued among the facts the evidence references (fact_ids, read from consent_events)
--   whose grant_id is matched_grant_id (in evidence written before fact references: the copied
--   facts.grants[].revocation_event_id and version_event_id); after_ms = call_time - ended_at (0: the call came
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
    if(e.verdict = 'revoked_grant', e.revoked_at, e.expires_at) AS ended_at,
    toUnixTimestamp64Milli(e.call_time) - toUnixTimestamp64Milli(ended_at) AS after_ms,
    e.revoked_by AS revoked_by,
    e.reason AS reason
FROM
(
    -- one row per call: its referenced facts, joined with consent_events, folded back onto the call
    SELECT
        x.tenant AS tenant,
        x.call_id AS call_id,
        any(x.call_time) AS call_time,
        any(x.principal) AS principal,
        any(x.agent_id) AS agent_id,
        any(x.session_id) AS session_id,
        any(x.server) AS server,
        any(x.tool) AS tool,
        any(x.verdict) AS verdict,
        any(x.matched_grant_id) AS matched_grant_id,
        anyIf(f.expires_at, f.event_type = 'grant_issued') AS expires_at,
        anyIf(f.event_time, f.event_type = 'grant_revoked') AS revoked_at,
        anyIf(f.revoked_by, f.event_type = 'grant_revoked') AS revoked_by,
        anyIf(f.reason, f.event_type = 'grant_revoked') AS reason
    FROM
    (
        SELECT
            tenant,
            call_id,
            call_time,
            principal,
            agent_id,
            session_id,
            server,
            tool,
            verdict,
            matched_grant_id,
            arrayFirst(
                g -> JSONExtractString(g, 'grant_id') = ifNull(matched_grant_id, ''), JSONExtractArrayRaw(facts, 'grants')
            ) AS copied_grant,
            arrayJoin(
                if(
                    empty(fact_ids),
                    [
                        JSONExtractString(copied_grant, 'version_event_id'),
                        JSONExtractString(copied_grant, 'revocation_event_id')
                    ],
                    fact_ids
                )
            ) AS fact_id
        FROM {db}.evidence_current
        WHERE tenant = {tenant:String}
            AND verdict IN ('revoked_grant', 'expired_grant')
            AND ({principal:Nullable(String)} IS NULL OR principal = {principal:Nullable(String)})
            AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
            AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
            AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
    ) AS x
    LEFT JOIN
    (
        SELECT * FROM {db}.consent_events FINAL
        WHERE tenant = {tenant:String} AND event_type IN ('grant_issued', 'grant_revoked')
    ) AS f ON f.tenant = x.tenant AND f.event_id = x.fact_id AND f.grant_id = ifNull(x.matched_grant_id, '')
    GROUP BY x.tenant, x.call_id
) AS e
ORDER BY call_time DESC, call_id
SETTINGS join_use_nulls = 1
