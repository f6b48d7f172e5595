-- question: What is the whole record of some calls: the raw tool_call, every verdict version, and the tool_result?
-- note: The query a finding's call ids point to. Per call, in time order: its tool_call event, each evidence
--   version (at its decided_at; provisional, final and late amendments alike) and its tool_result. An evidence
--   version references the facts it rests on (fact_ids, fact_hashes); referenced_facts shows them as the raw
--   tables hold them. Evidence written before fact references has the facts copied in facts instead.
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
-- column facts: the facts the verdict used, copied as JSON (evidence written before fact references; later: {})
-- column fact_ids: event ids of the identity and consent facts the verdict rests on (evidence)
-- column fact_hashes: the record hash of each of those facts when the verdict was made ("": not known)
-- column referenced_facts: those facts read from identity_events / consent_events, as a JSON array in fact_ids
--   order: per fact its event_id, record_hash (from the evidence), found (the raw row exists), hash_matches
--   (the raw row's _record_hash equals record_hash; null when the hash is not known) and fact (the raw row's
--   fields, null when not found); NULL when the version references no facts
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
        CAST([] AS Array(String)) AS fact_ids,
        CAST([] AS Array(String)) AS fact_hashes,
        CAST(NULL AS Nullable(String)) AS referenced_facts,
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
        ev.evidence_id AS id,
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
        rl.reasons AS reasons,
        CAST(facts AS Nullable(String)) AS facts,
        fl.fact_ids AS fact_ids,
        fl.fact_hashes AS fact_hashes,
        CAST(r.referenced_facts AS Nullable(String)) AS referenced_facts,
        CAST(NULL AS Nullable(String)) AS result_status,
        CAST(NULL AS Nullable(Float64)) AS result_duration_ms,
        CAST(NULL AS Nullable(String)) AS result_error
    FROM
    (
        SELECT * FROM {db}.evidence_rows FINAL WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id)
    ) AS ev
    -- the calls' lists only: read by primary key (the evidence view would hash the whole list tables)
    ANY LEFT JOIN
    (
        SELECT id, reasons FROM {db}.evidence_reason_lists
        WHERE id IN (SELECT reason_key FROM {db}.evidence_rows WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id))
    ) AS rl ON rl.id = ev.reason_key
    ANY LEFT JOIN
    (
        SELECT id, fact_ids, fact_hashes FROM {db}.evidence_fact_lists
        WHERE id IN (SELECT fact_key FROM {db}.evidence_rows WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id))
    ) AS fl ON fl.id = ev.fact_key
    LEFT JOIN
    (
        -- each version's referenced facts, looked up by event_id in the raw tables, in fact_ids order
        SELECT
            x.evidence_id AS evidence_id,
            concat(
                '[',
                arrayStringConcat(
                    arrayMap(
                        p -> p.2,
                        arraySort(
                            p -> p.1,
                            groupArray(
                                (
                                    x.pos,
                                    concat(
                                        substring(
                                            toJSONString(
                                                CAST(
                                                    (
                                                        x.fact_id,
                                                        x.fact_hash,
                                                        f.event_id IS NOT NULL,
                                                        if(
                                                            x.fact_hash = '' OR f.event_id IS NULL,
                                                            NULL,
                                                            f.stored_hash = x.fact_hash
                                                        )
                                                    ),
                                                    'Tuple(event_id String, record_hash String, found Bool,
                                                    hash_matches Nullable(Bool))'
                                                )
                                            ) AS head,
                                            1,
                                            length(head) - 1
                                        ),
                                        ',"fact":',
                                        ifNull(f.fact, 'null'),
                                        '}'
                                    )
                                )
                            )
                        )
                    ),
                    ','
                ),
                ']'
            ) AS referenced_facts
        FROM
        (
            SELECT
                e.evidence_id AS evidence_id,
                e.tenant AS tenant,
                arrayJoin(arrayEnumerate(l.fact_ids)) AS pos,
                l.fact_ids[pos] AS fact_id,
                l.fact_hashes[pos] AS fact_hash
            FROM (SELECT evidence_id, tenant, fact_key FROM {db}.evidence_rows FINAL WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id)) AS e
            ANY LEFT JOIN
            (
                SELECT id, fact_ids, fact_hashes FROM {db}.evidence_fact_lists
                WHERE id IN (SELECT fact_key FROM {db}.evidence_rows WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id))
            ) AS l ON l.id = e.fact_key
        ) AS x
        LEFT JOIN
        (
            SELECT
                tenant,
                event_id,
                _record_hash AS stored_hash,
                toJSONString(
                    CAST(
                        (event_id, event_type, event_time, session_id, principal, agent_id, valid_from, valid_until),
                        'Tuple(event_id String, event_type String, event_time DateTime64(3, \'UTC\'), session_id String,
                        principal Nullable(String), agent_id Nullable(String), valid_from Nullable(DateTime64(3, \'UTC\')),
                        valid_until Nullable(DateTime64(3, \'UTC\')))'
                    )
                ) AS fact
            FROM {db}.identity_events FINAL
            WHERE tenant = {tenant:String}
            UNION ALL
            SELECT
                tenant,
                event_id,
                _record_hash AS stored_hash,
                toJSONString(
                    CAST(
                        (
                            event_id, event_type, event_time, grant_id, principal, agent_id, tools, resources, not_before,
                            expires_at, revoked_by, reason
                        ),
                        'Tuple(event_id String, event_type String, event_time DateTime64(3, \'UTC\'), grant_id String,
                        principal String, agent_id String, tools Array(String), resources Array(String),
                        not_before Nullable(DateTime64(3, \'UTC\')), expires_at Nullable(DateTime64(3, \'UTC\')),
                        revoked_by Nullable(String), reason Nullable(String))'
                    )
                ) AS fact
            FROM {db}.consent_events FINAL
            WHERE tenant = {tenant:String}
        ) AS f ON f.tenant = x.tenant AND f.event_id = x.fact_id
        GROUP BY x.evidence_id
    ) AS r ON r.evidence_id = ev.evidence_id
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
        CAST([] AS Array(String)) AS fact_ids,
        CAST([] AS Array(String)) AS fact_hashes,
        CAST(NULL AS Nullable(String)) AS referenced_facts,
        CAST(status AS Nullable(String)) AS result_status,
        CAST(duration_ms AS Nullable(Float64)) AS result_duration_ms,
        error AS result_error
    FROM {db}.tool_results FINAL
    WHERE tenant = {tenant:String} AND has({call_ids:Array(String)}, call_id)
)
ORDER BY call_id, at, multiIf(kind = 'tool_call', 0, kind = 'evidence', 1, 2), version, id
SETTINGS join_use_nulls = 1
