-- Fairness key of a task: its payer, else its `tenant` label. Limits per pool apply per key.
ALTER TABLE coordinator.tasks ADD COLUMN fair_key text;
CREATE INDEX tasks_pool_status_fair ON coordinator.tasks (pool, status, fair_key) WHERE fair_key IS NOT NULL;
