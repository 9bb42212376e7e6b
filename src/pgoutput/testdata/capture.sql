-- How pg15_text.hex and pg15_binary.hex were captured (PostgreSQL 15,
-- initdb -E UTF8, wal_level=logical). Each fixture line is
-- "<lsn> <hex of one pgoutput message>", the output of:
--
--   SELECT lsn, encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL,
--     'proto_version', '1', 'publication_names', 'pub', 'messages', 'true');
--
-- pg15_binary.hex is the same slot peeked again with 'binary', 'true' added.
--
-- Schema (run first; not part of the decoded stream)
SET TimeZone = 'UTC';
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE SCHEMA eu;
CREATE TABLE accounts (
  id int PRIMARY KEY,
  name text,
  balance numeric(12,2),
  active bool,
  created_at timestamptz,
  doc jsonb,
  blob bytea,
  big bigint,
  feeling mood,
  note text
);
ALTER TABLE accounts ALTER COLUMN note SET STORAGE EXTERNAL;
CREATE TABLE audit (id bigint, payload text);
ALTER TABLE audit REPLICA IDENTITY FULL;
CREATE TABLE eu.customers (id serial PRIMARY KEY, email text NOT NULL);
CREATE PUBLICATION pub FOR ALL TABLES;
SELECT 'slot', lsn FROM pg_create_logical_replication_slot('s', 'pgoutput');

-- Workload (each statement below produces the messages in pg15_*.hex)
SET TimeZone = 'UTC';
BEGIN;
INSERT INTO accounts VALUES (1, 'Zoë', 1234.50, true, '2024-05-06 07:08:09.123456+00', '{"a": [1, 2], "b": null}', '\xdeadbeef00', -9007199254740993, 'happy', repeat('0123456789', 400));
INSERT INTO accounts (id) VALUES (2);
COMMIT;
UPDATE accounts SET balance = balance + 1 WHERE id = 1;
UPDATE accounts SET id = 3 WHERE id = 2;
DELETE FROM accounts WHERE id = 3;
INSERT INTO audit VALUES (10, 'first'), (11, NULL);
UPDATE audit SET payload = 'second' WHERE id = 10;
DELETE FROM audit WHERE id = 11;
TRUNCATE audit, eu.customers RESTART IDENTITY;
SELECT pg_logical_emit_message(true, 'p', 'x');
SELECT pg_logical_emit_message(false, 'pgrelay', '\x00ff'::bytea);
SELECT pg_replication_origin_create('pgrelay_eu');
SELECT pg_replication_origin_session_setup('pgrelay_eu');
BEGIN;
SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-02 03:04:05+00');
INSERT INTO eu.customers (email) VALUES ('a@example.eu');
COMMIT;
SELECT pg_replication_origin_session_reset();
