-- Reverts event traces: the lookup, the trigger, its function and the
-- table.

DROP FUNCTION IF EXISTS public.vantage_sync_notification_traces(bigint[]);
DROP TRIGGER IF EXISTS trigger_vantage_sync_event_trace ON public.vantage_sync_events;
DROP FUNCTION IF EXISTS public.vantage_sync_keep_event_trace();
DROP TABLE IF EXISTS public.vantage_sync_event_traces;
