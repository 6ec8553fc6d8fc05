-- Fewer index entries per task (docs/BENCHMARKS.md, "Spine"). A task's status changes are
-- never HOT updates (status is indexed), so every index gets a new entry on every change.
-- `(status, created_at)` and `(pool, status, created_at)` served `tasks list` filtered by status
-- or pool; most rows end `succeeded`, and a list of succeeded tasks walks `tasks_created`
-- newest first and filters, so only the other states need an index: a row leaves this partial
-- index's insertions when it succeeds (the final update of most tasks then writes two index
-- entries instead of four, the insert three instead of four). Measured A/B, interleaved runs on
-- the 2-core machine: 9,759–9,885 against 8,741–9,566 tasks/s recorded end to end.
DROP INDEX coordinator.tasks_status_created;
DROP INDEX coordinator.tasks_pool_status;
CREATE INDEX tasks_open_pool_status ON coordinator.tasks (pool, status, created_at DESC)
    WHERE status <> 'succeeded';
