-- Coordinator schema: one row per task id (admitted or rejected).
CREATE SCHEMA IF NOT EXISTS coordinator;

CREATE TABLE coordinator.tasks (
    task_id        text PRIMARY KEY,
    pool           text NOT NULL,
    kind           text,
    priority       text,
    -- admitted | queued | running | succeeded | failed | timed_out | dead | cancelled | expired | rejected
    status         text NOT NULL,
    -- current attempt (1-based once queued; 0 for rejected)
    attempt        integer NOT NULL DEFAULT 0,
    max_attempts   integer NOT NULL DEFAULT 1,
    envelope       jsonb,
    result         jsonb,
    error          text,
    -- rejection reason code and sentence
    reason         text,
    reason_message text,
    submit_seq     bigint,
    agent_id       text,
    payer          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz
);

CREATE INDEX tasks_pool_status ON coordinator.tasks (pool, status, created_at DESC);
CREATE INDEX tasks_status_created ON coordinator.tasks (status, created_at DESC);
CREATE INDEX tasks_created ON coordinator.tasks (created_at DESC);
