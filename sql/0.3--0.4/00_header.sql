-- ===========================================================================
-- market 0.4: batched checkouts, a faster PSP worker and webhooks that fold
-- every payment event (docs/checkout.md, docs/payments.md).
--
-- This directory is concatenated, in file-name order, into
-- sql/market--0.3--0.4.sql by the Makefile.
-- ===========================================================================

\echo Use "ALTER EXTENSION market UPDATE TO '0.4'" to load this file. \quit
