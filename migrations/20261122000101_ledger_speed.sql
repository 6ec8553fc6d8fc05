-- Ledger throughput (docs/BENCHMARKS.md, "Ledger"; measured with EXPLAIN (ANALYZE, WAL)):
--
-- 1. The two foreign keys of ledger.transfers cost a referential-integrity trigger per row and
--    account (a `SELECT … FOR KEY SHARE` on the account row): about 40 % of the database time
--    of a settled task. The ledger writes only account ids it has just read or created in the
--    same transaction, and accounts are permanent (the triggers below refuse DELETE, TRUNCATE
--    and changing an id), so a transfer can never point at a missing account; the audit checks
--    it too (`taskbus_ledger::audit`, invariant 4).
-- 2. A hold is updated exactly once (pending -> settled/voided) and no indexed column changes,
--    so with room left in its page the update is HOT (no new index entries): fillfactor 50
--    leaves that room. Pages written before this migration keep their old layout.
ALTER TABLE ledger.transfers
    DROP CONSTRAINT IF EXISTS transfers_debit_account_fkey,
    DROP CONSTRAINT IF EXISTS transfers_credit_account_fkey;
ALTER TABLE ledger.transfers SET (fillfactor = 50);

CREATE FUNCTION ledger.accounts_are_permanent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger accounts are permanent: % on ledger.accounts is refused', TG_OP;
END
$$;
CREATE TRIGGER accounts_no_delete BEFORE DELETE OR TRUNCATE ON ledger.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.accounts_are_permanent();
CREATE TRIGGER accounts_no_id_change BEFORE UPDATE OF id ON ledger.accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.accounts_are_permanent();
