-- Terminal events the coordinator announces itself (dead, cancelled, expired) are marked due in
-- the same UPDATE that records the status and cleared once JetStream has stored the event. The
-- once-a-second maintenance pass re-sends what a crash left due, so a coordinator killed
-- between the two never loses the event (the ledger voids holds on it).
ALTER TABLE coordinator.tasks ADD COLUMN event_due boolean NOT NULL DEFAULT false;
CREATE INDEX tasks_event_due ON coordinator.tasks (updated_at) WHERE event_due;
