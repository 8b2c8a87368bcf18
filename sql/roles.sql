-- mdd: roles and privileges.  Everything runs through SECURITY DEFINER
-- functions and views; the tables themselves are private.

DO $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mdd_reader') THEN
		CREATE ROLE mdd_reader NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mdd_operator') THEN
		CREATE ROLE mdd_operator NOLOGIN IN ROLE mdd_reader;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mdd_admin') THEN
		CREATE ROLE mdd_admin NOLOGIN IN ROLE mdd_operator;
	END IF;
END;
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA mdd FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA mdd FROM PUBLIC;
GRANT USAGE ON SCHEMA mdd TO mdd_reader;

-- readers: search, read, reports
GRANT SELECT ON mdd.objects, mdd.patients, mdd.storages, mdd.nodes, mdd.jobs, mdd.rules TO mdd_reader;
GRANT EXECUTE ON FUNCTION mdd.read(bigint, boolean), mdd.related(bigint),
	mdd.parse(bytea), mdd.dvh(bigint, bigint, double precision),
	mdd.find(text, text, text, text, text, text, text, text[], interval),
	mdd.patient_list(text, boolean), mdd.web_api(text, jsonb) TO mdd_reader;
-- DICOMweb search and retrieval (sql/dicomweb.sql)
GRANT EXECUTE ON FUNCTION mdd.dicom_search(text, jsonb, text[], integer, integer, boolean),
	mdd.dicom_search_ignored(text, jsonb), mdd.dicom_instances(text, text, text) TO mdd_reader;

-- operators: bring objects in, send them out
GRANT EXECUTE ON FUNCTION mdd.store(bytea, text), mdd.store_file(text, text),
	mdd.import(text), mdd.store_document(text, bytea, text, text, text, text),
	mdd.export(bigint, text, boolean, boolean), mdd.echo(text),
	mdd.archive(bigint[], text, boolean), mdd.restore(bigint[], boolean),
	mdd.wait(bigint, interval), mdd.cancel(bigint), mdd.verify(text), mdd.verify_storage(text, interval),
	mdd.preview_rule(text, boolean), mdd.run_rule(text, boolean),
	mdd.send(bigint[], text, boolean), mdd.retrieve(text, text, text, text),
	mdd.move(text, text, text, text, text) TO mdd_operator;

-- administrators: storages, the audit trail, the catalog tables for reports
GRANT EXECUTE ON FUNCTION mdd.add_storage(text, text, text, jsonb), mdd.alter_storage(text, jsonb),
	mdd.drop_storage(text),
	mdd.add_node(text, text, text, integer, jsonb), mdd.alter_node(text, text, text, integer, jsonb),
	mdd.drop_node(text),
	mdd.create_rule(text, text, text, text, text, time, time, integer, boolean, text),
	mdd.drop_rule(text), mdd.purge_jobs(interval) TO mdd_admin;
GRANT SELECT ON mdd.audit_log, mdd.patient, mdd.study, mdd.series, mdd.object,
	mdd.reference, mdd.copy, mdd.node, mdd.job, mdd.job_item, mdd.job_instance, mdd.rule, mdd.delivered TO mdd_admin;
