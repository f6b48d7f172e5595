-- question: When did each agent first use each tool (and which tools did agents start using recently)?
-- note: One row per tenant, agent and server/tool, from the calls' current evidence (the agent is the one the call
--   was attributed to; calls on unbound sessions name none and are left out). With since, only the tools an agent
--   used for the first time at or after it.
-- param tenant Nullable(String) = NULL: only this tenant; NULL: every tenant
-- param agent_id Nullable(String) = NULL: only this agent; NULL: every agent
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: only tools first seen at or after this time (RFC 3339); NULL: all
-- column tenant: the tenant
-- column agent_id: the agent
-- column server: the MCP server
-- column tool: the tool
-- column first_seen: call time of the agent's first call to the tool
-- column first_call_id: that first call
-- column first_principal: who the agent acted for in that first call
-- column first_verdict: that first call's current verdict
-- column last_seen: call time of the agent's latest call to the tool
-- column calls: how many calls the agent made to the tool
SELECT
    tenant,
    agent_id,
    server,
    tool,
    min(call_time) AS first_seen,
    argMin(call_id, (call_time, call_id)) AS first_call_id,
    argMin(principal, (call_time, call_id)) AS first_principal,
    argMin(verdict, (call_time, call_id)) AS first_verdict,
    max(call_time) AS last_seen,
    count() AS calls
FROM {db}.evidence_current
WHERE agent_id IS NOT NULL
    AND ({tenant:Nullable(String)} IS NULL OR tenant = {tenant:Nullable(String)})
    AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
GROUP BY tenant, agent_id, server, tool
HAVING {since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR first_seen >= {since:Nullable(DateTime64(3, 'UTC'))}
ORDER BY tenant, agent_id, first_seen, server, tool
