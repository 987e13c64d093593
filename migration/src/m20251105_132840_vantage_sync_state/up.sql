-- Vantage sync state: one row per resource imported from the Vantage IR API.
--
-- Idempotent: applying this file to a database that already has it changes
-- nothing and does not fail. It holds no BEGIN/COMMIT of its own: the migrator
-- runs it inside one transaction, and `vantage-sync migrate sql` wraps the
-- printed copy in one.

-- Roles (Supabase already has them). Created if missing, never dropped.
DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                -- Another database of this cluster created it meanwhile.
                NULL;
            END;
        END IF;
    END LOOP;
END
$roles$;

-- The initial resources go in only when this run creates the table: one
-- deleted since must stay deleted when this file is applied again.
SELECT pg_catalog.set_config(
    'vantage_sync.creating_table',
    (pg_catalog.to_regclass('public.vantage_sync_state') IS NULL)::text,
    true
);

CREATE TABLE IF NOT EXISTS public.vantage_sync_state (
    resource          text        NOT NULL,
    last_sync_time    timestamptz,
    last_sync_status  text        NOT NULL DEFAULT 'never_run',
    records_synced    integer     NOT NULL DEFAULT 0,
    records_created   integer     NOT NULL DEFAULT 0,
    records_updated   integer     NOT NULL DEFAULT 0,
    errors            jsonb       NOT NULL DEFAULT '[]'::jsonb,
    started_at        timestamptz,
    completed_at      timestamptz,
    duration_ms       integer,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT vantage_sync_state_pkey PRIMARY KEY (resource),
    CONSTRAINT resource_format CHECK (resource ~ '^[a-z][a-z0-9_]{0,62}$'),
    CONSTRAINT valid_sync_status
        CHECK (last_sync_status IN ('success', 'failed', 'running', 'never_run')),
    -- PostgreSQL checks constraints in name order: the non_negative_* names
    -- sort first, so a negative count is reported as such rather than as an
    -- inconsistent breakdown.
    CONSTRAINT non_negative_records_synced CHECK (records_synced >= 0),
    CONSTRAINT non_negative_records_created CHECK (records_created >= 0),
    CONSTRAINT non_negative_records_updated CHECK (records_updated >= 0),
    CONSTRAINT non_negative_duration CHECK (duration_ms >= 0),
    CONSTRAINT errors_is_array CHECK (jsonb_typeof(errors) = 'array'),
    CONSTRAINT valid_sync_timerange
        CHECK (completed_at IS NULL OR started_at IS NULL OR completed_at >= started_at),
    CONSTRAINT running_incomplete
        CHECK (last_sync_status <> 'running' OR completed_at IS NULL),
    -- records_synced counts created + updated + skipped. bigint so that two
    -- large counts cannot overflow the check itself.
    CONSTRAINT records_breakdown_consistent
        CHECK (records_created::bigint + records_updated::bigint <= records_synced::bigint)
);

CREATE INDEX IF NOT EXISTS idx_vantage_sync_status
    ON public.vantage_sync_state (last_sync_status)
    WHERE last_sync_status <> 'success';
CREATE INDEX IF NOT EXISTS idx_vantage_sync_last_time
    ON public.vantage_sync_state (last_sync_time DESC NULLS LAST);
CREATE INDEX IF NOT EXISTS idx_vantage_sync_duration
    ON public.vantage_sync_state (duration_ms DESC)
    WHERE duration_ms IS NOT NULL;

COMMENT ON TABLE public.vantage_sync_state IS
    'ETL sync state of each resource imported from the Vantage IR API: one row per resource.';
COMMENT ON COLUMN public.vantage_sync_state.resource IS
    'Resource name in lower snake case (accounts, funds, cashflows, ...); primary key.';
COMMENT ON COLUMN public.vantage_sync_state.last_sync_time IS
    'Watermark for incremental syncs: completion time of the last successful sync; NULL until one succeeds.';
COMMENT ON COLUMN public.vantage_sync_state.last_sync_status IS
    'Status of the last sync: never_run, running, success or failed.';
COMMENT ON COLUMN public.vantage_sync_state.records_synced IS
    'Records processed by the last successful sync (created + updated + skipped).';
COMMENT ON COLUMN public.vantage_sync_state.records_created IS
    'Records created by the last successful sync.';
COMMENT ON COLUMN public.vantage_sync_state.records_updated IS
    'Records updated by the last successful sync.';
COMMENT ON COLUMN public.vantage_sync_state.errors IS
    'JSON array of the errors of the last failed sync (objects with code, message, recordId, timestamp, details); [] after a success.';
COMMENT ON COLUMN public.vantage_sync_state.started_at IS
    'When the current or last sync started.';
COMMENT ON COLUMN public.vantage_sync_state.completed_at IS
    'When the last sync finished, successfully or not; NULL while running.';
COMMENT ON COLUMN public.vantage_sync_state.duration_ms IS
    'Duration of the last finished sync in milliseconds (completed_at - started_at), computed by trigger.';
