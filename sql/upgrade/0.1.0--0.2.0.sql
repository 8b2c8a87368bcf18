-- mdd 0.1.0 to 0.2.0, the hand-written part: what changes the tables of
-- 0.1.0 (ALTER TABLE, with their rows kept and new columns filled in) and
-- drops what the generated part cannot replace.  The Makefile appends the
-- output of scripts/upgrade_part.py (new and changed functions, views,
-- comments, grants, and the statements of new tables) to make
-- mdd--0.1.0--0.2.0.sql; test/t/97_upgrade.t checks that the result equals
-- a fresh install of 0.2.0 (docs/admin.md, "Upgrades").
\echo Use "ALTER EXTENSION mdd UPDATE TO '0.2.0'" to load this file. \quit
