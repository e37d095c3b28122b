-- 002_functions.sql - the statements of the hot path, as functions so each
-- phase is one round trip. Errors the daemon maps to protocol codes use
-- SQLSTATE class 'PC':
--   PCUA1 unknown_account      PCCM1 currency_mismatch      PCDUP duplicate key
--   PCNSF insufficient funds   PCNPD payment not pending
-- docs/schema.md lists which transaction calls which function.

-- The account exists and holds this currency, or PCUA1 / PCCM1.
CREATE FUNCTION pc_check_account(p_account text, p_currency text)
RETURNS void LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_currency text;
BEGIN
    SELECT currency INTO v_currency FROM accounts WHERE id = p_account;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown account %', p_account USING ERRCODE = 'PCUA1';
    END IF;
    IF v_currency <> p_currency THEN
        RAISE EXCEPTION 'account % holds %, not %', p_account, v_currency, p_currency
            USING ERRCODE = 'PCCM1';
    END IF;
END $$;

-- Phase 0 (asynchronous commit, folded into phase 1's round trip): record the
-- intent. Committed before the debit is prepared so that a replay of the key
-- never waits on a prepared transaction's uncommitted insert.
CREATE FUNCTION pc_pay_intent(p_payment_id uuid, p_key text, p_account text, p_amount bigint,
                              p_currency text, p_reference text, p_metadata jsonb,
                              p_gid text, p_node text, p_deadline_ms bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pc_check_account(p_account, p_currency);
    INSERT INTO payments (payment_id, idempotency_key, account_id, amount, currency, reference,
                          metadata, gid, node, deadline)
    VALUES (p_payment_id, p_key, p_account, p_amount, p_currency, p_reference, p_metadata,
            p_gid, p_node, now() + p_deadline_ms * interval '1 millisecond')
    ON CONFLICT (idempotency_key) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'PCDUP';
    END IF;
END $$;

-- Phase 1 (ends in PREPARE TRANSACTION): conditional debit, ledger row, and
-- status 'succeeded' written inside the transaction that is then prepared, so
-- the status shows only if the debit commits. Insufficient funds raises PCNSF:
-- the transaction aborts and is never prepared (every prepared transaction of
-- ours is a real debit), and the daemon records 'insufficient_funds' with
-- pc_pay_settle in a transaction of its own.
CREATE FUNCTION pc_pay_debit(p_payment_id uuid, p_account text, p_amount bigint)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_balance bigint;
BEGIN
    UPDATE accounts SET balance = balance - p_amount, updated_at = now()
     WHERE id = p_account AND balance >= p_amount
    RETURNING balance INTO v_balance;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'insufficient funds on %', p_account USING ERRCODE = 'PCNSF';
    END IF;
    INSERT INTO ledger (account_id, amount, balance_after, payment_id)
    VALUES (p_account, -p_amount, v_balance, p_payment_id);
    UPDATE payments SET status = 'succeeded', updated_at = now()
     WHERE payment_id = p_payment_id AND status = 'pending';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'payment % is not pending', p_payment_id USING ERRCODE = 'PCNPD';
    END IF;
    RETURN 'prepared';
END $$;

-- Settle a payment that never had a prepared debit (insufficient funds, or
-- declined before/without a debit) or whose debit was rolled back. Only a
-- 'pending' row changes; returns the row's status afterwards.
CREATE FUNCTION pc_pay_settle(p_payment_id uuid, p_status text, p_decline_code text,
                              p_processor_ref text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE payments SET status = p_status, decline_code = p_decline_code,
                        processor_ref = coalesce(p_processor_ref, processor_ref), updated_at = now()
     WHERE payment_id = p_payment_id AND status = 'pending'
    RETURNING status INTO v_status;
    IF NOT FOUND THEN
        SELECT status INTO v_status FROM payments WHERE payment_id = p_payment_id;
    END IF;
    RETURN v_status;
END $$;

-- Apply every accepted credit of an account, oldest first, if its row lock can
-- be had at once. Returns the number applied, or -1 if the row is locked (a
-- payment is prepared on it): the credits stay accepted and are applied later.
CREATE FUNCTION pc_apply_credits(p_account text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    c record;
    v_balance bigint;
    n integer := 0;
BEGIN
    BEGIN
        PERFORM 1 FROM accounts WHERE id = p_account FOR UPDATE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN -1;
    END;
    FOR c IN SELECT credit_id, amount FROM credits
              WHERE account_id = p_account AND status = 'accepted'
              ORDER BY created_at, credit_id FOR UPDATE
    LOOP
        UPDATE accounts SET balance = balance + c.amount, updated_at = now()
         WHERE id = p_account RETURNING balance INTO v_balance;
        INSERT INTO ledger (account_id, amount, balance_after, credit_id)
        VALUES (p_account, c.amount, v_balance, c.credit_id);
        UPDATE credits SET status = 'applied', applied_at = now() WHERE credit_id = c.credit_id;
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

-- A credit: durable at once. Applied in the same transaction when the account
-- row is free (p_apply and no lock held on it), otherwise left 'accepted'.
-- Returns 'applied' or 'accepted'.
CREATE FUNCTION pc_credit(p_credit_id uuid, p_key text, p_account text, p_amount bigint,
                          p_currency text, p_reference text, p_apply boolean)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pc_check_account(p_account, p_currency);
    INSERT INTO credits (credit_id, idempotency_key, account_id, amount, currency, reference, status)
    VALUES (p_credit_id, p_key, p_account, p_amount, p_currency, p_reference, 'accepted')
    ON CONFLICT (idempotency_key) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'PCDUP';
    END IF;
    IF p_apply AND pc_apply_credits(p_account) >= 0 THEN
        RETURN 'applied';
    END IF;
    RETURN 'accepted';
END $$;
