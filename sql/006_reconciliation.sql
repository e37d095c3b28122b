-- 006_reconciliation.sql - reconciliation: compare our books with the
-- processor's own list of payments, record every difference with the
-- evidence of both sides, and settle it by hand with an audit trail
-- (docs/reconciliation.md).
--
-- * recon_runs: one row per run over a window. The cursor (the processor's
--   position after the last page stored) and the counts change in the same
--   transaction as that page's discrepancies, so a run that stops anywhere
--   resumes after the last page it stored: nothing lost, nothing counted
--   twice. At most one run is 'running' at a time (a unique index), on top of
--   the advisory lock the daemon holds while it drives one.
-- * recon_seen: the gids a run saw at the processor, so that its last step
--   can find our succeeded payments the processor never listed. Emptied when
--   the run ends.
-- * discrepancies: one row per difference (gid, kind and the two sides'
--   nets), first and last seen, open until settled (or until both sides
--   agree again). A gid's net here is its committed debit plus the
--   compensating entries already posted for it; the processor's net is what
--   it charged and did not refund. So a settled difference matches on the
--   next run, and a later change (a refund after a compensating debit, say)
--   is a new difference.
-- * discrepancy_settlements: every settlement by hand, written 'requested'
--   before the action, its outcome after (like resolutions).
-- * ledger.discrepancy_id: a compensating entry is a new ledger row that
--   names the discrepancy it settles; history is never edited, and the
--   balance stays the sum of the ledger (I1) and never negative (I4).

CREATE TABLE recon_runs (
    run_id          bigserial PRIMARY KEY,
    window_from     timestamptz NOT NULL,
    window_to       timestamptz NOT NULL CHECK (window_to > window_from),
    source          text NOT NULL CHECK (source IN ('generic', 'stripe', 'adyen_csv')),
    source_path     text CHECK (octet_length(source_path) <= 1024),
    trigger         text NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    state           text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'failed')),
    cursor          text NOT NULL DEFAULT '' CHECK (octet_length(cursor) <= 200),
    pages           integer NOT NULL DEFAULT 0,
    seen            bigint NOT NULL DEFAULT 0,       -- processor records read
    matched         bigint NOT NULL DEFAULT 0,       -- ours, and both sides agree
    in_progress     bigint NOT NULL DEFAULT 0,       -- still moving on either side: checked again next run
    differences     bigint NOT NULL DEFAULT 0,       -- records that are a discrepancy (found or seen again)
    not_ours        bigint NOT NULL DEFAULT 0,       -- records without our gid prefix
    missing_there   bigint NOT NULL DEFAULT 0,       -- our succeeded payments the processor never listed
    node            text NOT NULL,
    actor_uid       integer,
    error           text,
    started_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE UNIQUE INDEX recon_one_running ON recon_runs ((true)) WHERE state = 'running';
CREATE INDEX recon_runs_window ON recon_runs (window_from, window_to);

CREATE TABLE recon_seen (
    run_id          bigint NOT NULL REFERENCES recon_runs (run_id),
    gid             text NOT NULL,
    PRIMARY KEY (run_id, gid)
);

CREATE TABLE discrepancies (
    discrepancy_id  bigserial PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('charged_not_debited', 'debited_not_charged', 'amount_mismatch',
                                                  'unknown_gid', 'review')),
    gid             text NOT NULL CHECK (length(gid) < 208),
    payment_id      uuid,
    account_id      text,
    ours            jsonb,               -- our side: {payment_id, account, amount, currency, status} or null (no row)
    theirs          jsonb,               -- the processor's: {id, status, amount, currency, refunded, account} or null
    our_net         bigint NOT NULL,     -- debited here for the gid: its committed debit + compensating entries
    their_net       bigint NOT NULL,     -- charged there and not refunded (0 for a review flag)
    detail          text NOT NULL,
    state           text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    resolution      text,
    first_seen      timestamptz NOT NULL DEFAULT now(),
    last_seen       timestamptz NOT NULL DEFAULT now(),
    first_run       bigint REFERENCES recon_runs (run_id),
    last_run        bigint REFERENCES recon_runs (run_id),
    resolved_at     timestamptz,
    UNIQUE (gid, kind, our_net, their_net)
);
CREATE INDEX discrepancies_open ON discrepancies (kind) WHERE state = 'open';

