-- complain if this script is sourced in psql rather than by ALTER EXTENSION
\echo Use "ALTER EXTENSION pgrelay UPDATE" to load this file. \quit

-- AFTER INSERT statement trigger with a NEW TABLE (or AFTER UPDATE of the key
-- row trigger); its arguments are the table's key columns. The fast path of
-- the PL/pgSQL pgrelay.check_tombstone(): rows stamped above their table's
-- newest tombstone pass on one index probe, any others are handed to it.
CREATE FUNCTION check_tombstone_c() RETURNS trigger
AS 'MODULE_PATHNAME', 'pgrelay_check_tombstone'
LANGUAGE C;
