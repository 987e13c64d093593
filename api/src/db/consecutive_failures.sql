-- Failed completions since the latest success, per registered resource
-- that has any (what the "repeated" alert, failed 3 or more times in a
-- row, counts).
--
-- Cost: the latest success is one lookup in its partial index, and only
-- the run ends after it are read (the partial index of run ends), so a
-- long log costs nothing more. The resource is matched by a range on
-- (resource, id) rather than an equality, for the reason given in
-- sync_runs.sql.
SELECT s.resource, streak.failures
FROM public.vantage_sync_state s
LEFT JOIN LATERAL (
    SELECT w.id
    FROM public.vantage_sync_events w
    WHERE (w.resource, w.id) >= (s.resource, 0)
      AND (w.resource, w.id) <= (s.resource, 9223372036854775807)
      AND w.status = 'success'
    ORDER BY w.resource DESC, w.id DESC
    LIMIT 1
) success ON true
CROSS JOIN LATERAL (
    SELECT count(*) AS failures
    FROM public.vantage_sync_events e
    WHERE (e.resource, e.id) > (s.resource, coalesce(success.id, 0))
      AND (e.resource, e.id) <= (s.resource, 9223372036854775807)
      AND e.operation = 'UPDATE' AND e.previous_status = 'running' AND e.status = 'failed'
) streak
WHERE streak.failures > 0
