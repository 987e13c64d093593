-- Reverts up.sql, in dependency order. The roles anon, authenticated and
-- service_role stay: other objects (and Supabase itself) may rely on them.

-- The transition functions return the table's row type, so they go first.
DROP FUNCTION IF EXISTS public.start_vantage_sync(text, boolean);
DROP FUNCTION IF EXISTS public.complete_vantage_sync(text, integer, integer, integer);
DROP FUNCTION IF EXISTS public.fail_vantage_sync(text, jsonb);

-- Triggers, policies, indexes, constraints and comments go with the table.
DROP TABLE IF EXISTS public.vantage_sync_state;

DROP FUNCTION IF EXISTS public.notify_vantage_sync_state_change();
DROP FUNCTION IF EXISTS public.calculate_vantage_sync_duration();
DROP FUNCTION IF EXISTS public.update_vantage_sync_state_updated_at();
