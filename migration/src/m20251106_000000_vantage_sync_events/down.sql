-- Reverts the event log: the change trigger goes back to a plain AFTER
-- trigger that only notifies (as the first migration defined it), then the
-- log and its functions go.

DROP TRIGGER IF EXISTS trigger_vantage_sync_state_notify ON public.vantage_sync_state;

CREATE OR REPLACE FUNCTION public.notify_vantage_sync_state_change()
RETURNS trigger
LANGUAGE plpgsql
SECURITY INVOKER
SET search_path = ''
AS $$
BEGIN
    -- Only the operation and the resource name (at most 63 bytes): far below
    -- NOTIFY's 8000-byte limit whatever the size of the row's errors.
    PERFORM pg_catalog.pg_notify(
        'vantage_sync_state_changes',
        pg_catalog.json_build_object(
            'operation', TG_OP,
            'resource', CASE WHEN TG_OP = 'DELETE' THEN OLD.resource ELSE NEW.resource END
        )::text
    );
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION public.notify_vantage_sync_state_change()
FROM PUBLIC, anon, authenticated, service_role;
CREATE OR REPLACE TRIGGER trigger_vantage_sync_state_notify
    AFTER INSERT OR UPDATE OR DELETE ON public.vantage_sync_state
    FOR EACH ROW EXECUTE FUNCTION public.notify_vantage_sync_state_change();

DROP FUNCTION IF EXISTS public.prune_vantage_sync_events(interval);
DROP TABLE IF EXISTS public.vantage_sync_events_pruned;
DROP TABLE IF EXISTS public.vantage_sync_events;
