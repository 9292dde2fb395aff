-- A database that Debezium reads through a publication FOR ALL TABLES (the simplest way to capture every Twenty
-- workspace, new ones included) refuses UPDATE and DELETE on any table without a replica identity. Every webhookd
-- table has a primary key but the attempt log, whose pruning deletes rows: FULL is the identity that needs no
-- rewrite of a table that may hold millions of rows.
ALTER TABLE webhookd.attempts REPLICA IDENTITY FULL;
