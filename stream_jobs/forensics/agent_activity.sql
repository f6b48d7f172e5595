-- question: What did a principal's agents do in a time range, and which grant was in force for each call?
-- note: One row per call with its current verdict (evidence_current), in call time order. The grant in force is
--   the grant the verdict rests on (matched_grant_id: in_scope, revoked_grant, expired_grant, not_yet_valid) at
--   the version the decision used, read from consent_events: the grant_issued among the facts the evidence
--   references (fact_ids) whose grant_id is matched_grant_id (in evidence written before fact references: the
--   copied facts.grants[].version_event_id). The grant's status at the call follows from the verdict. The grant
--   columns are empty when no grant covered the call.
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
    e.grant_status AS grant_status,
    e.grant_issued_at AS grant_issued_at,
    e.grant_tools AS grant_tools,
    e.grant_resources AS grant_resources,
    e.grant_not_before AS grant_not_before,
    e.grant_expires_at AS grant_expires_at,
    e.grant_granted_by AS grant_granted_by,
    e.result_status AS result_status,
    e.result_duration_ms AS result_duration_ms
FROM
(
    -- one row per call: its referenced facts, joined with consent_events, folded back onto the call
    SELECT
        x.tenant AS tenant,
        x.call_id AS call_id,
        any(x.call_time) AS call_time,
        any(x.agent_id) AS agent_id,
        any(x.session_id) AS session_id,
        any(x.server) AS server,
        any(x.tool) AS tool,
        any(x.verdict) AS verdict,
        any(x.matched_grant_id) AS matched_grant_id,
        any(x.grant_status) AS grant_status,
        any(x.result_status) AS result_status,
        any(x.result_duration_ms) AS result_duration_ms,
        anyIf(v.event_time, v.event_type = 'grant_issued') AS grant_issued_at,
        anyIf(v.tools, v.event_type = 'grant_issued') AS grant_tools,
        anyIf(v.resources, v.event_type = 'grant_issued') AS grant_resources,
        anyIf(v.not_before, v.event_type = 'grant_issued') AS grant_not_before,
        anyIf(v.expires_at, v.event_type = 'grant_issued') AS grant_expires_at,
        anyIf(v.granted_by, v.event_type = 'grant_issued') AS grant_granted_by
    FROM
    (
        SELECT
            tenant,
            call_id,
            call_time,
            agent_id,
            session_id,
            server,
            tool,
            verdict,
            matched_grant_id,
            result_status,
            result_duration_ms,
            arrayFirst(
                g -> JSONExtractString(g, 'grant_id') = ifNull(matched_grant_id, ''), JSONExtractArrayRaw(facts, 'grants')
            ) AS copied_grant,
            if(
                matched_grant_id IS NULL,
                NULL,
                coalesce(
                    nullIf(JSONExtractString(copied_grant, 'status'), ''),
                    multiIf(
                        verdict = 'revoked_grant', 'revoked', verdict = 'expired_grant', 'expired',
                        verdict = 'not_yet_valid', 'not_yet_valid', 'active'
                    )
                )
            ) AS grant_status,
            arrayJoin(
                if(
                    empty(fact_ids) AND copied_grant != '',
                    [JSONExtractString(copied_grant, 'version_event_id')],
                    if(empty(fact_ids), [''], fact_ids)
                )
            ) AS fact_id
        FROM {db}.evidence_current
        WHERE tenant = {tenant:String}
            AND principal = {principal:String}
            AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
            AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
            AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
    ) AS x
    LEFT JOIN
    (
        SELECT * FROM {db}.consent_events FINAL WHERE tenant = {tenant:String} AND event_type = 'grant_issued'
    ) AS v ON v.tenant = x.tenant AND v.event_id = x.fact_id AND v.grant_id = ifNull(x.matched_grant_id, '')
    GROUP BY x.tenant, x.call_id
) AS e
LEFT JOIN
(
    SELECT tenant, call_id, resources
    FROM {db}.tool_calls FINAL
    WHERE tenant = {tenant:String}
    ORDER BY event_time, event_id
    LIMIT 1 BY tenant, call_id
) AS c ON c.tenant = e.tenant AND c.call_id = e.call_id
ORDER BY call_time, call_id
SETTINGS join_use_nulls = 1