COMMENT ON COLUMN public.vantage_sync_state.created_at IS
    'When this resource was first registered.';
COMMENT ON COLUMN public.vantage_sync_state.updated_at IS
    'When this row last changed, maintained by trigger.';

-- Plain PostgreSQL grants nothing by default, while Supabase's default
-- privileges grant everything to anon, authenticated and service_role:
-- start from nothing and grant exactly what the contract allows.
REVOKE ALL ON TABLE public.vantage_sync_state FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.vantage_sync_state TO authenticated, service_role;
GRANT INSERT, UPDATE, DELETE ON TABLE public.vantage_sync_state TO service_role;

ALTER TABLE public.vantage_sync_state ENABLE ROW LEVEL SECURITY;

-- Created when missing, otherwise altered to these exact roles and
-- expressions: a second run converges on them without dropping anything.
DO $policies$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policies WHERE schemaname = 'public'
                   AND tablename = 'vantage_sync_state' AND policyname = 'vantage_sync_state_select_all') THEN
        CREATE POLICY vantage_sync_state_select_all ON public.vantage_sync_state
            FOR SELECT TO authenticated, service_role USING (true);
    ELSE
        ALTER POLICY vantage_sync_state_select_all ON public.vantage_sync_state
            TO authenticated, service_role USING (true);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policies WHERE schemaname = 'public'
                   AND tablename = 'vantage_sync_state' AND policyname = 'vantage_sync_state_insert_service') THEN
        CREATE POLICY vantage_sync_state_insert_service ON public.vantage_sync_state
            FOR INSERT TO service_role WITH CHECK (true);
    ELSE
        ALTER POLICY vantage_sync_state_insert_service ON public.vantage_sync_state
            TO service_role WITH CHECK (true);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policies WHERE schemaname = 'public'
                   AND tablename = 'vantage_sync_state' AND policyname = 'vantage_sync_state_update_service') THEN
        CREATE POLICY vantage_sync_state_update_service ON public.vantage_sync_state
            FOR UPDATE TO service_role USING (true) WITH CHECK (true);
    ELSE
        ALTER POLICY vantage_sync_state_update_service ON public.vantage_sync_state
            TO service_role USING (true) WITH CHECK (true);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policies WHERE schemaname = 'public'
                   AND tablename = 'vantage_sync_state' AND policyname = 'vantage_sync_state_delete_service') THEN
        CREATE POLICY vantage_sync_state_delete_service ON public.vantage_sync_state
            FOR DELETE TO service_role USING (true);
    ELSE
        ALTER POLICY vantage_sync_state_delete_service ON public.vantage_sync_state
            TO service_role USING (true);
    END IF;
END
$policies$;

-- Trigger functions. Every function pins search_path and names objects by
-- schema, so nothing a caller puts on its search_path can be substituted.
CREATE OR REPLACE FUNCTION public.update_vantage_sync_state_updated_at()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    NEW.updated_at := pg_catalog.now();
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION public.calculate_vantage_sync_duration()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = ''
AS $$
BEGIN
    -- An inverted range gets no duration, so valid_sync_timerange (not
    -- non_negative_duration) is what reports it.
    IF NEW.started_at IS NOT NULL AND NEW.completed_at IS NOT NULL
       AND NEW.completed_at >= NEW.started_at THEN
        -- Clamped to the integer range: a sync left running for more than
        -- 24.8 days must still be completable.
        NEW.duration_ms := LEAST(
            pg_catalog.floor(
                EXTRACT(EPOCH FROM (NEW.completed_at - NEW.started_at)) * 1000
            ),
            2147483647
        )::integer;
    ELSE
        NEW.duration_ms := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION public.notify_vantage_sync_state_change()
RETURNS trigger
LANGUAGE plpgsql
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

CREATE OR REPLACE TRIGGER trigger_vantage_sync_state_updated_at
    BEFORE UPDATE ON public.vantage_sync_state
    FOR EACH ROW EXECUTE FUNCTION public.update_vantage_sync_state_updated_at();
CREATE OR REPLACE TRIGGER trigger_calculate_vantage_sync_duration
    BEFORE INSERT OR UPDATE ON public.vantage_sync_state
    FOR EACH ROW EXECUTE FUNCTION public.calculate_vantage_sync_duration();
-- Created only if missing: the event log migration turns it into a
-- constraint trigger of the same name, which OR REPLACE cannot touch.
DO $notify$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                   WHERE tgrelid = 'public.vantage_sync_state'::regclass
                     AND tgname = 'trigger_vantage_sync_state_notify') THEN
        CREATE TRIGGER trigger_vantage_sync_state_notify
            AFTER INSERT OR UPDATE OR DELETE ON public.vantage_sync_state
            FOR EACH ROW EXECUTE FUNCTION public.notify_vantage_sync_state_change();
    END IF;
END
$notify$;

