-- 003_derived_status.sql - paycoord 0.2: a prepared debit no longer writes
-- the payment row, so nothing ever waits on a prepared transaction but a
-- second debit of the same account.
--
-- * pc_pay_debit2: the conditional debit and its ledger row only. The ledger
--   row's foreign key takes a KEY SHARE lock on the payment row, which blocks
--   neither INSERT ... ON CONFLICT (a replay of the key) nor an UPDATE of its
--   other columns (processor_ref, the final status).
-- * A payment's status is derived (payments_view.derived_status):
--   'succeeded' exactly when its ledger debit is committed (that commits with
--   COMMIT PREPARED), else the row's status. The row's own column is brought
--   up to date after the commit, asynchronously; recovery repairs it when that
--   write is lost.
-- * pc_pay_intent2, pc_pay_settle2 and the batched success write store the
--   created_at/updated_at the client was told, so a row reads back exactly
--   as the first answer.
-- * pc_pay_settle2: the durable final status of a payment that holds no
--   prepared debit, writing the row anew if PostgreSQL lost it.
-- * pc_account_open: never waits on an account row that a prepared debit holds.
-- * pc_fence: make sure a lost session of ours is gone before reading what it
--   did (its application_name is the pool's fence token).

CREATE FUNCTION pc_pay_debit2(p_payment_id uuid, p_account text, p_amount bigint)
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
    RETURN 'prepared';
END $$;

CREATE VIEW payments_view AS
SELECT p.*,
       CASE WHEN EXISTS (SELECT 1 FROM ledger l WHERE l.payment_id = p.payment_id) THEN 'succeeded'
            WHEN p.status = 'succeeded' THEN 'pending'      -- no committed debit: not (yet) succeeded
            ELSE p.status END AS derived_status
  FROM payments p;

-- A time the daemon told a client, as Unix milliseconds; NULL: now().
CREATE FUNCTION pc_ms(p_ms bigint) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
    SELECT 'epoch'::timestamptz + p_ms * interval '1 millisecond'
$$;

-- The intent, as pc_pay_intent, with the created_at the client is told.
CREATE FUNCTION pc_pay_intent2(p_payment_id uuid, p_key text, p_account text, p_amount bigint,
                               p_currency text, p_reference text, p_metadata jsonb,
                               p_gid text, p_node text, p_deadline_ms bigint, p_created_ms bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pc_check_account(p_account, p_currency);
    -- A replay finds the stored row without waiting on anything (a plain
    -- read): INSERT ... ON CONFLICT alone would wait on a row that a prepared
    -- transaction of paycoord 0.1 still holds.
    IF EXISTS (SELECT 1 FROM payments WHERE idempotency_key = p_key) THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'PCDUP';
    END IF;
    INSERT INTO payments (payment_id, idempotency_key, account_id, amount, currency, reference,
                          metadata, gid, node, deadline, created_at, updated_at)
    VALUES (p_payment_id, p_key, p_account, p_amount, p_currency, p_reference, p_metadata,
            p_gid, p_node, now() + p_deadline_ms * interval '1 millisecond',
            pc_ms(p_created_ms), pc_ms(p_created_ms))
    ON CONFLICT (idempotency_key) DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'PCDUP';
    END IF;
END $$;

CREATE FUNCTION pc_pay_settle2(p_payment_id uuid, p_status text, p_decline_code text, p_processor_ref text,
                               p_key text, p_account text, p_amount bigint, p_currency text,
                               p_reference text, p_gid text, p_node text, p_deadline_ms bigint,
                               p_created_ms bigint, p_updated_ms bigint)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE payments SET status = p_status, decline_code = p_decline_code,
                        processor_ref = coalesce(p_processor_ref, processor_ref),
                        updated_at = coalesce(pc_ms(p_updated_ms), now())
     WHERE payment_id = p_payment_id AND status = 'pending'
       AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.payment_id = p_payment_id);
    IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM payments WHERE payment_id = p_payment_id) THEN
        IF p_account IS NULL THEN
            RETURN '';                       -- no row, and nothing to write one from
        END IF;
        INSERT INTO payments (payment_id, idempotency_key, account_id, amount, currency, reference, gid, node,
                              status, decline_code, processor_ref, deadline, created_at, updated_at)
        VALUES (p_payment_id, p_key, p_account, p_amount, p_currency, p_reference, p_gid, p_node,
                p_status, p_decline_code, p_processor_ref, now() + p_deadline_ms * interval '1 millisecond',
                coalesce(pc_ms(p_created_ms), now()), coalesce(pc_ms(p_updated_ms), now()))
        ON CONFLICT DO NOTHING;
        IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM payments WHERE payment_id = p_payment_id) THEN
            RETURN 'conflict';               -- the key or gid belongs to another payment now
        END IF;
    END IF;
    SELECT derived_status INTO v_status FROM payments_view WHERE payment_id = p_payment_id;
    RETURN v_status;
END $$;

CREATE FUNCTION pc_account_open(p_account text, p_currency text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    -- An existing row is seen without waiting, even while a prepared debit
    -- holds it (INSERT ... ON CONFLICT alone would wait for that debit).
    IF EXISTS (SELECT 1 FROM accounts WHERE id = p_account) THEN
        RETURN false;
    END IF;
    INSERT INTO accounts (id, currency) VALUES (p_account, p_currency) ON CONFLICT (id) DO NOTHING;
    RETURN FOUND;
END $$;

CREATE FUNCTION pc_fence(p_session text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    IF p_session IS NULL OR p_session = '' THEN
        RETURN true;
    END IF;
    PERFORM pg_terminate_backend(pid, 2000) FROM pg_stat_activity
      WHERE application_name = p_session AND pid <> pg_backend_pid();
    SELECT count(*) INTO n FROM pg_stat_activity WHERE application_name = p_session AND pid <> pg_backend_pid();
    RETURN n = 0;
END $$;
