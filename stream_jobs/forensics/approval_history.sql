-- question: Which human approvals did a delegation get, and what became of each: which call used it, when and how
--   long after it was given; which calls went ahead although a human denied them; which needed one and had none?
-- note: One row per approval (approval_events; an approval_id decided more than once shows its latest decision and
--   versions > 1) with each call whose current verdict names it (evidence_current.approval_id): the call it
--   authorised (in_scope; an approval authorises at most one call) or the calls it denied (approval_denied: the
--   call was made anyway). Plus one row per call judged approval_missing (no approval columns). outcome: used,
--   unused, denied_then_executed, denied (no call came), or missing.
-- note: time_to_use_ms = call_time - the event_time of the approval's version in force at the call (what the
--   approval_latency rule measures).
-- param tenant String: the tenant
-- param principal Nullable(String) = NULL: only this principal's delegations; NULL: every principal
-- param agent_id Nullable(String) = NULL: only this agent; NULL: every agent
-- param tool Nullable(String) = NULL: only this server/tool (exact, e.g. db/write_row); NULL: every tool
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: approvals decided (missing: calls made) at or after this time
--   (RFC 3339); NULL: from the first
-- param until Nullable(DateTime64(3, 'UTC')) = NULL: approvals decided (missing: calls made) at or before this time
--   (RFC 3339); NULL: up to the last
-- column decided_at: when the approval was (last) decided; NULL for a missing approval
-- column approval_id: the approval; NULL for a missing approval
-- column decision: approve or deny; NULL for a missing approval
-- column approver: who decided
-- column principal: who the agent acted for
-- column agent_id: the agent
-- column tool: the server/tool the approval is for (the call's, for a missing approval)
-- column arguments_digest: the call arguments the approval is bound to (SHA-256 of their RFC 8785 JSON); NULL: any
-- column expires_at: when the approval stops being usable; NULL: never
-- column reason: the approver's reason
-- column versions: how many approval_decided events the approval_id has
-- column outcome: used, unused, denied_then_executed, denied or missing
-- column call_id: the call that used the approval, went ahead despite the deny, or had no approval
-- column call_time: when that call was made
-- column verdict: the call's current verdict (in_scope, approval_denied, approval_missing)
-- column result_status: the call's result (ok, error, timeout); NULL: no result recorded
-- column time_to_use_ms: for a used approval, milliseconds from its decision to the call
SELECT
    decided_at,
    approval_id,
    decision,
    approver,
    principal,
    agent_id,
    tool,
    arguments_digest,
    expires_at,
    reason,
    versions,
    outcome,
    call_id,
    call_time,
    verdict,
    result_status,
    time_to_use_ms
FROM
(
    SELECT
        a.decided_at AS decided_at,
        CAST(a.approval_id AS Nullable(String)) AS approval_id,
        CAST(a.decision AS Nullable(String)) AS decision,
        CAST(a.approver AS Nullable(String)) AS approver,
        a.principal AS principal,
        a.agent_id AS agent_id,
        a.tool AS tool,
        a.arguments_digest AS arguments_digest,
        a.expires_at AS expires_at,
        CAST(a.reason AS Nullable(String)) AS reason,
        CAST(a.versions AS Nullable(UInt64)) AS versions,
        multiIf(
            u.call_id IS NULL, if(a.decision = 'approve', 'unused', 'denied'),
            u.verdict = 'approval_denied', 'denied_then_executed',
            'used'
        ) AS outcome,
        u.call_id AS call_id,
        u.call_time AS call_time,
        u.verdict AS verdict,
        u.result_status AS result_status,
        if(
            u.verdict = 'in_scope',
            toUnixTimestamp64Milli(u.call_time) - toUnixTimestamp64Milli(u.in_force_at),
            NULL
        ) AS time_to_use_ms
    FROM
    (
        -- one row per approval of a delegation: its latest decision
        SELECT
            tenant,
            approval_id,
            principal,
            agent_id,
            argMax(event_time, (event_time, event_id)) AS decided_at,
            argMax(decision, (event_time, event_id)) AS decision,
            argMax(approver, (event_time, event_id)) AS approver,
            argMax(tool, (event_time, event_id)) AS tool,
            argMax(arguments_digest, (event_time, event_id)) AS arguments_digest,
            argMax(expires_at, (event_time, event_id)) AS expires_at,
            argMax(reason, (event_time, event_id)) AS reason,
            count() AS versions
        FROM {db}.approval_events FINAL
        WHERE tenant = {tenant:String}
            AND ({principal:Nullable(String)} IS NULL OR principal = {principal:Nullable(String)})
            AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
        GROUP BY tenant, approval_id, principal, agent_id
        HAVING ({tool:Nullable(String)} IS NULL OR tool = {tool:Nullable(String)})
            AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR decided_at >= {since:Nullable(DateTime64(3, 'UTC'))})
            AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR decided_at <= {until:Nullable(DateTime64(3, 'UTC'))})
    ) AS a
    LEFT JOIN
    (
        -- the calls whose current verdict names an approval, with the approval's version in force at the call
        SELECT
            c.tenant AS tenant,
            c.approval_id AS approval_id,
            c.principal AS principal,
            c.agent_id AS agent_id,
            c.call_id AS call_id,
            any(c.call_time) AS call_time,
            any(c.verdict) AS verdict,
            any(c.result_status) AS result_status,
            max(v.event_time) AS in_force_at
        FROM
        (
            SELECT tenant, approval_id, principal, agent_id, call_id, call_time, verdict, result_status
            FROM {db}.evidence_current
            WHERE tenant = {tenant:String} AND approval_id IS NOT NULL
                AND verdict IN ('in_scope', 'approval_denied')
        ) AS c
        LEFT JOIN
        (
            SELECT tenant, approval_id, principal, agent_id, event_time
            FROM {db}.approval_events FINAL
            WHERE tenant = {tenant:String}
        ) AS v
            ON v.tenant = c.tenant AND v.approval_id = c.approval_id
            AND v.principal = c.principal AND v.agent_id = c.agent_id
        WHERE v.event_time IS NULL OR v.event_time <= c.call_time
        GROUP BY c.tenant, c.approval_id, c.principal, c.agent_id, c.call_id
    ) AS u
        ON u.tenant = a.tenant AND u.approval_id = a.approval_id
        AND u.principal = a.principal AND u.agent_id = a.agent_id

    UNION ALL

    SELECT
        NULL AS decided_at,
        NULL AS approval_id,
        NULL AS decision,
        NULL AS approver,
        principal,
        agent_id,
        concat(server, '/', tool) AS tool,
        NULL AS arguments_digest,
        NULL AS expires_at,
        NULL AS reason,
        NULL AS versions,
        'missing' AS outcome,
        call_id,
        call_time,
        verdict,
        result_status,
        NULL AS time_to_use_ms
    FROM {db}.evidence_current
    WHERE tenant = {tenant:String} AND verdict = 'approval_missing'
        AND ({principal:Nullable(String)} IS NULL OR principal = {principal:Nullable(String)})
        AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
        AND ({tool:Nullable(String)} IS NULL OR concat(server, '/', tool) = {tool:Nullable(String)})
        AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
        AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
)
ORDER BY ifNull(decided_at, call_time), approval_id NULLS LAST, call_time, call_id
SETTINGS join_use_nulls = 1
