-- ===========================================================================
-- market 0.5: the order tables' references are checked by C triggers that
-- lock no parent row (src/references.c, docs/architecture.md "References"),
-- and idempotency keys leave room on their pages for the stored response
-- (fillfactor 15).
--
-- This directory is concatenated, in file-name order, into
-- sql/market--0.4--0.5.sql by the Makefile.
-- ===========================================================================

\echo Use "ALTER EXTENSION market UPDATE TO '0.5'" to load this file. \quit
