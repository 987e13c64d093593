-- Which trace wrote each change: a writer that sets
-- `vantage_sync.traceparent` for its transaction (the server does, for a
-- traced mutation; an SQL session may too) has its W3C traceparent kept
-- with the events its transaction logs, and a webhook delivery of such a
-- change links to that trace. A transaction that sets nothing costs
-- nothing: the trigger's WHEN clause skips it without calling anything.
--
-- Idempotent, no BEGIN/COMMIT (see the first migration).

-- One row per traced event, gone with its event. No role reads or writes
-- it directly.
CREATE TABLE IF NOT EXISTS public.vantage_sync_event_traces (
    event_id     bigint NOT NULL,
    traceparent  text   NOT NULL,
    CONSTRAINT vantage_sync_event_traces_pkey PRIMARY KEY (event_id),
    CONSTRAINT vantage_sync_event_traces_event FOREIGN KEY (event_id)
        REFERENCES public.vantage_sync_events (id) ON DELETE CASCADE,
    CONSTRAINT valid_traceparent
        CHECK (traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$')
);
REVOKE ALL ON TABLE public.vantage_sync_event_traces
FROM PUBLIC, anon, authenticated, service_role;
ALTER TABLE public.vantage_sync_event_traces ENABLE ROW LEVEL SECURITY;
COMMENT ON TABLE public.vantage_sync_event_traces IS
    'The W3C traceparent of the transaction that wrote an event, when it set vantage_sync.traceparent.';

-- Keeps the writer's traceparent with a new event. A value that is not a
-- well-formed traceparent is ignored: tracing never fails a write.
CREATE OR REPLACE FUNCTION public.vantage_sync_keep_event_trace()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_traceparent text := pg_catalog.current_setting('vantage_sync.traceparent', true);
BEGIN
    IF v_traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
        INSERT INTO public.vantage_sync_event_traces (event_id, traceparent)
        VALUES (NEW.id, v_traceparent)
        ON CONFLICT (event_id) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION public.vantage_sync_keep_event_trace()
FROM PUBLIC, anon, authenticated, service_role;

CREATE OR REPLACE TRIGGER trigger_vantage_sync_event_trace
    AFTER INSERT ON public.vantage_sync_events
    FOR EACH ROW
    WHEN (pg_catalog.current_setting('vantage_sync.traceparent', true) <> '')
    EXECUTE FUNCTION public.vantage_sync_keep_event_trace();

-- The events that notifications were made from, and their writers'
-- traceparents, for the server to link a delivery's span to the change
-- that caused it. Read only when traces are on.
CREATE OR REPLACE FUNCTION public.vantage_sync_notification_traces(p_notifications bigint[])
RETURNS TABLE (notification_id bigint, event_id bigint, traceparent text)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = ''
AS $$
    SELECT n.id, n.event_id, t.traceparent
    FROM public.vantage_sync_notifications n
    LEFT JOIN public.vantage_sync_event_traces t ON t.event_id = n.event_id
    WHERE n.id = ANY (p_notifications)
$$;
REVOKE ALL ON FUNCTION public.vantage_sync_notification_traces(bigint[])
FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.vantage_sync_notification_traces(bigint[]) TO service_role;
