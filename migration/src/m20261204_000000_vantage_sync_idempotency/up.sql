-- Idempotency keys of mutations: the key a caller sent, the fingerprint
-- of the request it first came with, and the answer that request got.
-- Kept 24 hours, so a mutation retried under the same key (its answer was
-- lost on the way) is answered again instead of applied twice. No role
-- reads or writes it directly: only the functions below, run by the server.
CREATE TABLE IF NOT EXISTS public.vantage_sync_idempotency_keys (
    caller text NOT NULL,
    key text NOT NULL,
    fingerprint text NOT NULL,
    answer jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key),
    CONSTRAINT idempotency_key_length CHECK (char_length(key) BETWEEN 1 AND 255)
);
CREATE INDEX IF NOT EXISTS idx_vantage_sync_idempotency_keys_created
    ON public.vantage_sync_idempotency_keys (created_at);
REVOKE ALL ON TABLE public.vantage_sync_idempotency_keys
FROM PUBLIC, anon, authenticated, service_role;
ALTER TABLE public.vantage_sync_idempotency_keys ENABLE ROW LEVEL SECURITY;

-- Claims `p_key` of `p_caller` for a request with fingerprint
-- `p_fingerprint`, in the request's own transaction. No row: the key is
-- new (or its first use is over 24 hours old), and the request runs and
-- records its answer before it commits, so the key and what the request
-- did commit together or not at all. A row: the first use's fingerprint
-- and answer. A first use still running holds the key's row, so a second
-- request waits here until it commits (then gets its answer) or rolls
-- back (then claims the key itself).
CREATE OR REPLACE FUNCTION public.claim_vantage_idempotency_key(
    p_caller text,
    p_key text,
    p_fingerprint text
)
RETURNS TABLE (first_fingerprint text, first_answer jsonb)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    INSERT INTO public.vantage_sync_idempotency_keys AS used (caller, key, fingerprint)
    VALUES (p_caller, p_key, p_fingerprint)
    ON CONFLICT (caller, key) DO UPDATE
        SET fingerprint = excluded.fingerprint, answer = NULL, created_at = now()
        WHERE used.created_at < now() - interval '24 hours';
    IF FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT used.fingerprint, used.answer
        FROM public.vantage_sync_idempotency_keys AS used
        WHERE used.caller = p_caller AND used.key = p_key;
END
$$;

-- Records the answer of the request that claimed `p_key`.
CREATE OR REPLACE FUNCTION public.record_vantage_idempotent_answer(
    p_caller text,
    p_key text,
    p_answer jsonb
)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = ''
AS $$
    UPDATE public.vantage_sync_idempotency_keys
    SET answer = p_answer
    WHERE caller = p_caller AND key = p_key;
$$;

-- Deletes keys first used over 24 hours ago; how many.
CREATE OR REPLACE FUNCTION public.prune_vantage_idempotency_keys()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    deleted bigint;
BEGIN
    DELETE FROM public.vantage_sync_idempotency_keys
    WHERE created_at < now() - interval '24 hours';
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

REVOKE ALL ON FUNCTION
    public.claim_vantage_idempotency_key(text, text, text),
    public.record_vantage_idempotent_answer(text, text, jsonb),
    public.prune_vantage_idempotency_keys()
FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION
    public.claim_vantage_idempotency_key(text, text, text),
    public.record_vantage_idempotent_answer(text, text, jsonb),
    public.prune_vantage_idempotency_keys()
TO service_role;