CREATE TABLE discrepancy_settlements (
    settlement_id   bigserial PRIMARY KEY,
    discrepancy_id  bigint NOT NULL REFERENCES discrepancies (discrepancy_id),
    action          text NOT NULL CHECK (action IN ('credit', 'debit', 'accept')),
    outcome         text NOT NULL,       -- 'requested', then settled | refused | failed: ...
    reason          text NOT NULL CHECK (octet_length(reason) BETWEEN 1 AND 500),
    actor_uid       integer,
    node            text NOT NULL,
    account_id      text,                -- the account the operator named (when neither side names one)
    entry_id        bigint,              -- the compensating ledger entry, if one was posted
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);

-- A compensating entry names its discrepancy (and neither a payment nor a
-- credit); it may go either way.
ALTER TABLE ledger ADD COLUMN discrepancy_id bigint REFERENCES discrepancies (discrepancy_id);
ALTER TABLE ledger DROP CONSTRAINT ledger_check;
ALTER TABLE ledger DROP CONSTRAINT ledger_check1;
ALTER TABLE ledger ADD CONSTRAINT ledger_one_source
    CHECK (num_nonnulls(payment_id, credit_id, discrepancy_id) = 1);
ALTER TABLE ledger ADD CONSTRAINT ledger_sign
    CHECK ((payment_id IS NOT NULL AND amount < 0) OR (credit_id IS NOT NULL AND amount > 0)
           OR discrepancy_id IS NOT NULL);
CREATE UNIQUE INDEX ledger_one_entry_per_settlement ON ledger (discrepancy_id) WHERE discrepancy_id IS NOT NULL;

-- The shape of the gids paycoord makes (proto/gid.h): pc:<node>:<the payment
-- id in 26 lower-case base32 characters>, or 32 hex digits (paycoord 0.1).
CREATE FUNCTION pc_gid_wellformed(p_gid text) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT p_gid ~ '^pc:[A-Za-z0-9_-]{1,32}:([a-z2-7]{26}|[0-9a-f]{32})$'
$$;

-- Start a run, or hand back the one still running (a crashed or stopped
-- run resumes before anything new starts). p_only_if_new (the schedule):
-- start nothing when a run of this window finished or is running already.
-- p_resume_only: start nothing new at all. Returns the run's row (or none).
CREATE FUNCTION pc_recon_start(p_from timestamptz, p_to timestamptz, p_source text, p_path text, p_trigger text,
                               p_node text, p_uid integer, p_only_if_new boolean, p_resume_only boolean)
RETURNS SETOF recon_runs LANGUAGE plpgsql AS $$
DECLARE
    v recon_runs;
BEGIN
    SELECT * INTO v FROM recon_runs WHERE state = 'running';
    IF FOUND THEN
        UPDATE recon_runs SET node = p_node, updated_at = now() WHERE run_id = v.run_id RETURNING * INTO v;
        RETURN NEXT v;
        RETURN;
    END IF;
    IF p_resume_only THEN
        RETURN;
    END IF;
    IF p_only_if_new AND EXISTS (SELECT 1 FROM recon_runs WHERE window_from = p_from AND window_to = p_to
                                                            AND state = 'done') THEN
        RETURN;
    END IF;
    INSERT INTO recon_runs (window_from, window_to, source, source_path, trigger, node, actor_uid)
    VALUES (p_from, p_to, p_source, p_path, p_trigger, p_node, p_uid) RETURNING * INTO v;
    RETURN NEXT v;
END $$;

