-- question: What happened in a delegation (principal to agent): its consent facts and its calls with their verdicts?
-- note: Calls attributed to the delegation with call time in [since, until], and every grant_issued/grant_revoked
--   of the delegation at or before until (a grant issued long before the window may be the one in force), in
--   time order; at the same instant an issue comes before a revocation, and both before a call (as the decision
--   semantics apply them). grant_history runs this same SQL for one grant.
-- param tenant String: the tenant
-- param principal String: the human or service the agent acted for
-- param agent_id String: the agent
-- param grant_id Nullable(String) = NULL: only this grant's facts and the calls that matched it; NULL: all
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: calls at or after this time (RFC 3339); NULL: from the first
-- param until Nullable(DateTime64(3, 'UTC')) = NULL: calls and facts at or before this time (RFC 3339); NULL: all
-- column at: event_time of the consent fact, or the call time
-- column kind: grant_issued, grant_revoked or tool_call
-- column grant_id: the grant of the fact, or the grant the call's verdict matched
-- column call_id: the call (NULL for facts)
-- column principal: the delegation's principal
-- column agent_id: the delegation's agent
-- column session_id: the call's session
-- column server: the call's MCP server
-- column tool: the tool called
-- column tools: grant_issued: its tool patterns
-- column resources: grant_issued: its resource patterns; tool_call: the resources the call named
-- column not_before: grant_issued: not valid before
-- column expires_at: grant_issued: expiry (NULL: none)
-- column verdict: the call's current verdict
-- column result_status: ok, error or timeout (NULL: no tool_result)
-- column revoked_by: grant_revoked: who revoked it
-- column reason: grant_revoked: why
-- column event_id: the raw event's id
SELECT *
FROM
(
    SELECT
        event_time AS at,
        toString(event_type) AS kind,
        CAST(grant_id AS Nullable(String)) AS grant_id,
        CAST(NULL AS Nullable(String)) AS call_id,
        CAST(principal AS Nullable(String)) AS principal,
        CAST(agent_id AS Nullable(String)) AS agent_id,
        CAST(NULL AS Nullable(String)) AS session_id,
        CAST(NULL AS Nullable(String)) AS server,
        CAST(NULL AS Nullable(String)) AS tool,
        tools,
        resources,
        not_before,
        expires_at,
        CAST(NULL AS Nullable(String)) AS verdict,
        CAST(NULL AS Nullable(String)) AS result_status,
        revoked_by,
        reason,
        event_id
    FROM {db}.consent_events FINAL
    WHERE tenant = {tenant:String}
        AND ({principal:Nullable(String)} IS NULL OR principal = {principal:Nullable(String)})
        AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
        AND ({grant_id:Nullable(String)} IS NULL OR grant_id = {grant_id:Nullable(String)})
        AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR event_time <= {until:Nullable(DateTime64(3, 'UTC'))})
    UNION ALL
    SELECT
        e.call_time AS at,
        'tool_call' AS kind,
        e.matched_grant_id AS grant_id,
        CAST(e.call_id AS Nullable(String)) AS call_id,
        e.principal AS principal,
        e.agent_id AS agent_id,
        CAST(e.session_id AS Nullable(String)) AS session_id,
        CAST(e.server AS Nullable(String)) AS server,
        CAST(e.tool AS Nullable(String)) AS tool,
        CAST([] AS Array(String)) AS tools,
        c.resources AS resources,
        CAST(NULL AS Nullable(DateTime64(3, 'UTC'))) AS not_before,
        CAST(NULL AS Nullable(DateTime64(3, 'UTC'))) AS expires_at,
        CAST(e.verdict AS Nullable(String)) AS verdict,
        CAST(e.result_status AS Nullable(String)) AS result_status,
        CAST(NULL AS Nullable(String)) AS revoked_by,
        CAST(NULL AS Nullable(String)) AS reason,
        c.event_id AS event_id
    FROM
    (
        SELECT *
        FROM {db}.evidence_current
        WHERE tenant = {tenant:String}
            AND ({principal:Nullable(String)} IS NULL OR principal = {principal:Nullable(String)})
            AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
            AND ({grant_id:Nullable(String)} IS NULL OR matched_grant_id = {grant_id:Nullable(String)})
            AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
            AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
    ) AS e
    LEFT JOIN
    (
        SELECT tenant, call_id, resources, event_id
        FROM {db}.tool_calls FINAL
        WHERE tenant = {tenant:String}
        ORDER BY event_time, event_id
        LIMIT 1 BY tenant, call_id
    ) AS c ON c.tenant = e.tenant AND c.call_id = e.call_id
)
ORDER BY at, multiIf(kind = 'grant_issued', 0, kind = 'grant_revoked', 1, 2), grant_id, call_id, event_id
SETTINGS join_use_nulls = 1
