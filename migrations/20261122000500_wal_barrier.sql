-- Admission writes its rows with asynchronous commit (the task's work is published as soon as
-- its row is written) and acks the submit messages only once the WAL is flushed past them.
-- See services/coordinator/src/flush.rs.

-- The current incarnation of the server: PostgreSQL empties unlogged tables in crash
-- recovery, so a token that is still here was not lost in a crash since it was read.
CREATE UNLOGGED TABLE coordinator.incarnation (
    id int PRIMARY KEY CHECK (id = 1),
    token text NOT NULL
);

-- Updated (a synchronous commit that writes WAL) to force a flush when PostgreSQL has not
-- flushed far enough on its own.
CREATE TABLE coordinator.wal_barrier (
    id int PRIMARY KEY CHECK (id = 1),
    n bigint NOT NULL
) WITH (fillfactor = 10);
INSERT INTO coordinator.wal_barrier VALUES (1, 0);
