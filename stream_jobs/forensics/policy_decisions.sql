-- question: Which calls were judged under Cedar policies, and what did the policies decide: which policy ids and
--   versions, Allow or Deny, which policies determined it, and which errors?
-- note: Calls whose current verdict (evidence_current) records a policy evaluation: the grant the verdict matched
--   is conditioned on policies (policy_versions not empty, or a decision, or errors). policy_versions lists
--   policy_id@version of every policy Cedar evaluated (the versions in force at the call); policy_reasons the @id
--   (policy_id@version#n) of the policies that determined the decision: for a Deny, the forbid (or no permit)
--   that refused the call. policy_errors holds Cedar's errors and missing or unparseable versions (fail closed).
-- note: resources and labels: the call's resources (tool_calls) -- the labels Cedar saw come from them.
-- param tenant String: the tenant
-- param principal Nullable(String) = NULL: only this principal; NULL: every principal
-- param agent_id Nullable(String) = NULL: only this agent; NULL: every agent
-- param policy_id Nullable(String) = NULL: only calls that evaluated this policy (any version); NULL: every policy
-- param decision Nullable(String) = NULL: only this Cedar decision (Allow or Deny); NULL: both
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: calls at or after this time (RFC 3339); NULL: from the first
-- param until Nullable(DateTime64(3, 'UTC')) = NULL: calls at or before this time (RFC 3339); NULL: up to the last
-- column call_time: when the call was made
-- column call_id: the call
-- column principal: who the agent acted for
-- column agent_id: the agent
-- column session_id: the agent session
-- column server: the MCP server
-- column tool: the tool called
-- column resources: the call's resources (NULL: the raw call is not stored)
-- column verdict: the call's current verdict (out_of_policy when the policies refused it)
-- column grant_id: the grant whose policies were evaluated
-- column policy_versions: policy_id@version of each policy evaluated
-- column policy_decision: Cedar's decision, Allow or Deny
-- column determining_policies: the @id of each policy that determined the decision
-- column policy_errors: Cedar's errors, and policy versions missing or unparseable at the call
-- column history_complete: false when the call was judged on history compacted past it (re-judge with replay)
SELECT
    e.call_time AS call_time,
    e.call_id AS call_id,
    e.principal AS principal,
    e.agent_id AS agent_id,
    e.session_id AS session_id,
    e.server AS server,
    e.tool AS tool,
    c.resources AS resources,
    e.verdict AS verdict,
    e.matched_grant_id AS grant_id,
    e.policy_versions AS policy_versions,
    e.policy_decision AS policy_decision,
    e.policy_reasons AS determining_policies,
    e.policy_errors AS policy_errors,
    e.history_complete AS history_complete
FROM
(
    SELECT *
    FROM {db}.evidence_current
    WHERE tenant = {tenant:String}
        AND (notEmpty(policy_versions) OR policy_decision IS NOT NULL OR notEmpty(policy_errors))
        AND ({principal:Nullable(String)} IS NULL OR principal = {principal:Nullable(String)})
        AND ({agent_id:Nullable(String)} IS NULL OR agent_id = {agent_id:Nullable(String)})
        AND (
            {policy_id:Nullable(String)} IS NULL
            OR arrayExists(v -> startsWith(v, concat({policy_id:Nullable(String)}, '@')), policy_versions)
        )
        AND ({decision:Nullable(String)} IS NULL OR policy_decision = {decision:Nullable(String)})
        AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
        AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
) AS e
LEFT JOIN
(
    SELECT tenant, call_id, any(resources) AS resources
    FROM {db}.tool_calls FINAL
    WHERE tenant = {tenant:String}
    GROUP BY tenant, call_id
) AS c ON c.tenant = e.tenant AND c.call_id = e.call_id
ORDER BY call_time, call_id
SETTINGS join_use_nulls = 1
