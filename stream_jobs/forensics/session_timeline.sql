-- question: What happened on an agent session: its identity facts and every call in order, with each call's result?
-- note: One row per session_bound / session_ended fact and per tool_call of the session, in time order (at the
--   same instant facts come first, as the decision semantics apply them). Calls are read from the raw tool_calls,
--   so a call still waiting for its verdict shows with verdict NULL.
-- param tenant String: the tenant
-- param session_id String: the agent session
-- column at: event_time of the fact or of the call
-- column kind: session_bound, session_ended or tool_call
-- column call_id: the call (NULL for facts)
-- column principal: the principal the session was bound to, or the call's attributed principal
-- column agent_id: the agent the session was bound to, or the call's attributed agent
-- column server: the MCP server (calls)
-- column tool: the tool called (calls)
-- column resources: the resources the call named
-- column verdict: the call's current verdict (NULL until decided)
-- column grant_id: the grant the verdict matched (matched_grant_id)
-- column result_status: ok, error or timeout (NULL: no tool_result)
-- column result_duration_ms: the call's duration from its tool_result
-- column result_error: the error text of the tool_result
-- column valid_from: session_bound: start of the binding's validity
-- column valid_until: session_bound: end of the binding's validity (NULL: no expiry)
-- column event_id: the raw event's id
SELECT
    at, kind, call_id, principal, agent_id, server, tool, resources, verdict, grant_id,
    result_status, result_duration_ms, result_error, valid_from, valid_until, event_id
FROM
(
    SELECT
        event_time AS at,
        toString(event_type) AS kind,
        CAST(NULL AS Nullable(String)) AS call_id,
        principal,
        agent_id,
        CAST(NULL AS Nullable(String)) AS server,
        CAST(NULL AS Nullable(String)) AS tool,
        CAST([] AS Array(String)) AS resources,
        CAST(NULL AS Nullable(String)) AS verdict,
        CAST(NULL AS Nullable(String)) AS grant_id,
        CAST(NULL AS Nullable(String)) AS result_status,
        CAST(NULL AS Nullable(Float64)) AS result_duration_ms,
        CAST(NULL AS Nullable(String)) AS result_error,
        valid_from,
        valid_until,
        event_id
    FROM {db}.identity_events FINAL
    WHERE tenant = {tenant:String} AND session_id = {session_id:String}
    UNION ALL
    SELECT
        c.event_time AS at,
        'tool_call' AS kind,
        CAST(c.call_id AS Nullable(String)) AS call_id,
        e.principal AS principal,
        e.agent_id AS agent_id,
        CAST(c.server AS Nullable(String)) AS server,
        CAST(c.tool AS Nullable(String)) AS tool,
        c.resources AS resources,
        CAST(e.verdict AS Nullable(String)) AS verdict,
        e.matched_grant_id AS grant_id,
        CAST(r.status AS Nullable(String)) AS result_status,
        r.duration_ms AS result_duration_ms,
        r.error AS result_error,
        CAST(NULL AS Nullable(DateTime64(3, 'UTC'))) AS valid_from,
        CAST(NULL AS Nullable(DateTime64(3, 'UTC'))) AS valid_until,
        c.event_id AS event_id
    FROM
    (
        SELECT * FROM {db}.tool_calls FINAL
        WHERE tenant = {tenant:String} AND session_id = {session_id:String}
        ORDER BY event_time, event_id
        LIMIT 1 BY call_id
    ) AS c
    LEFT JOIN
    (
        SELECT call_id, principal, agent_id, verdict, matched_grant_id
        FROM {db}.evidence_current
        WHERE tenant = {tenant:String} AND session_id = {session_id:String}
    ) AS e ON e.call_id = c.call_id
    LEFT JOIN
    (
        SELECT call_id, status, duration_ms, error
        FROM {db}.tool_results FINAL
        WHERE tenant = {tenant:String} AND session_id = {session_id:String}
        ORDER BY _ingested_at DESC
        LIMIT 1 BY call_id
    ) AS r ON r.call_id = c.call_id
)
ORDER BY at, multiIf(kind = 'session_bound', 0, kind = 'session_ended', 1, 2), call_id, event_id
SETTINGS join_use_nulls = 1
