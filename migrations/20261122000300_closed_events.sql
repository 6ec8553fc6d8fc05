-- Priced tasks get a `closed` event once the coordinator has recorded their terminal state
-- (succeeded, dead, cancelled, expired); the ledger settles on it alone. It goes through the
-- same outbox as the coordinator's own terminal events (`event_due`), so a success recorded
-- just before a crash is still announced. The re-sent event needs the multiplier the agent
-- stamped into its `succeeded` event, kept here.
ALTER TABLE coordinator.tasks ADD COLUMN reputation text;
