-- 004_lean_payment_path.sql - paycoord 0.2: less work for PostgreSQL per
-- payment, same behaviour.
--
-- * payments_pending (account_id) WHERE status = 'pending' is dropped: its
--   only reader was the `balance` read's sum of held debits, which now starts
--   from pg_prepared_xacts (a handful of rows) and finds each payment by its
--   gid. Every intent wrote an entry into it, and every success a removal.
-- * pc_pay_intent2 keeps its signature and its errors, but the common case
--   (a new key on a known account of the right currency) is one statement:
--   the account check, the replay check and the insert together. The
--   diagnosis (unknown account, currency mismatch, the key exists) runs only
--   when nothing was inserted. A replay still never waits on anything: the
--   key's committed row is seen by the statement's snapshot and nothing is
--   inserted then.

DROP INDEX IF EXISTS payments_pending;

CREATE OR REPLACE FUNCTION pc_pay_intent2(p_payment_id uuid, p_key text, p_account text, p_amount bigint,
                                          p_currency text, p_reference text, p_metadata jsonb,
                                          p_gid text, p_node text, p_deadline_ms bigint, p_created_ms bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO payments (payment_id, idempotency_key, account_id, amount, currency, reference,
                          metadata, gid, node, deadline, created_at, updated_at)
    SELECT p_payment_id, p_key, a.id, p_amount, p_currency, p_reference, p_metadata,
           p_gid, p_node, now() + p_deadline_ms * interval '1 millisecond',
           pc_ms(p_created_ms), pc_ms(p_created_ms)
      FROM accounts a
     WHERE a.id = p_account AND a.currency = p_currency
       AND NOT EXISTS (SELECT 1 FROM payments WHERE idempotency_key = p_key)
    ON CONFLICT (idempotency_key) DO NOTHING;
    IF NOT FOUND THEN
        PERFORM pc_check_account(p_account, p_currency);    -- PCUA1, PCCM1
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'PCDUP';
    END IF;
END $$;
