-- The W3C `traceparent` a producer put on its submit message (validated; NULL when absent or
-- malformed). Every attempt's work message carries it (docs/PROTOCOL.md, "Trace context").
ALTER TABLE coordinator.tasks ADD COLUMN traceparent text;
