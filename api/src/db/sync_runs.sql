-- The runs of each resource's syncs, from the event log, newest first, at
-- most $2 per resource: of the resources in $1 (a JSON array of names), or
-- of every registered resource when $1 is NULL.
--
-- A run ends at the event that completes or fails a running sync; its
-- start, end and duration are in the state that event recorded. A forced
-- restart (a running sync started again, at a later started_at) ends the
-- earlier run as ABANDONED when the new one starts. A running sync whose
-- started_at moved back (an operator's correction) is the same run.
-- History before a resource's latest removal belongs to its former self.
--
-- Cost: each resource's run ends are read backwards from the newest, in
-- the partial index of run ends, and only until $2 runs are found; the
-- latest removal and each restart's earlier start are one index lookup.
-- A long log costs nothing more. "resource = r" is written as the range
-- (r, lower) < (resource, id) <= (r, upper): with a plain equality on a
-- parameter the planner may walk the whole log backwards by id (the primary
-- key) hoping to meet $2 runs soon, which for a quiet resource never comes;
-- the range makes the (resource, id) order the only cheap one.
WITH scope AS (
    SELECT DISTINCT resource
    FROM (
        SELECT jsonb_array_elements_text($1::jsonb) AS resource WHERE $1::jsonb IS NOT NULL
        UNION ALL
        SELECT resource FROM public.vantage_sync_state WHERE $1::jsonb IS NULL
    ) asked
),
since AS (
    SELECT scope.resource, coalesce(removal.id, 0) AS removed_at
    FROM scope
    LEFT JOIN LATERAL (
        SELECT d.id
        FROM public.vantage_sync_events d
        WHERE (d.resource, d.id) >= (scope.resource, 0)
          AND (d.resource, d.id) <= (scope.resource, 9223372036854775807)
          AND d.operation = 'DELETE'
        ORDER BY d.resource DESC, d.id DESC
        LIMIT 1
    ) removal ON true
)
SELECT since.resource, run.started_at, run.completed_at, run.status,
       run.duration_ms, run.records_synced, run.error_count
FROM since
LEFT JOIN LATERAL (
    SELECT * FROM (
        SELECT e.id,
               CASE WHEN e.status = 'running' THEN earlier.started_at
                    ELSE (e.state->>'started_at')::timestamptz END AS started_at,
               CASE WHEN e.status = 'running' THEN (e.state->>'started_at')::timestamptz
                    ELSE (e.state->>'completed_at')::timestamptz END AS completed_at,
               CASE WHEN e.status = 'running' THEN 'ABANDONED' ELSE upper(e.status) END AS status,
               CASE WHEN e.status <> 'running' THEN (e.state->>'duration_ms')::integer END
                   AS duration_ms,
               CASE WHEN e.status = 'success' THEN (e.state->>'records_synced')::integer END
                   AS records_synced,
               CASE WHEN e.status = 'failed'
                    THEN jsonb_array_length(coalesce(e.state->'errors', '[]'::jsonb)) ELSE 0 END
                   AS error_count
        FROM public.vantage_sync_events e
        -- For a running sync started again: the started_at of the update
        -- before it (none when that was its creation or before a removal).
        LEFT JOIN LATERAL (
            SELECT (p.state->>'started_at')::timestamptz AS started_at
            FROM public.vantage_sync_events p
            WHERE (p.resource, p.id) > (e.resource, since.removed_at)
              AND (p.resource, p.id) < (e.resource, e.id)
              AND p.operation = 'UPDATE'
            ORDER BY p.resource DESC, p.id DESC
            LIMIT 1
        ) earlier ON e.status = 'running'
        WHERE (e.resource, e.id) > (since.resource, since.removed_at)
          AND (e.resource, e.id) <= (since.resource, 9223372036854775807)
          AND e.operation = 'UPDATE' AND e.previous_status = 'running'
          AND e.status IN ('success', 'failed', 'running')
        ORDER BY e.resource DESC, e.id DESC
    ) ends
    WHERE ends.status <> 'ABANDONED' OR ends.completed_at > ends.started_at
    LIMIT $2
) run ON true
ORDER BY since.resource, run.id DESC