-- One page of the processor's list: classify each record against our side,
-- store the differences, and move the run's cursor from p_prev to p_next,
-- all in one transaction. A page applied already (the cursor moved on) is
-- refused with PCRCS and changes nothing.
-- p_items: [{gid, id, status, refunded, refunded_amount, amount, currency, account}] with
-- status succeeded | declined | pending | canceled; refunded_amount only for a
-- partial refund (the processor kept amount - refunded_amount).
-- Returns {seen, matched, in_progress, differences, not_ours}.
CREATE FUNCTION pc_recon_page(p_run bigint, p_prev text, p_next text, p_items jsonb)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    v_counts bigint[];
BEGIN
    UPDATE recon_runs SET cursor = p_next, pages = pages + 1, updated_at = now()
     WHERE run_id = p_run AND state = 'running' AND cursor = p_prev;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is not running at cursor %', p_run, p_prev USING ERRCODE = 'PCRCS';
    END IF;

    IF to_regclass('pg_temp.recon_page') IS NULL THEN
        CREATE TEMP TABLE recon_page (
            gid text, id text, status text, refunded boolean, refunded_amount bigint, amount bigint, currency text,
            account text, payment_id uuid, our_account text, our_amount bigint, our_currency text, our_status text,
            prepared boolean, comp bigint, our_net bigint, their_net bigint, kind text) ON COMMIT DELETE ROWS;
    END IF;

    INSERT INTO recon_page
    SELECT i.gid, i.id, i.status, coalesce(i.refunded, false), i.refunded_amount, i.amount, upper(i.currency),
           i.account,
           p.payment_id, p.account_id, p.amount, p.currency, p.derived_status,
           EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = i.gid AND x.database = current_database()),
           (SELECT coalesce(-sum(l.amount), 0) FROM discrepancies d JOIN ledger l USING (discrepancy_id)
             WHERE d.gid = i.gid),
           NULL, NULL, NULL
      FROM jsonb_to_recordset(p_items) AS i(gid text, id text, status text, refunded boolean, refunded_amount bigint,
                                            amount bigint, currency text, account text)
      LEFT JOIN payments_view p ON p.gid = i.gid;

    UPDATE recon_page SET
        our_net = CASE WHEN our_status = 'succeeded' THEN our_amount ELSE 0 END + comp,
        their_net = CASE WHEN status <> 'succeeded' THEN 0
                         WHEN refunded AND refunded_amount > 0 AND refunded_amount < amount THEN amount - refunded_amount
                         WHEN refunded THEN 0
                         ELSE coalesce(amount, 0) END;
    UPDATE recon_page SET kind = CASE
        WHEN gid IS NULL OR left(gid, 3) <> 'pc:' THEN 'not_ours'
        WHEN prepared OR status = 'pending' OR our_status = 'pending' THEN 'in_progress'
        WHEN our_net = their_net AND (their_net = 0 OR our_currency IS NULL OR currency = our_currency) THEN 'matched'
        WHEN payment_id IS NULL AND comp = 0 AND their_net > 0 AND NOT pc_gid_wellformed(gid) THEN 'unknown_gid'
        WHEN our_net = 0 AND their_net > 0 THEN 'charged_not_debited'
        WHEN our_net > 0 AND their_net = 0 THEN 'debited_not_charged'
        ELSE 'amount_mismatch' END;

    INSERT INTO recon_seen (run_id, gid)
    SELECT DISTINCT p_run, gid FROM recon_page WHERE gid IS NOT NULL AND kind <> 'not_ours'
    ON CONFLICT DO NOTHING;

    -- A gid may come twice in one page (a settlement report lists a refund
    -- as its own row): its last record decides.
    IF to_regclass('pg_temp.recon_last') IS NULL THEN
        CREATE TEMP TABLE recon_last (LIKE recon_page) ON COMMIT DELETE ROWS;
    END IF;
    INSERT INTO recon_last
    SELECT DISTINCT ON (gid) * FROM recon_page WHERE kind <> 'not_ours' ORDER BY gid, refunded DESC;

    -- An open difference of a gid that now differs otherwise is out of date.
    UPDATE discrepancies d SET state = 'resolved', resolved_at = now(), last_run = p_run,
           resolution = 'superseded: the sides changed since (run ' || p_run || ')'
      FROM recon_last r
     WHERE d.gid = r.gid AND d.state = 'open' AND d.kind <> 'review'
       AND r.kind NOT IN ('matched', 'in_progress')
       AND (d.kind, d.our_net, d.their_net) IS DISTINCT FROM (r.kind, r.our_net, r.their_net);

    INSERT INTO discrepancies AS d (kind, gid, payment_id, account_id, ours, theirs, our_net, their_net, detail,
                                    first_run, last_run)
    SELECT kind, gid, payment_id, coalesce(our_account, account),
           CASE WHEN payment_id IS NULL AND comp = 0 THEN NULL ELSE
               jsonb_build_object('payment_id', payment_id, 'account', our_account, 'amount', our_amount,
                                  'currency', our_currency, 'status', our_status, 'compensated', comp) END,
           jsonb_build_object('id', id, 'status', status, 'amount', amount, 'currency', currency,
                              'refunded', refunded, 'refunded_amount', refunded_amount, 'account', account),
           our_net, their_net,
           CASE kind
               WHEN 'unknown_gid' THEN 'the processor charged a gid under our prefix that paycoord never makes'
               WHEN 'charged_not_debited' THEN
                   CASE WHEN payment_id IS NULL THEN 'the processor charged it; no payment row here'
                        ELSE 'the processor charged it; here it is ' || our_status || ', with no debit' END
               WHEN 'debited_not_charged' THEN
                   'debited here; the processor says ' || CASE WHEN refunded THEN 'refunded' ELSE status END
               ELSE 'debited ' || our_net || ' ' || coalesce(our_currency, currency) || ' here; the processor charged '
                    || their_net || ' ' || currency END,
           p_run, p_run
      FROM recon_last
     WHERE kind IN ('unknown_gid', 'charged_not_debited', 'debited_not_charged', 'amount_mismatch')
    ON CONFLICT (gid, kind, our_net, their_net) DO UPDATE
        SET last_seen = now(), last_run = p_run, theirs = EXCLUDED.theirs;

    -- Both sides agree now (it was in progress, or was settled elsewhere): nothing left to settle.
    UPDATE discrepancies d SET state = 'resolved', resolved_at = now(), last_run = p_run,
           resolution = 'both sides agree (run ' || p_run || ')'
      FROM recon_last r
     WHERE r.kind = 'matched' AND d.gid = r.gid AND d.state = 'open' AND d.kind <> 'review';

    SELECT ARRAY[count(*),
                 count(*) FILTER (WHERE kind = 'matched'),
                 count(*) FILTER (WHERE kind = 'in_progress'),
                 count(*) FILTER (WHERE kind IN ('unknown_gid', 'charged_not_debited', 'debited_not_charged',
                                                 'amount_mismatch')),
                 count(*) FILTER (WHERE kind = 'not_ours')]
      INTO v_counts FROM recon_page;
    UPDATE recon_runs SET seen = seen + v_counts[1], matched = matched + v_counts[2],
           in_progress = in_progress + v_counts[3], differences = differences + v_counts[4],
           not_ours = not_ours + v_counts[5]
     WHERE run_id = p_run;
    TRUNCATE recon_page, recon_last;
    RETURN v_counts;
