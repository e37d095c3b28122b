-- 001_schema.sql - paycoord's tables. Money is bigint minor units everywhere.
-- docs/schema.md explains each table and which transaction writes it.

CREATE TABLE accounts (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    currency    text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    balance     bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per payment idempotency key. The row is committed (asynchronously)
-- before the debit is prepared, so a replay can always read it without
-- waiting on a prepared transaction. status = 'succeeded' is written inside the
-- prepared transaction itself, so it becomes visible exactly when the debit
-- commits: committed debit <=> status 'succeeded'.
CREATE TABLE payments (
    payment_id      uuid PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE CHECK (idempotency_key ~ '^[!-~]{1,255}$'),
    account_id      text NOT NULL REFERENCES accounts (id),
    amount          bigint NOT NULL CHECK (amount > 0),
    currency        text NOT NULL,
    -- what a replay must match; a different fingerprint is idempotency_conflict
    fingerprint     text GENERATED ALWAYS AS (md5(account_id || '|' || amount::text || '|' || currency)) STORED,
    reference       text CHECK (octet_length(reference) <= 255),
    metadata        jsonb,
    gid             text NOT NULL UNIQUE CHECK (length(gid) < 200),
    node            text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'succeeded', 'declined', 'insufficient_funds')),
    processor_ref   text,
    decline_code    text,
    deadline        timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_pending ON payments (account_id) WHERE status = 'pending';
CREATE INDEX payments_node_pending ON payments (node, created_at) WHERE status = 'pending';

-- Credits (deposits). 'accepted': durable, waiting for the account's row lock
-- (a payment in flight holds it); 'applied': in the balance and the ledger.
CREATE TABLE credits (
    credit_id       uuid PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE CHECK (idempotency_key ~ '^[!-~]{1,255}$'),
    account_id      text NOT NULL REFERENCES accounts (id),
    amount          bigint NOT NULL CHECK (amount > 0),
    currency        text NOT NULL,
    fingerprint     text GENERATED ALWAYS AS (md5(account_id || '|' || amount::text || '|' || currency)) STORED,
    reference       text CHECK (octet_length(reference) <= 255),
    status          text NOT NULL CHECK (status IN ('accepted', 'applied')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    applied_at      timestamptz
);
CREATE INDEX credits_accepted ON credits (account_id, created_at) WHERE status = 'accepted';

-- Every balance change, signed. For each account the entries sum to the
-- balance (invariant I1); balance_after is the balance right after the entry.
CREATE TABLE ledger (
    entry_id        bigserial PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    amount          bigint NOT NULL CHECK (amount <> 0),
    balance_after   bigint NOT NULL CHECK (balance_after >= 0),
    payment_id      uuid REFERENCES payments (payment_id),
    credit_id       uuid REFERENCES credits (credit_id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((payment_id IS NULL) <> (credit_id IS NULL)),
    CHECK ((payment_id IS NOT NULL AND amount < 0) OR (credit_id IS NOT NULL AND amount > 0))
);
CREATE INDEX ledger_account ON ledger (account_id, entry_id);
CREATE UNIQUE INDEX ledger_one_debit_per_payment ON ledger (payment_id) WHERE payment_id IS NOT NULL;
CREATE UNIQUE INDEX ledger_one_entry_per_credit ON ledger (credit_id) WHERE credit_id IS NOT NULL;

-- Recovery's bookkeeping per gid. Kept apart from payments on purpose: a
-- prepared debit holds the lock on its payments row until it is settled, so
-- recovery could not write attempts there without waiting on that very lock.
CREATE TABLE recovery_state (
    gid             text PRIMARY KEY,
    payment_id      uuid,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    review          boolean NOT NULL DEFAULT false,  -- manual review: recovery gave up
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Every settlement made by hand (the resolve op, paycoordctl resolve): who,
-- when, what, why. The row is written before the action ('requested') and
-- gets its outcome after it.
CREATE TABLE resolutions (
    resolution_id   bigserial PRIMARY KEY,
    gid             text NOT NULL,
    payment_id      uuid,
    action          text NOT NULL CHECK (action IN ('commit', 'rollback')),
    outcome         text NOT NULL,
    reason          text NOT NULL CHECK (octet_length(reason) <= 500),
    actor_uid       integer,
    node            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