-- Transition functions. They are the only place the state machine lives:
--   start:    any status but running (running too with p_force) -> running
--   complete: running -> success
--   fail:     running -> failed
-- Refusals raise these SQLSTATEs (class VS, not used by PostgreSQL):
--   VS001  sync already running   (start without p_force)
--   VS002  sync not running       (complete, fail)
--   VS003  resource not found     (complete, fail)
-- Bad arguments surface as the table's own errors: 23514 check_violation
-- naming the constraint (resource_format, non_negative_records_*,
-- records_breakdown_consistent, errors_is_array) or 23502 not_null_violation.

CREATE OR REPLACE FUNCTION public.start_vantage_sync(
    p_resource text,
    p_force boolean DEFAULT false
)
RETURNS public.vantage_sync_state
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_row public.vantage_sync_state;
BEGIN
    -- One statement, so two workers racing on one resource serialise on the
    -- row lock: the second re-checks the WHERE against the first's result.
    INSERT INTO public.vantage_sync_state AS s
        (resource, last_sync_status, started_at, completed_at)
    VALUES (p_resource, 'running', pg_catalog.now(), NULL)
    ON CONFLICT (resource) DO UPDATE
        SET last_sync_status = 'running',
            started_at = pg_catalog.now(),
            completed_at = NULL
        WHERE s.last_sync_status <> 'running' OR COALESCE(p_force, false)
    RETURNING * INTO v_row;

    IF NOT FOUND THEN
        RAISE EXCEPTION 'sync of resource "%" is already running', p_resource
            USING ERRCODE = 'VS001',
                  HINT = 'Wait for it to complete or fail, or start it with p_force => true.';
    END IF;
    RETURN v_row;
END
$$;

CREATE OR REPLACE FUNCTION public.complete_vantage_sync(
    p_resource text,
    p_records_synced integer,
    p_records_created integer,
    p_records_updated integer
)
RETURNS public.vantage_sync_state
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_status text;
    v_row public.vantage_sync_state;
BEGIN
    SELECT last_sync_status INTO v_status
    FROM public.vantage_sync_state
    WHERE resource = p_resource
    FOR UPDATE;

    IF NOT FOUND THEN
        RAISE EXCEPTION 'resource "%" is not registered', p_resource
            USING ERRCODE = 'VS003';
    END IF;
    IF v_status <> 'running' THEN
        RAISE EXCEPTION 'sync of resource "%" is not running (status %)', p_resource, v_status
            USING ERRCODE = 'VS002',
                  HINT = 'Start the sync before completing it.';
    END IF;

    UPDATE public.vantage_sync_state
    SET last_sync_status = 'success',
        last_sync_time = pg_catalog.now(),
        records_synced = p_records_synced,
        records_created = p_records_created,
        records_updated = p_records_updated,
        completed_at = pg_catalog.now(),
        errors = '[]'::jsonb
    WHERE resource = p_resource
    RETURNING * INTO v_row;
    RETURN v_row;
END
$$;

CREATE OR REPLACE FUNCTION public.fail_vantage_sync(
    p_resource text,
    p_errors jsonb
)
RETURNS public.vantage_sync_state
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_status text;
    v_row public.vantage_sync_state;
BEGIN
    SELECT last_sync_status INTO v_status
    FROM public.vantage_sync_state
    WHERE resource = p_resource
    FOR UPDATE;

    IF NOT FOUND THEN
        RAISE EXCEPTION 'resource "%" is not registered', p_resource
            USING ERRCODE = 'VS003';
    END IF;
    IF v_status <> 'running' THEN
        RAISE EXCEPTION 'sync of resource "%" is not running (status %)', p_resource, v_status
            USING ERRCODE = 'VS002',
                  HINT = 'Start the sync before failing it.';
    END IF;

    -- last_sync_time is deliberately left alone: the watermark only moves on success.
    UPDATE public.vantage_sync_state
    SET last_sync_status = 'failed',
        completed_at = pg_catalog.now(),
        errors = p_errors
    WHERE resource = p_resource
    RETURNING * INTO v_row;
    RETURN v_row;
END
$$;

-- PostgreSQL lets PUBLIC execute every new function: take that back and
-- grant the transitions to service_role alone.
REVOKE ALL ON FUNCTION
    public.update_vantage_sync_state_updated_at(),
    public.calculate_vantage_sync_duration(),
    public.notify_vantage_sync_state_change(),
    public.start_vantage_sync(text, boolean),
    public.complete_vantage_sync(text, integer, integer, integer),
    public.fail_vantage_sync(text, jsonb)
FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION
    public.start_vantage_sync(text, boolean),
    public.complete_vantage_sync(text, integer, integer, integer),
    public.fail_vantage_sync(text, jsonb)
TO service_role;

INSERT INTO public.vantage_sync_state (resource)
SELECT initial.resource
FROM (VALUES
    ('accounts'),
    ('funds'),
    ('cashflows'),
    ('commitments'),
    ('investors'),
    ('investments'),
    ('valuations')
) AS initial (resource)
WHERE pg_catalog.current_setting('vantage_sync.creating_table', true) = 'true'
ON CONFLICT (resource) DO NOTHING;