END $$;

-- The run's last step: our succeeded payments of the window that the
-- processor never listed, and recovery's review flags that hold no prepared
-- transaction (so that operators have one list). Marks the run done.
-- Only payments created p_settle_ms (the payment deadline) before the run
-- started count as missing: a later one's processor record may have been
-- made after the listing passed its place (it is checked by the next run).
-- Returns {missing_there, reviews, open discrepancies}.
CREATE FUNCTION pc_recon_finish(p_run bigint, p_error text, p_settle_ms bigint)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    v recon_runs;
    v_missing bigint := 0;
    v_reviews bigint := 0;
    v_open bigint;
BEGIN
    SELECT * INTO v FROM recon_runs WHERE run_id = p_run AND state = 'running' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is not running', p_run USING ERRCODE = 'PCRCS';
    END IF;
    IF p_error IS NULL THEN
        WITH missing AS (
            INSERT INTO discrepancies AS d (kind, gid, payment_id, account_id, ours, theirs, our_net, their_net, detail,
                                            first_run, last_run)
            SELECT 'debited_not_charged', m.gid, m.payment_id, m.account_id,
                   jsonb_build_object('payment_id', m.payment_id, 'account', m.account_id, 'amount', m.amount,
                                      'currency', m.currency, 'status', m.derived_status, 'compensated', m.comp),
                   NULL, m.amount + m.comp, 0, 'debited here; the processor has no record of it', p_run, p_run
              FROM (SELECT p.*, (SELECT coalesce(-sum(l.amount), 0) FROM discrepancies d2 JOIN ledger l
                                 USING (discrepancy_id) WHERE d2.gid = p.gid) AS comp
                      FROM payments_view p
                     WHERE p.created_at >= v.window_from AND p.created_at < v.window_to
                       AND p.created_at < v.started_at - p_settle_ms * interval '1 millisecond'
                       AND p.derived_status = 'succeeded'
                       AND NOT EXISTS (SELECT 1 FROM recon_seen s WHERE s.run_id = p_run AND s.gid = p.gid)) m
             WHERE m.amount + m.comp <> 0
            ON CONFLICT (gid, kind, our_net, their_net) DO UPDATE SET last_seen = now(), last_run = p_run
            RETURNING 1)
        SELECT count(*) INTO v_missing FROM missing;

        WITH reviews AS (
            INSERT INTO discrepancies AS d (kind, gid, payment_id, account_id, ours, theirs, our_net, their_net, detail,
                                            first_run, last_run)
            SELECT 'review', s.gid, p.payment_id, p.account_id,
                   CASE WHEN p.payment_id IS NULL THEN NULL ELSE
                       jsonb_build_object('payment_id', p.payment_id, 'account', p.account_id, 'amount', p.amount,
                                          'currency', p.currency, 'status', p.derived_status) END,
                   NULL, 0, 0, 'recovery flagged it for review: ' || coalesce(s.last_error, 'no reason recorded'),
                   p_run, p_run
              FROM recovery_state s LEFT JOIN payments_view p ON p.gid = s.gid
             WHERE s.review
               AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = s.gid)
            ON CONFLICT (gid, kind, our_net, their_net) DO UPDATE SET last_seen = now(), last_run = p_run
            RETURNING 1)
        SELECT count(*) INTO v_reviews FROM reviews;
    END IF;
    DELETE FROM recon_seen WHERE run_id = p_run;
    UPDATE recon_runs SET state = CASE WHEN p_error IS NULL THEN 'done' ELSE 'failed' END, error = p_error,
           missing_there = v_missing, updated_at = now(), finished_at = now()
     WHERE run_id = p_run;
    SELECT count(*) INTO v_open FROM discrepancies WHERE state = 'open';
    RETURN ARRAY[v_missing, v_reviews, v_open];
