-- Reverts the event log's partial indexes (the log itself stays).

DROP INDEX IF EXISTS public.idx_vantage_sync_events_run_ends;
DROP INDEX IF EXISTS public.idx_vantage_sync_events_successes;
DROP INDEX IF EXISTS public.idx_vantage_sync_events_removals;
