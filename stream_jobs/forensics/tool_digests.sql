-- question: Did a tool's definition change under a delegation? The delegation's calls to the tool with their
--   tool_digest, in time order.
-- note: Calls attributed to the delegation (evidence_current) with the tool_digest the collector saw (tool_calls).
--   changed is true when a call's digest differs from the previous call's to the same server/tool.
-- param tenant String: the tenant
-- param principal String: the human or service the agent acted for
-- param agent_id String: the agent
-- param server Nullable(String) = NULL: only this MCP server; NULL: every server
-- param tool Nullable(String) = NULL: only this tool; NULL: every tool
-- param since Nullable(DateTime64(3, 'UTC')) = NULL: calls at or after this time (RFC 3339); NULL: from the first
-- param until Nullable(DateTime64(3, 'UTC')) = NULL: calls at or before this time (RFC 3339); NULL: up to the last
-- column call_time: when the call was made
-- column call_id: the call
-- column session_id: the agent session
-- column server: the MCP server
-- column tool: the tool called
-- column tool_digest: hash of the tool's definition as listed when the call was made (NULL: not known)
-- column previous_digest: the digest of the previous call to the same server/tool (in the range)
-- column changed: the digest differs from the previous call's
-- column verdict: the call's current verdict
-- column grant_id: the grant the verdict matched
SELECT
    call_time,
    call_id,
    session_id,
    server,
    tool,
    tool_digest,
    previous_digest,
    CAST(seq > 1 AND ifNull(previous_digest, '') != ifNull(tool_digest, '') AS Bool) AS changed,
    verdict,
    grant_id
FROM
(
    SELECT
        e.call_time AS call_time,
        e.call_id AS call_id,
        e.session_id AS session_id,
        e.server AS server,
        e.tool AS tool,
        c.tool_digest AS tool_digest,
        e.verdict AS verdict,
        e.matched_grant_id AS grant_id,
        row_number() OVER w AS seq,
        lagInFrame(c.tool_digest) OVER w AS previous_digest
    FROM
    (
        SELECT *
        FROM {db}.evidence_current
        WHERE tenant = {tenant:String}
            AND principal = {principal:String}
            AND agent_id = {agent_id:String}
            AND ({server:Nullable(String)} IS NULL OR server = {server:Nullable(String)})
            AND ({tool:Nullable(String)} IS NULL OR tool = {tool:Nullable(String)})
            AND ({since:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time >= {since:Nullable(DateTime64(3, 'UTC'))})
            AND ({until:Nullable(DateTime64(3, 'UTC'))} IS NULL OR call_time <= {until:Nullable(DateTime64(3, 'UTC'))})
    ) AS e
    LEFT JOIN
    (
        SELECT tenant, call_id, tool_digest
        FROM {db}.tool_calls FINAL
        WHERE tenant = {tenant:String}
        ORDER BY event_time, event_id
        LIMIT 1 BY tenant, call_id
    ) AS c ON c.tenant = e.tenant AND c.call_id = e.call_id
    WINDOW w AS (
        PARTITION BY e.server, e.tool ORDER BY e.call_time, e.call_id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
    )
)
ORDER BY call_time, call_id
SETTINGS join_use_nulls = 1
