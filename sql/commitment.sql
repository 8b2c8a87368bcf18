-- mdd: Storage Commitment (Push Model, PS3.4 annex J) as SCP.  A modality
-- or PACS that sent objects asks mdd, by N-ACTION, to take responsibility
-- for them; mdd answers, on an association of its own, with an
-- N-EVENT-REPORT listing those it holds and those it does not.  Once mdd
-- reports an instance committed, the sender may delete its own copy: the
-- object is in the catalog with a verified copy (an object is committed
-- before its C-STORE is answered).
--
-- The listener (extension/dicom_commit.cpp) hands the request to
-- mdd._dicom_commit, which decides at once what is held and queues the
-- report as a job of kind 'commit'; a job runner sends it, again after a
-- failure, so that a requester that is down for a while still hears.

-- The request of a node: which instances are held, queued as the report
-- job; returns the job.  Failure reasons: 0x0112 no such object instance,
-- 0x0119 class-instance conflict (held under another SOP class).
CREATE FUNCTION mdd._dicom_commit(calling_ae text, peer text, transaction_uid text,
								  sop_classes text[], sop_instances text[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
	reasons integer[];
	missing integer;
	job bigint;
BEGIN
	IF transaction_uid !~ '^[0-9]+(\.[0-9]+)*$' OR length(transaction_uid) > 64 THEN
		RAISE EXCEPTION 'invalid Transaction UID "%"', transaction_uid USING ERRCODE = '22023';
	END IF;
	IF cardinality(sop_classes) IS DISTINCT FROM cardinality(sop_instances) OR cardinality(sop_classes) = 0 THEN
		RAISE EXCEPTION 'a storage commitment request needs one SOP class per instance, at least one'
			USING ERRCODE = '22023';
	END IF;
	-- the node that asked, as admission found it: its AE title, from its host
	SELECT * INTO n FROM mdd.node x
	WHERE x.ae_title = calling_ae AND x.host IS NOT NULL AND x.port IS NOT NULL
	ORDER BY (x.host = peer OR (x.host = 'localhost' AND peer IN ('127.0.0.1', '::1'))) DESC, x.id
	LIMIT 1;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'storage commitment from "%": no node with this AE title has a host and port for the report',
			calling_ae
			USING ERRCODE = '42704', HINT = 'Register it with mdd.add_node, or give it a host and port with mdd.alter_node.';
	END IF;

	SELECT array_agg(CASE WHEN o.id IS NULL THEN 274			-- 0x0112
						  WHEN o.sop_class_uid <> r.cls THEN 281	-- 0x0119
						  ELSE 0 END ORDER BY r.pos)
	INTO reasons
	FROM unnest(sop_classes, sop_instances) WITH ORDINALITY AS r(cls, inst, pos)
	LEFT JOIN mdd.object o ON o.sop_instance_uid = r.inst;
	missing := (SELECT count(*) FROM unnest(reasons) x WHERE x <> 0);

	INSERT INTO mdd.job (kind, node, created_by, client, total, options)
	VALUES ('commit', n.id, mdd._caller(), format('%s@%s', calling_ae, peer), cardinality(reasons),
			jsonb_build_object('transaction_uid', transaction_uid, 'sop_classes', to_jsonb(sop_classes),
							   'sop_instances', to_jsonb(sop_instances), 'reasons', to_jsonb(reasons),
							   'max_attempts', 10))
	RETURNING id INTO job;
	PERFORM mdd._audit('commitment requested', NULL, NULL,
					   format('job %s: transaction %s from node %s: %s instances, %s not held',
							  job, transaction_uid, n.name, cardinality(reasons), missing),
					   format('%s@%s', calling_ae, peer));
	PERFORM mdd._wake_runners();
	RETURN job;
END;
$$;

-- The report, sent by C (extension/commit.c, dicom_commit.cpp).
CREATE FUNCTION mdd._commit_report(ae_title text, host text, port integer, transaction_uid text,
								   sop_classes text[], sop_instances text[], reasons integer[],
								   tls boolean DEFAULT false)
RETURNS void
	AS 'MODULE_PATHNAME', 'mdd_commit_report_sql' LANGUAGE C VOLATILE;

-- The step of a commit job: send the report to the node; a failure is
-- raised and retried (class 08) until the job's max_attempts.
CREATE FUNCTION mdd._commit_step(j mdd.job) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
	reasons integer[] := ARRAY(SELECT x::integer FROM jsonb_array_elements_text(j.options->'reasons') x);
	missing integer := (SELECT count(*) FROM unnest(reasons) x WHERE x <> 0);
BEGIN
	IF j.state NOT IN ('queued', 'running') THEN
		UPDATE mdd.job x SET finished_at = coalesce(x.finished_at, now()), next_attempt_at = NULL
		WHERE x.id = j.id;
		RETURN 'finished';
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	IF n.host IS NULL OR n.port IS NULL THEN
		PERFORM mdd._job_fail(j.id, format('node %s has no host and port any more for the report', n.name));
		RETURN 'finished';
	END IF;
	PERFORM mdd._commit_report(n.ae_title, n.host, n.port, j.options->>'transaction_uid',
							   ARRAY(SELECT jsonb_array_elements_text(j.options->'sop_classes')),
							   ARRAY(SELECT jsonb_array_elements_text(j.options->'sop_instances')),
							   reasons, coalesce((n.options->>'tls')::boolean, false));
	UPDATE mdd.job x SET done = x.total, attempts = 0, error = NULL WHERE x.id = j.id;
	PERFORM mdd._job_end(j, format('transaction %s reported to node %s: %s instances committed, %s not',
								   j.options->>'transaction_uid', n.name, cardinality(reasons) - missing,
								   missing));
	RETURN 'finished';
END;
$$;