END $$;

-- Settle a discrepancy by hand, after its audit row (p_settlement, outcome
-- 'requested') has been committed. In one transaction: the compensating
-- entry (or none for accept), the discrepancy resolved, a review flag
-- cleared, the audit row's outcome. Refusals change nothing but the audit
-- row. Returns {outcome, message, amount, account, entry_id}.
CREATE FUNCTION pc_discrepancy_settle(p_settlement bigint)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    s discrepancy_settlements;
    d discrepancies;
    v_need text;            -- the direction this kind calls for: credit, debit, either, none
    v_amount bigint;
    v_currency text;
    v_account text;
    v_acct accounts;
    v_balance bigint;
    v_entry bigint;
    v_msg text;
BEGIN
    SELECT * INTO s FROM discrepancy_settlements WHERE settlement_id = p_settlement FOR UPDATE;
    IF NOT FOUND OR s.outcome <> 'requested' THEN
        RAISE EXCEPTION 'settlement % is not requested', p_settlement USING ERRCODE = 'PCRCS';
    END IF;
    SELECT * INTO d FROM discrepancies WHERE discrepancy_id = s.discrepancy_id FOR UPDATE;
    IF d.state <> 'open' THEN
        UPDATE discrepancy_settlements SET outcome = 'refused: already resolved', finished_at = now()
         WHERE settlement_id = p_settlement;
        RETURN jsonb_build_object('outcome', 'refused', 'message',
                                  'discrepancy ' || d.discrepancy_id || ' is resolved already (' ||
                                  coalesce(d.resolution, '') || ')');
    END IF;

    v_account := coalesce(d.ours->>'account', d.theirs->>'account', d.account_id);
    IF s.account_id IS NOT NULL AND v_account IS NOT NULL AND s.account_id <> v_account THEN
        v_msg := 'the discrepancy names account ' || v_account || ', not ' || s.account_id;
    END IF;
    v_account := coalesce(v_account, s.account_id);
    -- What makes the two nets equal: a debit of the gap when the processor
    -- holds more, a credit when we do.
    v_amount := d.their_net - d.our_net;
    v_currency := coalesce(d.ours->>'currency', d.theirs->>'currency');
    IF d.kind = 'review' THEN              -- the operator knows which way
        v_need := 'either'; v_amount := (d.ours->>'amount')::bigint;
    ELSIF d.ours->>'currency' IS NOT NULL AND d.theirs->>'currency' IS NOT NULL
          AND d.ours->>'currency' <> d.theirs->>'currency' THEN
        v_need := 'none';
    ELSIF v_amount > 0 THEN
        v_need := 'debit';
    ELSE
        v_need := 'credit'; v_amount := -v_amount;
    END IF;

    IF s.action <> 'accept' THEN
        IF v_need = 'none' THEN
            v_msg := 'the currencies differ (' || (d.ours->>'currency') || ' here, ' || (d.theirs->>'currency')
                     || ' at the processor): no compensating entry can make them agree; correct it at the processor, then accept';
        ELSIF v_need <> 'either' AND v_need <> s.action THEN
            v_msg := 'this discrepancy calls for a ' || v_need || ' of ' || v_amount || ' ' || coalesce(v_currency, '')
                     || ', not a ' || s.action;
        ELSIF v_msg IS NULL AND v_account IS NULL THEN
            v_msg := 'neither side names an account (a settlement report does not): name it (account), '
                     || 'or settle it at the processor and accept';
        ELSIF v_msg IS NULL AND (v_amount IS NULL OR v_amount <= 0) THEN
            v_msg := 'no amount is known for it: settle it at the processor, then accept';
        END IF;
        IF v_msg IS NULL THEN
            SELECT * INTO v_acct FROM accounts WHERE id = v_account FOR NO KEY UPDATE;
            IF NOT FOUND THEN
                v_msg := 'account ' || v_account || ' does not exist';
            ELSIF v_acct.currency IS DISTINCT FROM v_currency THEN
                v_msg := 'account ' || v_account || ' is in ' || v_acct.currency || ', the amount in ' || coalesce(v_currency, '?');
            ELSIF s.action = 'debit' AND v_acct.balance < v_amount THEN
                v_msg := 'account ' || v_account || ' holds ' || v_acct.balance || ' ' || v_acct.currency
                         || ', less than the compensating debit of ' || v_amount
                         || ' (a balance never goes negative): credit the account or recover the money first, then settle again';
            END IF;
        END IF;
        IF v_msg IS NOT NULL THEN
            UPDATE discrepancy_settlements SET outcome = 'refused: ' || left(v_msg, 400), finished_at = now()
             WHERE settlement_id = p_settlement;
            RETURN jsonb_build_object('outcome', 'refused', 'message', v_msg);
        END IF;
        UPDATE accounts SET balance = balance + CASE WHEN s.action = 'credit' THEN v_amount ELSE -v_amount END,
                            updated_at = now()
         WHERE id = v_account RETURNING balance INTO v_balance;
        INSERT INTO ledger (account_id, amount, balance_after, discrepancy_id)
        VALUES (v_account, CASE WHEN s.action = 'credit' THEN v_amount ELSE -v_amount END, v_balance, d.discrepancy_id)
        RETURNING entry_id INTO v_entry;
    END IF;

    UPDATE discrepancies SET state = 'resolved', resolved_at = now(),
           resolution = s.action || ' by uid ' || coalesce(s.actor_uid::text, '?') || ': ' || s.reason
     WHERE discrepancy_id = d.discrepancy_id;
    IF d.kind = 'review' THEN
        UPDATE recovery_state SET review = false, last_error = 'settled as discrepancy ' || d.discrepancy_id,
                                  updated_at = now()
         WHERE gid = d.gid;
    END IF;
    UPDATE discrepancy_settlements SET outcome = 'settled', entry_id = v_entry, finished_at = now()
     WHERE settlement_id = p_settlement;
    RETURN jsonb_build_object('outcome', 'settled', 'amount', CASE WHEN s.action = 'accept' THEN NULL ELSE v_amount END,
                              'account', CASE WHEN s.action = 'accept' THEN NULL ELSE v_account END,
                              'entry_id', v_entry, 'balance', v_balance);
