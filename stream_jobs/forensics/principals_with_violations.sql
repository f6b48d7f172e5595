-- question: Whose agents had violations? Principals ranked by how many of their agents' calls were judged
--   other than in_scope.
-- note: A violation is a call whose current verdict is anything but in_scope. Calls on unbound sessions name no
--   principal and are not counted here (see session_timeline). Ties are ranked by tenant, then principal.
-- param tenant Nullable(String) = NULL: only this tenant; NULL: every tenant
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: calls at or after this time (RFC 3339); NULL: from the first
-- param until Nullable(DateTime64(3, 'UTC')) = NULL: calls at or before this time (RFC 3339); NULL: up to the last
-- param limit UInt32 = 100: at most this many principals
-- column rank: 1 for the principal with the most violations
-- column tenant: the tenant
-- column principal: the human or service the agents acted for
-- column violations: the principal's calls judged other than in_scope
-- column calls: all the principal's calls in the range
-- column violating_agents: how many of the principal's agents had a violation
-- column verdicts: the violating verdicts seen, sorted
-- column first_violation: call time of the first violation
-- column last_violation: call time of the last violation
SELECT
    row_number() OVER (ORDER BY violations DESC, tenant, principal) AS rank,
    tenant,
    principal,
    violations,
    calls,
    violating_agents,
    verdicts,
    first_violation,
    last_violation
FROM
(
    SELECT
        tenant,
        principal,
        countIf(verdict != 'in_scope') AS violations,
        count() AS calls,
        uniqExactIf(agent_id, verdict != 'in_scope') AS violating_agents,
        arraySort(groupUniqArrayIf(toString(verdict), verdict != 'in_scope')) AS verdicts,
        minIf(call_time, verdict != 'in_scope') AS first_violation,
        maxIf(call_time, verdict != 'in_scope') AS last_violation
    FROM {db}.evidence_current
    WHERE principal IS NOT NULL
        AND ({tenant:Nullable(String)} IS NULL OR tenant = {tenant:Nullable(String)})
        AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
        AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
    GROUP BY tenant, principal
    HAVING violations > 0
)
ORDER BY rank
LIMIT {limit:UInt32}
