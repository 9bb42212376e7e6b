-- complain if this script is sourced in psql rather than by CREATE EXTENSION
\echo Use "CREATE EXTENSION pgrelay SCHEMA pgrelay" to load this file. \quit

-- BEFORE INSERT OR UPDATE row trigger; its one argument is the region's id
-- (0-63). Stamps the column the second argument names (default
-- _pgrelay_hlc) exactly as the PL/pgSQL pgrelay.stamp_row() does.
CREATE FUNCTION stamp_row_c() RETURNS trigger
AS 'MODULE_PATHNAME', 'pgrelay_stamp_row'
LANGUAGE C;

-- BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE statement trigger: refuses
-- local writes while pgrelay.fence holds a row, as the PL/pgSQL
-- pgrelay.fence_guard() does; reads the table with the latest snapshot.
CREATE FUNCTION fence_guard_c() RETURNS trigger
AS 'MODULE_PATHNAME', 'pgrelay_fence_guard'
LANGUAGE C;