END $$;

-- The ledger audit: I1 (a balance is the sum of its ledger entries), I4 (no
-- balance, no balance_after negative), every succeeded payment has exactly
-- one debit entry and every other none, every applied credit exactly one
-- entry. p_account NULL: every account. One row per offender.
CREATE FUNCTION pc_audit(p_account text)
RETURNS TABLE (check_name text, account_id text, subject text, detail text) LANGUAGE sql STABLE AS $$
    SELECT 'I1', a.id, a.id, 'balance ' || a.balance || ' but the ledger sums to ' || coalesce(l.total, 0)
      FROM accounts a LEFT JOIN (SELECT l.account_id, sum(l.amount) AS total FROM ledger l GROUP BY l.account_id) l
           ON l.account_id = a.id
     WHERE (p_account IS NULL OR a.id = p_account) AND a.balance <> coalesce(l.total, 0)
    UNION ALL
    SELECT 'I4', a.id, a.id, 'balance ' || a.balance || ' is negative'
      FROM accounts a WHERE (p_account IS NULL OR a.id = p_account) AND a.balance < 0
    UNION ALL
    SELECT 'I4', l.account_id, l.entry_id::text, 'ledger entry leaves balance_after ' || l.balance_after
      FROM ledger l WHERE (p_account IS NULL OR l.account_id = p_account) AND l.balance_after < 0
    UNION ALL
    SELECT 'one_debit', p.account_id, p.gid,
           'payment ' || p.payment_id || ' (row status ' || p.status || ') has ' || count(l.entry_id) || ' debit entries'
      FROM payments p LEFT JOIN ledger l ON l.payment_id = p.payment_id
     WHERE (p_account IS NULL OR p.account_id = p_account)
       AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts x WHERE x.gid = p.gid)
     GROUP BY p.payment_id, p.account_id, p.gid, p.status
    HAVING (p.status = 'succeeded' AND count(l.entry_id) <> 1)
        OR (p.status IN ('declined', 'insufficient_funds') AND count(l.entry_id) <> 0)
        OR count(l.entry_id) > 1
    UNION ALL
    SELECT 'one_debit', l.account_id, l.entry_id::text, 'ledger entry ' || l.entry_id || ' debits '
           || l.account_id || ' for another account''s payment ' || p.payment_id
      FROM ledger l JOIN payments p ON p.payment_id = l.payment_id
     WHERE (p_account IS NULL OR l.account_id = p_account) AND (p.account_id <> l.account_id OR l.amount <> -p.amount)
    UNION ALL
    SELECT 'credit', c.account_id, c.credit_id::text, 'applied credit with ' || count(l.entry_id) || ' ledger entries'
      FROM credits c LEFT JOIN ledger l ON l.credit_id = c.credit_id
     WHERE (p_account IS NULL OR c.account_id = p_account) AND c.status = 'applied'
     GROUP BY c.credit_id, c.account_id HAVING count(l.entry_id) <> 1
$$;
