-- question: Which grants were never used: issued, but no call was ever judged in_scope under them?
-- note: One row per grant (tenant, principal, agent, grant_id) with its latest issued version. A grant counts as
--   used when some call's current verdict is in_scope with matched_grant_id = the grant; calls that matched it
--   but were refused (revoked_grant, expired_grant, not_yet_valid) are counted in refused_calls. "Never" means up
--   to the data stored now: a grant still active may yet be used.
-- param tenant Nullable(String) = NULL: only this tenant; NULL: every tenant
-- param principal Nullable(String) = NULL: only grants of this principal; NULL: every principal
-- param agent_id Nullable(String) = NULL: only grants to this agent; NULL: every agent
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: grants first issued at or after this time (RFC 3339); NULL: all
-- param until Nullable(DateTime64(3, 'UTC')) = NULL: grants first issued at or before this time (RFC 3339); NULL: all
-- column tenant: the tenant
-- column grant_id: the grant
-- column principal: who granted the authority (the delegation's principal)
-- column agent_id: the agent it was granted to
-- column issued_at: event_time of the grant's first grant_issued
-- column versions: how many grant_issued versions it has
-- column tools: tool patterns of the latest version
-- column resources: resource patterns of the latest version (empty: unrestricted)
-- column not_before: not_before of the latest version
-- column expires_at: expires_at of the latest version (NULL: no expiry)
-- column granted_by: who issued the latest version
-- column purpose: the latest version's purpose
-- column revoked_at: event_time of the latest grant_revoked (NULL: never revoked)
-- column refused_calls: calls that matched the grant but were refused
SELECT
    g.tenant AS tenant,
    g.grant_id AS grant_id,
    g.principal AS principal,
    g.agent_id AS agent_id,
    g.issued_at AS issued_at,
    g.versions AS versions,
    g.latest_tools AS tools,
    g.latest_resources AS resources,
    g.latest_not_before AS not_before,
    g.latest_expires_at AS expires_at,
    g.latest_granted_by AS granted_by,
    g.latest_purpose AS purpose,
    g.revoked_at AS revoked_at,
    ifNull(u.refused_calls, 0) AS refused_calls
FROM
(
    SELECT
        tenant,
        grant_id,
        principal,
        agent_id,
        minIf(event_time, event_type = 'grant_issued') AS issued_at,
        countIf(event_type = 'grant_issued') AS versions,
        argMaxIf(tools, (event_time, event_id), event_type = 'grant_issued') AS latest_tools,
        argMaxIf(resources, (event_time, event_id), event_type = 'grant_issued') AS latest_resources,
        argMaxIf(not_before, (event_time, event_id), event_type = 'grant_issued') AS latest_not_before,
        argMaxIf(expires_at, (event_time, event_id), event_type = 'grant_issued') AS latest_expires_at,
        argMaxIf(granted_by, (event_time, event_id), event_type = 'grant_issued') AS latest_granted_by,
        argMaxIf(purpose, (event_time, event_id), event_type = 'grant_issued') AS latest_purpose,
        if(
            countIf(event_type = 'grant_revoked') = 0, NULL, maxIf(event_time, event_type = 'grant_revoked')
        ) AS revoked_at
    FROM {db}.consent_events FINAL
    WHERE ({tenant:Nullable(String)} IS NULL OR tenant = {tenant:Nullable(String)})
        AND ({principal:Nullable(String)} IS NULL OR principal = {principal:Nullable(String)})
        AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
    GROUP BY tenant, grant_id, principal, agent_id
    HAVING versions > 0
        AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR issued_at >= {since:Nullable(DateTime64(3, 'UTC'))})
        AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR issued_at <= {until:Nullable(DateTime64(3, 'UTC'))})
) AS g
LEFT JOIN
(
    SELECT
        tenant,
        assumeNotNull(matched_grant_id) AS used_grant_id,
        assumeNotNull(principal) AS used_principal,
        assumeNotNull(agent_id) AS used_agent_id,
        countIf(verdict = 'in_scope') AS in_scope_calls,
        countIf(verdict != 'in_scope') AS refused_calls
    FROM {db}.evidence_current
    WHERE matched_grant_id IS NOT NULL AND principal IS NOT NULL AND agent_id IS NOT NULL
    GROUP BY tenant, used_grant_id, used_principal, used_agent_id
) AS u
    ON u.tenant = g.tenant AND u.used_grant_id = g.grant_id AND u.used_principal = g.principal
    AND u.used_agent_id = g.agent_id
WHERE ifNull(u.in_scope_calls, 0) = 0
ORDER BY tenant, principal, agent_id, issued_at, grant_id
SETTINGS join_use_nulls = 1
