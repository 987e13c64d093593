-- Partial indexes of the event log for the reads that look for one kind
-- of event of one resource: its latest removal, its latest success, and the
-- ends of its runs (trends, failure streaks). With only the (resource, id)
-- index, each of these walked the resource's whole history, and with a
-- parameterised resource the planner preferred walking the whole log
-- backwards by id; the log keeps 30 days of changes, so those reads grew
-- with it (the load tool's soak found the board's reads slowing as the log
-- filled). Each index holds only the events it is for.
--
-- Idempotent, no BEGIN/COMMIT (see the first migration).

CREATE INDEX IF NOT EXISTS idx_vantage_sync_events_removals
    ON public.vantage_sync_events (resource, id)
    WHERE operation = 'DELETE';

CREATE INDEX IF NOT EXISTS idx_vantage_sync_events_successes
    ON public.vantage_sync_events (resource, id)
    WHERE status = 'success';

CREATE INDEX IF NOT EXISTS idx_vantage_sync_events_run_ends
    ON public.vantage_sync_events (resource, id)
    WHERE operation = 'UPDATE' AND previous_status = 'running';
