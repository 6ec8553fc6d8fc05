-- Payment ledger schema: double-entry accounts and transfers in the manner of TigerBeetle's
-- two-phase transfers. Amounts are NUMERIC (rust_decimal::Decimal in Rust), never floats.
CREATE SCHEMA IF NOT EXISTS ledger;

-- Currencies and their scale (digits after the decimal point an amount may have).
CREATE TABLE ledger.currencies (
    code  text PRIMARY KEY,
    scale integer NOT NULL CHECK (scale BETWEEN 0 AND 18)
);

-- One account per (name, currency). `kind`: payer | agent | escrow | platform | external.
-- Balances are kept here (denormalised from ledger.transfers, checked by the audit):
--   posted balance  = credits_posted - debits_posted
--   available       = credits_posted - debits_posted - debits_pending
-- `no_overdraft`: debits_posted + debits_pending may never exceed credits_posted.
CREATE TABLE ledger.accounts (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL,
    currency        text NOT NULL REFERENCES ledger.currencies (code),
    kind            text NOT NULL CHECK (kind IN ('payer', 'agent', 'escrow', 'platform', 'external')),
    no_overdraft    boolean NOT NULL,
    debits_pending  numeric NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted   numeric NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending numeric NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted  numeric NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, currency),
    CHECK (NOT no_overdraft OR debits_posted + debits_pending <= credits_posted)
) WITH (fillfactor = 70);

-- The journal. Every row moves `amount` from `debit_account` to `credit_account`.
-- kind: deposit | withdrawal (operator, posted at once) | hold (pending payer -> escrow, later
-- settled with `posted_amount` <= amount, or voided) | payout (escrow -> agent) | fee
-- (escrow -> platform).
-- status: posted | pending | settled | voided. The effect of a row on its accounts:
--   posted  : amount posted            pending : amount pending
--   settled : posted_amount posted     voided  : nothing
CREATE TABLE ledger.transfers (
    id             bigserial PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('deposit', 'withdrawal', 'hold', 'payout', 'fee')),
    status         text NOT NULL CHECK (status IN ('posted', 'pending', 'settled', 'voided')),
    debit_account  bigint NOT NULL REFERENCES ledger.accounts (id),
    credit_account bigint NOT NULL REFERENCES ledger.accounts (id),
    currency       text NOT NULL,
    amount         numeric NOT NULL CHECK (amount > 0),
    posted_amount  numeric CHECK (posted_amount >= 0 AND posted_amount <= amount),
    -- Task transfers: the task id (one hold, at most one payout and one fee per task).
    task_id        text,
    pool           text,
    -- Operator transfers: the caller's idempotency key and a digest of the request.
    idem_key       text,
    request        text,
    -- Settlement of a hold: how it resolved, by which event (stream sequence), for which agent.
    outcome        text,
    agent_id       text,
    reputation     numeric,
    resolved_seq   bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    resolved_at    timestamptz,
    CHECK (debit_account <> credit_account)
) WITH (fillfactor = 85);

CREATE UNIQUE INDEX transfers_task_kind ON ledger.transfers (task_id, kind) WHERE task_id IS NOT NULL;
CREATE UNIQUE INDEX transfers_idem_key ON ledger.transfers (idem_key) WHERE idem_key IS NOT NULL;
-- Statements of payer, agent and external accounts. The escrow and platform sides of holds,
-- payouts and fees are left out on purpose: those would be the hottest index entries of the
-- ledger (every task adds them), and a statement of an escrow or platform shard is rare (it
-- scans the journal).
CREATE INDEX transfers_debit ON ledger.transfers (debit_account, id) WHERE kind IN ('deposit', 'withdrawal', 'hold');
CREATE INDEX transfers_credit ON ledger.transfers (credit_account, id) WHERE kind IN ('deposit', 'withdrawal', 'payout');
