-- Reverts alerts and webhooks: their functions, tables and private
-- schema go, and pruning goes back to the event log's own definition.

DROP FUNCTION IF EXISTS public.advance_vantage_sync_notifications(integer);
DROP FUNCTION IF EXISTS public.vantage_sync_settle_alerts(text, text[], text[], timestamptz, jsonb, bigint);
DROP FUNCTION IF EXISTS public.vantage_sync_notify(text, text, text, timestamptz, jsonb, bigint);
DROP FUNCTION IF EXISTS public.vantage_sync_failure_streak(text, bigint);
DROP FUNCTION IF EXISTS public.vantage_sync_alerts_holding(jsonb, bigint, timestamptz);
DROP FUNCTION IF EXISTS public.create_vantage_webhook(text, text[], text[], text, text);
DROP FUNCTION IF EXISTS public.delete_vantage_webhook(uuid);
DROP FUNCTION IF EXISTS public.ping_vantage_webhook(uuid);
DROP FUNCTION IF EXISTS public.claim_vantage_webhook_deliveries(integer, interval, integer);
DROP FUNCTION IF EXISTS public.record_vantage_webhook_attempts(jsonb, interval);
DROP FUNCTION IF EXISTS public.record_vantage_webhook_attempt(uuid, uuid, bigint, integer, text, integer, interval, boolean);

DROP TABLE IF EXISTS vantage_sync_private.webhook_secrets;
DROP SCHEMA IF EXISTS vantage_sync_private;
DROP TABLE IF EXISTS public.vantage_sync_webhook_deliveries;
DROP TABLE IF EXISTS public.vantage_sync_webhook_outbox;
DROP TABLE IF EXISTS public.vantage_sync_webhooks;
DROP TABLE IF EXISTS public.vantage_sync_notify_progress;
DROP TABLE IF EXISTS public.vantage_sync_notifications;
DROP TABLE IF EXISTS public.vantage_sync_alerts;

CREATE OR REPLACE FUNCTION public.prune_vantage_sync_events(p_older_than interval)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_through bigint;
    v_deleted bigint;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        RAISE EXCEPTION 'p_older_than must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    SELECT max(id) INTO v_through
    FROM public.vantage_sync_events
    WHERE occurred_at < pg_catalog.clock_timestamp() - p_older_than;
    IF v_through IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM public.vantage_sync_events WHERE id <= v_through;
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    UPDATE public.vantage_sync_events_pruned
    SET through = GREATEST(through, v_through);
    RETURN v_deleted;
END
$$;
REVOKE ALL ON FUNCTION public.prune_vantage_sync_events(interval)
FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.prune_vantage_sync_events(interval) TO service_role;
