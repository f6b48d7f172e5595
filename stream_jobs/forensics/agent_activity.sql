-- question: What did a principal's agents do in a time range, and which grant was in force for each call?
-- note: One row per call with its current verdict (evidence_current), in call time order. The grant in force is
--   the grant the verdict rests on (matched_grant_id: in_scope, revoked_grant, expired_grant, not_yet_valid) at
--   the version the decision used (facts.grants[].version_event_id, read from consent_events); the grant columns
--   are empty when no grant covered the call.
-- param tenant String: the tenant
-- param principal String: the human or service the agents acted for
-- param agent_id Nullable(String) = NULL: only this agent; NULL: every agent of the principal
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: calls at or after this time (RFC 3339); NULL: from the first
-- param until Nullable(DateTime64(3, 'UTC')) = NULL: calls at or before this time (RFC 3339); NULL: up to the last
-- column call_time: when the call was made (its event_time)
-- column call_id: the call
-- column agent_id: the agent that made it
-- column session_id: the agent session it was made on
-- column server: the MCP server
-- column tool: the tool called
-- column resources: the resources the call named
-- column verdict: the current verdict of the call
-- column grant_id: the grant in force (matched_grant_id), or NULL
-- column grant_status: that grant's status at the call: active, revoked, expired or not_yet_valid
-- column grant_issued_at: event_time of the grant_issued version in force
-- column grant_tools: the tool patterns of that version
-- column grant_resources: the resource patterns of that version (empty: unrestricted)
-- column grant_not_before: not_before of that version
-- column grant_expires_at: expires_at of that version (NULL: no expiry)
-- column grant_granted_by: who granted it
-- column result_status: ok, error or timeout; NULL when no tool_result arrived
-- column result_duration_ms: the call's duration from its tool_result
SELECT
    e.call_time AS call_time,
    e.call_id AS call_id,
    e.agent_id AS agent_id,
    e.session_id AS session_id,
    e.server AS server,
    e.tool AS tool,
    c.resources AS resources,
    e.verdict AS verdict,
    e.matched_grant_id AS grant_id,
    nullIf(JSONExtractString(e.grant_fact, 'status'), '') AS grant_status,
    v.event_time AS grant_issued_at,
    v.tools AS grant_tools,
    v.resources AS grant_resources,
    v.not_before AS grant_not_before,
    v.expires_at AS grant_expires_at,
    v.granted_by AS grant_granted_by,
    e.result_status AS result_status,
    e.result_duration_ms AS result_duration_ms
FROM
(
    SELECT
        *,
        arrayFirst(
            g -> JSONExtractString(g, 'grant_id') = ifNull(matched_grant_id, ''), JSONExtractArrayRaw(facts, 'grants')
        ) AS grant_fact,
        JSONExtractString(grant_fact, 'version_event_id') AS version_event_id
    FROM {db}.evidence_current
    WHERE tenant = {tenant:String}
        AND principal = {principal:String}
        AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
        AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
        AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
) AS e
LEFT JOIN
(
    SELECT tenant, call_id, resources
    FROM {db}.tool_calls FINAL
    WHERE tenant = {tenant:String}
    ORDER BY event_time, event_id
    LIMIT 1 BY tenant, call_id
) AS c ON c.tenant = e.tenant AND c.call_id = e.call_id
LEFT JOIN
(
    SELECT * FROM {db}.consent_events FINAL WHERE tenant = {tenant:String} AND event_type = 'grant_issued'
) AS v ON v.tenant = e.tenant AND v.event_id = e.version_event_id
ORDER BY call_time, call_id
SETTINGS join_use_nulls = 1
