-- Two indexes for the coordinator's once-a-second maintenance queries, which walked the index of
-- every open task (and of every task that was open and has not been vacuumed yet).
--
-- The deadline sweep (`store::expire_overdue`, once a second) looks for tasks that are still
-- `queued` or `admitted` (held back by fairness) past their deadline. The index it was meant to
-- use covered `queued` only, so the planner could not use it and walked the open-task index
-- instead: every task that is open or was open and has not been vacuumed yet, 6.7 ms a pass with
-- nothing to expire, at 2,000 tasks/s on the 2-core machine (docs/BENCHMARKS.md, sixth session).
-- This one holds exactly the rows the sweep can expire. Creating it scans the table once, under
-- a lock that blocks writes to coordinator.tasks while it runs.
DROP INDEX coordinator.tasks_queued_deadline;
CREATE INDEX tasks_open_deadline ON coordinator.tasks (deadline)
    WHERE deadline IS NOT NULL AND status IN ('queued', 'admitted');

-- Fairness promotion first asks which pools have tasks held back (`admitted`); with this index
-- that question reads the held tasks only (1.5 ms a pass with none held, at 2,000 tasks/s,
-- before).
CREATE INDEX tasks_held ON coordinator.tasks (pool) WHERE status = 'admitted';
