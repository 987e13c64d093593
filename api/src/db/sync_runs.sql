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
WITH scope AS (
    SELECT DISTINCT resource
    FROM (
        SELECT jsonb_array_elements_text($1::jsonb) AS resource WHERE $1::jsonb IS NOT NULL
        UNION ALL
        SELECT resource FROM public.vantage_sync_state WHERE $1::jsonb IS NULL
    ) asked
),
since AS (
    SELECT scope.resource, coalesce(max(e.id), 0) AS removed_at
    FROM scope
    LEFT JOIN public.vantage_sync_events e
        ON e.resource = scope.resource AND e.operation = 'DELETE'
    GROUP BY scope.resource
),
logged AS (
    SELECT e.id, e.resource, e.status, e.previous_status, e.occurred_at, e.state,
           (e.state->>'started_at')::timestamptz AS started_at,
           lag((e.state->>'started_at')::timestamptz)
               OVER (PARTITION BY e.resource ORDER BY e.id) AS earlier_started_at
    FROM public.vantage_sync_events e
    JOIN since ON since.resource = e.resource AND e.id > since.removed_at
    WHERE e.operation = 'UPDATE'
),
ended AS (
    SELECT id, resource, started_at,
           (state->>'completed_at')::timestamptz AS completed_at,
           upper(status) AS status,
           (state->>'duration_ms')::integer AS duration_ms,
           CASE WHEN status = 'success' THEN (state->>'records_synced')::integer END
               AS records_synced,
           CASE WHEN status = 'failed'
                THEN jsonb_array_length(coalesce(state->'errors', '[]'::jsonb)) ELSE 0 END
               AS error_count
    FROM logged
    WHERE previous_status = 'running' AND status IN ('success', 'failed')
    UNION ALL
    SELECT id, resource, earlier_started_at, started_at, 'ABANDONED', NULL, NULL, 0
    FROM logged
    WHERE previous_status = 'running' AND status = 'running'
      AND started_at > earlier_started_at
),
newest AS (
    SELECT ended.*, row_number() OVER (PARTITION BY resource ORDER BY id DESC) AS age
    FROM ended
)
SELECT scope.resource, newest.started_at, newest.completed_at, newest.status,
       newest.duration_ms, newest.records_synced, newest.error_count
FROM scope
LEFT JOIN newest ON newest.resource = scope.resource AND newest.age <= $2
ORDER BY scope.resource, newest.id DESC
