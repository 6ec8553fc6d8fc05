-- Task lifecycle: deadlines, delayed attempts, the dispatch outbox, agent reputation.
ALTER TABLE coordinator.tasks
    ADD COLUMN deadline     timestamptz,
    -- earliest start of the current attempt (not_before or retry backoff)
    ADD COLUMN not_before   timestamptz,
    -- set while an attempt queued by the coordinator (retry, replay, timeout) has no
    -- acknowledged work message yet; the dispatcher clears it, the reconciler re-sends it
    ADD COLUMN dispatch_at  timestamptz,
    ADD COLUMN timeout_ms   bigint;

CREATE INDEX tasks_dispatch_pending ON coordinator.tasks (dispatch_at) WHERE dispatch_at IS NOT NULL;
CREATE INDEX tasks_queued_deadline ON coordinator.tasks (deadline) WHERE deadline IS NOT NULL AND status = 'queued';
CREATE INDEX tasks_running_started ON coordinator.tasks (started_at) WHERE status = 'running';

CREATE TABLE coordinator.agents (
    agent_id        text PRIMARY KEY,
    pool            text NOT NULL,
    successes       bigint NOT NULL DEFAULT 0,
    failures        bigint NOT NULL DEFAULT 0,
    -- EWMA (alpha 0.1) of 1 = success, 0 = failure; new agents start at 1
    success_ewma    double precision NOT NULL DEFAULT 1.0,
    -- EWMA (alpha 0.1) of handler wall time of successful attempts
    latency_ewma_ms double precision,
    reputation      numeric(6, 4) NOT NULL DEFAULT 1.0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
