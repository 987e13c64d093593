-- Reverts idempotency keys: their functions and table.

DROP FUNCTION IF EXISTS public.prune_vantage_idempotency_keys();
DROP FUNCTION IF EXISTS public.record_vantage_idempotent_answer(text, text, jsonb);
DROP FUNCTION IF EXISTS public.claim_vantage_idempotency_key(text, text, text);
DROP TABLE IF EXISTS public.vantage_sync_idempotency_keys;
