-- mdd: what pg_dump keeps.  The tables of an extension are left out of a
-- dump unless marked as configuration; every table of the catalog is, with
-- its sequence, so that pg_dump (with the large objects it dumps anyway)
-- and pg_restore bring back the whole archive: catalog, copies, nodes,
-- rules, jobs and the audit trail.  The storage row 'online' is made by
-- CREATE EXTENSION itself (sql/storage.sql marks mdd.storage accordingly).
-- A test checks that no table of the extension is left unmarked.

DO $$
DECLARE
	rel regclass;
BEGIN
	-- one call a statement: each updates the extension's row
	FOR rel IN SELECT format('mdd.%I', t)::regclass
			   FROM unnest(ARRAY['patient', 'study', 'series', 'object', 'reference', 'copy', 'node',
								 'job', 'job_item', 'job_instance', 'rule', 'delivered', 'audit']) t
	LOOP
		PERFORM pg_catalog.pg_extension_config_dump(rel, '');
	END LOOP;
	-- the sequences of their serial columns, so that new ids follow the restored ones
	FOR rel IN SELECT s.oid::regclass
			   FROM pg_catalog.pg_class s
			   JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::regclass
										  AND d.objid = s.oid AND d.deptype = 'a'
			   JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
			   WHERE s.relkind = 'S' AND t.relnamespace = 'mdd'::regnamespace
	LOOP
		PERFORM pg_catalog.pg_extension_config_dump(rel, '');
	END LOOP;
END;
$$;
