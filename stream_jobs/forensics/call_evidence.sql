-- question: What is the whole record of some calls: the raw tool_call, every verdict version, and the tool_result?
-- note: The query a finding's call ids point to. Per call, in time order: its tool_call event, each evidence
--   version (at its decided_at; provisional, final and late amendments alike) and its tool_result.
-- param tenant String: the tenant
-- param call_ids Array(String): the calls (give --param call_ids=... once per call)
-- column call_id: the call
-- column at: event_time of the tool_call or tool_result; decided_at of an evidence version
-- column kind: tool_call, evidence or tool_result
-- column id: the raw event's event_id, or the evidence_id
-- column session_id: the agent session
-- column server: the MCP server (tool_call, evidence)
-- column tool: the tool (tool_call, evidence)
-- column resources: the resources the call named (tool_call)
-- column arguments: the redacted arguments as JSON (tool_call)
-- column attested: the identity claims the collector verified, as JSON (tool_call)
-- column tool_digest: hash of the tool's definition as listed (tool_call)
-- column version: the evidence version (1, 2, ...)
-- column verdict: the verdict of that version
-- column grant_id: the grant that version matched
-- column final: whether that version was final
-- column late: whether it was a late amendment
-- column reasons: why, in words
-- column facts: the facts the verdict used, as JSON
-- column result_status: ok, error or timeout (tool_result)
-- column result_duration_ms: the call's duration (tool_result)
-- column result_error: the error text (tool_result)
SELECT *
FROM
(
    SELECT
        call_id,
        event_time AS at,
        'tool_call' AS kind,
        event_id AS id,
        session_id,
        CAST(server AS Nullable(String)) AS server,
        CAST(tool AS Nullable(String)) AS tool,
        resources,
        CAST(arguments AS Nullable(String)) AS arguments,
        attested,
        tool_digest,
        CAST(NULL AS Nullable(UInt32)) AS version,
        CAST(NULL AS Nullable(String)) AS verdict,
        CAST(NULL AS Nullable(String)) AS grant_id,
        CAST(NULL AS Nullable(Bool)) AS final,
        CAST(NULL AS Nullable(Bool)) AS late,
        CAST([] AS Array(String)) AS reasons,
        CAST(NULL AS Nullable(String)) AS facts,
        CAST(NULL AS Nullable(String)) AS result_status,
        CAST(NULL AS Nullable(Float64)) AS result_duration_ms,
        CAST(NULL AS Nullable(String)) AS result_error
    FROM {db}.tool_calls FINAL
    WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id)
    UNION ALL
    SELECT
        call_id,
        decided_at AS at,
        'evidence' AS kind,
        evidence_id AS id,
        session_id,
        CAST(server AS Nullable(String)) AS server,
        CAST(tool AS Nullable(String)) AS tool,
        CAST([] AS Array(String)) AS resources,
        CAST(NULL AS Nullable(String)) AS arguments,
        CAST(NULL AS Nullable(String)) AS attested,
        CAST(NULL AS Nullable(String)) AS tool_digest,
        CAST(version AS Nullable(UInt32)) AS version,
        CAST(verdict AS Nullable(String)) AS verdict,
        matched_grant_id AS grant_id,
        CAST(final AS Nullable(Bool)) AS final,
        CAST(late AS Nullable(Bool)) AS late,
        reasons,
        CAST(facts AS Nullable(String)) AS facts,
        CAST(NULL AS Nullable(String)) AS result_status,
        CAST(NULL AS Nullable(Float64)) AS result_duration_ms,
        CAST(NULL AS Nullable(String)) AS result_error
    FROM {db}.evidence FINAL
    WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id)
    UNION ALL
    SELECT
        call_id,
        event_time AS at,
        'tool_result' AS kind,
        event_id AS id,
        session_id,
        CAST(NULL AS Nullable(String)) AS server,
        CAST(NULL AS Nullable(String)) AS tool,
        CAST([] AS Array(String)) AS resources,
        CAST(NULL AS Nullable(String)) AS arguments,
        CAST(NULL AS Nullable(String)) AS attested,
        CAST(NULL AS Nullable(String)) AS tool_digest,
        CAST(NULL AS Nullable(UInt32)) AS version,
        CAST(NULL AS Nullable(String)) AS verdict,
        CAST(NULL AS Nullable(String)) AS grant_id,
        CAST(NULL AS Nullable(Bool)) AS final,
        CAST(NULL AS Nullable(Bool)) AS late,
        CAST([] AS Array(String)) AS reasons,
        CAST(NULL AS Nullable(String)) AS facts,
        CAST(status AS Nullable(String)) AS result_status,
        CAST(duration_ms AS Nullable(Float64)) AS result_duration_ms,
        error AS result_error
    FROM {db}.tool_results FINAL
    WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id)
)
ORDER BY call_id, at, multiIf(kind = 'tool_call', 0, kind = 'evidence', 1, 2), version, id
