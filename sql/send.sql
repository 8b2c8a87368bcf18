-- mdd: mdd.send, C-STORE of archived objects to a DICOM node, as a job of
-- the durable queue (sql/jobs.sql; mdd._job_step hands send jobs to
-- mdd._send_step)
--
-- Each step of a send job takes the next batch of its pending objects,
-- opens one association to the node (extension/send.c), and for each
-- object reads its bytes from whichever copy is present, checked against
-- its SHA-256 (mdd._read_verified), and sends them by C-STORE: the data set
-- exactly as stored when the node accepted the stored transfer syntax, or
-- converted to an uncompressed syntax it accepted when the object is
-- uncompressed.  What each object came to is committed with the step, so
-- that a job resumed after a restart sends only what is still pending.

-- where a send job sends to
ALTER TABLE mdd.job ADD COLUMN node integer REFERENCES mdd.node(id);

-- The order objects go out in, so that a receiver that checks references
-- has what a plan refers to before the plan: images and other objects
-- first, then structure sets, plans, doses, and treatment records.
CREATE FUNCTION mdd._send_rank(sop_class_uid text) RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE sop_class_uid
		WHEN '1.2.840.10008.5.1.4.1.1.481.3' THEN 1	-- RT Structure Set
		WHEN '1.2.840.10008.5.1.4.1.1.481.5' THEN 2	-- RT Plan
		WHEN '1.2.840.10008.5.1.4.1.1.481.8' THEN 2	-- RT Ion Plan
		WHEN '1.2.840.10008.5.1.4.1.1.481.2' THEN 3	-- RT Dose
		ELSE CASE WHEN sop_class_uid LIKE '1.2.840.10008.5.1.4.1.1.481.%' THEN 4 ELSE 0 END
	END
$$;

-- Queue a job sending these objects to the node of that name (a send
-- rule's run may have none to send: its job ends at once).
CREATE FUNCTION mdd._queue_send(ids bigint[], node text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n mdd.node;
	doc bigint;
	patients text[];
	job bigint;
BEGIN
	SELECT * INTO n FROM mdd.node x WHERE x.name = _queue_send.node;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'node "%" does not exist', coalesce(_queue_send.node, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.nodes.';
	END IF;
	IF n.host IS NULL OR n.port IS NULL THEN
		RAISE EXCEPTION 'node "%" has no host and port to send to', n.name
			USING ERRCODE = '22023';
	END IF;
	IF NOT n.may_send THEN
		RAISE EXCEPTION 'node "%" may not receive objects from this archive', n.name
			USING ERRCODE = '42501', HINT = 'Its node option "send" is false.';
	END IF;
	SELECT o.id INTO doc FROM mdd.object o WHERE o.id = ANY (ids) AND o.kind <> 'dicom'
	ORDER BY o.id LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'object % is a document, not a DICOM object', doc
			USING ERRCODE = '22023', DETAIL = 'Only DICOM objects can be sent to a node.';
	END IF;

	INSERT INTO mdd.job (kind, node, created_by, client, total)
	VALUES ('send', n.id, mdd._caller(),
			coalesce(host(inet_client_addr()) || ':' || inet_client_port(), 'local'),
			cardinality(ids))
	RETURNING id INTO job;
	INSERT INTO mdd.job_item (job, object) SELECT job, x FROM unnest(ids) x;
	SELECT array_agg(DISTINCT p.patient_id) INTO patients
	FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient WHERE o.id = ANY (ids);
	PERFORM mdd._audit('send requested', NULL,
					   CASE WHEN cardinality(patients) = 1 THEN patients[1] END,
					   format('job %s: %s objects to node %s (%s at %s:%s)', job, cardinality(ids),
							  n.name, n.ae_title, n.host, n.port));
	PERFORM mdd._wake_runners();
	RETURN job;
END;
$$;

-- mdd.send: queue a job sending objects to a node by C-STORE.  With
-- include_related, every object of mdd.related of each object goes too.
CREATE FUNCTION mdd.send(object_ids bigint[], node text, include_related boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM mdd.node x WHERE x.name = send.node) THEN
		RAISE EXCEPTION 'node "%" does not exist', coalesce(send.node, 'NULL')
			USING ERRCODE = '42704', HINT = 'See mdd.nodes.';
	END IF;
	RETURN mdd._queue_send(mdd._closure(object_ids, coalesce(include_related, false)), node);
END;
$$;
COMMENT ON FUNCTION mdd.send(bigint[], text, boolean) IS
	'Queue a job sending objects (any tier) to a DICOM node by C-STORE; returns the job id';

CREATE FUNCTION mdd._send_open(ae_title text, host text, port integer, sop_classes text[],
							   transfer_syntaxes text[], tls boolean DEFAULT false) RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_send_open_sql' LANGUAGE C VOLATILE;

CREATE FUNCTION mdd._send_object(data bytea, sop_class_uid text, sop_instance_uid text,
								 transfer_syntax_uid text,
								 OUT outcome text, OUT status integer, OUT detail text)
	AS 'MODULE_PATHNAME', 'mdd_send_object_sql' LANGUAGE C VOLATILE;

CREATE FUNCTION mdd._send_close(release boolean) RETURNS void
	AS 'MODULE_PATHNAME', 'mdd_send_close_sql' LANGUAGE C VOLATILE;

-- One step of a send job, called by mdd._job_step with the job's row
-- locked: the next batch (job options batch, default 100 objects, and
-- batch_bytes, default 64 MB) on one association.  Returns 'more',
-- 'wait' (the association failed: tried again later) or 'finished'.
--
-- An object that cannot be read, is corrupt, fits no context the node
-- accepted, or that the node answers with a failure status fails alone;
-- the others go on.  A node that cannot be reached raises its error
-- (class 08), which mdd._job_error retries with back-off; an association
-- that fails half way keeps what was sent and is retried the same way.
CREATE FUNCTION mdd._send_step(j mdd.job) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	batch int := coalesce((j.options->>'batch')::int, 100);
	batch_bytes bigint := coalesce((j.options->>'batch_bytes')::bigint, 64 * 1024 * 1024);
	n mdd.node;
	it record;
	ids bigint[] := '{}';
	pairs text[] := '{}';
	classes text[] := '{}';
	syntaxes text[] := '{}';
	sum_bytes bigint := 0;
	refused text;
	data bytea;
	failure text;
	r record;
	sent bigint[] := '{}';
	failures int := 0;
	written bigint := 0;
	broken text;
BEGIN
	IF j.state NOT IN ('queued', 'running') THEN
		-- cancelled or failed: nothing is half done between steps
		UPDATE mdd.job x SET finished_at = coalesce(x.finished_at, now()), next_attempt_at = NULL
		WHERE x.id = j.id;
		RETURN 'finished';
	END IF;
	SELECT * INTO n FROM mdd.node x WHERE x.id = j.node;
	IF n.host IS NULL OR n.port IS NULL OR NOT n.may_send THEN
		PERFORM mdd._job_fail(j.id, format('node %s may no longer be sent to (no host and port, or option "send" false)',
										   n.name));
		RETURN 'finished';
	END IF;

	-- the batch: bounded in objects and bytes, and in the presentation
	-- contexts it needs (60 SOP class and transfer syntax pairs, with an
	-- uncompressed fallback each, stay within the 128 an association has)
	FOR it IN SELECT o.id, o.size, o.sop_class_uid, o.transfer_syntax_uid
			  FROM mdd.job_item i JOIN mdd.object o ON o.id = i.object
			  WHERE i.job = j.id AND i.state = 'pending'
			  ORDER BY mdd._send_rank(o.sop_class_uid), o.series, o.id
	LOOP
		EXIT WHEN cardinality(ids) >= batch OR (cardinality(ids) > 0 AND sum_bytes + it.size > batch_bytes);
		IF NOT (it.sop_class_uid || ' ' || it.transfer_syntax_uid) = ANY (pairs) THEN
			EXIT WHEN cardinality(pairs) >= 60;
			pairs := pairs || (it.sop_class_uid || ' ' || it.transfer_syntax_uid);
			classes := classes || it.sop_class_uid;
			syntaxes := syntaxes || it.transfer_syntax_uid;
		END IF;
		ids := ids || it.id;
		sum_bytes := sum_bytes + it.size;
	END LOOP;

	IF cardinality(ids) = 0 THEN
		-- every object sent or failed: the job ends
		PERFORM mdd._job_end(j, format('%s objects sent to node %s, %s failed', j.done, n.name, j.failed));
		RETURN 'finished';
	END IF;

	UPDATE mdd.job_item i SET batch = j.batches + 1 WHERE i.job = j.id AND i.object = ANY (ids);
	UPDATE mdd.job x SET batches = j.batches + 1 WHERE x.id = j.id;
	refused := mdd._send_open(n.ae_title, n.host, n.port, classes, syntaxes,
							  coalesce((n.options->>'tls')::boolean, false));
	IF refused IS NOT NULL THEN
		-- the node takes none of these SOP classes in any syntax offered
		UPDATE mdd.job_item i
		SET state = 'failed',
			error = format('node %s accepts no presentation context for SOP class %s in %s%s: %s',
						   n.name, o.sop_class_uid, o.transfer_syntax_uid,
						   CASE WHEN o.transfer_syntax_uid IN ('1.2.840.10008.1.2', '1.2.840.10008.1.2.1',
															   '1.2.840.10008.1.2.2')
								THEN ' or another uncompressed syntax' ELSE '' END, refused)
		FROM mdd.object o
		WHERE i.job = j.id AND i.object = ANY (ids) AND o.id = i.object;
		UPDATE mdd.job x SET failed = x.failed + cardinality(ids), attempts = 0,
			   error = NULL WHERE x.id = j.id;
		RETURN 'more';
	END IF;

	FOR it IN SELECT o.id, o.size, o.sop_class_uid, o.sop_instance_uid, o.transfer_syntax_uid
			  FROM unnest(ids) WITH ORDINALITY AS b(id, pos) JOIN mdd.object o ON o.id = b.id
			  ORDER BY b.pos
	LOOP
		failure := NULL;
		BEGIN
			data := mdd._read_verified(it.id, NULL);
		EXCEPTION WHEN OTHERS THEN
			IF mdd._transient(SQLSTATE) THEN
				RAISE;
			END IF;
			failure := format('%s (SQLSTATE %s)', SQLERRM, SQLSTATE);
		END;
		IF failure IS NULL THEN
			SELECT * INTO r FROM mdd._send_object(data, it.sop_class_uid, it.sop_instance_uid,
											   it.transfer_syntax_uid);
			data := NULL;
			IF r.outcome = 'broken' THEN
				broken := r.detail;
				EXIT;
			ELSIF r.outcome = 'sent' THEN
				sent := sent || it.id;
				written := written + it.size;
				IF r.status <> 0 THEN
					UPDATE mdd.job_item i
					SET error = format('node %s answered warning status 0x%s%s', n.name,
									   upper(lpad(to_hex(r.status), 4, '0')), ': ' || r.detail)
					WHERE i.job = j.id AND i.object = it.id;
				END IF;
			ELSIF r.outcome = 'refused' THEN
				failure := format('node %s answered C-STORE status 0x%s%s', n.name,
								  upper(lpad(to_hex(r.status), 4, '0')), ': ' || r.detail);
			ELSE
				failure := format('cannot be sent to node %s: %s', n.name, r.detail);
			END IF;
		END IF;
		IF failure IS NOT NULL THEN
			UPDATE mdd.job_item i SET state = 'failed', error = failure
			WHERE i.job = j.id AND i.object = it.id;
			failures := failures + 1;
		END IF;
	END LOOP;
	PERFORM mdd._send_close(broken IS NULL);

	-- the bookkeeping of the batch, once
	UPDATE mdd.job_item i SET state = 'done' WHERE i.job = j.id AND i.object = ANY (sent);
	UPDATE mdd.job x SET done = x.done + cardinality(sent), failed = x.failed + failures,
		   bytes = x.bytes + written
	WHERE x.id = j.id;
	INSERT INTO mdd.audit (role, action, object_id, patient_id, detail, client)
	SELECT j.created_by, 'send', o.id, p.patient_id,
		   format('job %s: to node %s (%s at %s:%s)', j.id, n.name, n.ae_title, n.host, n.port),
		   j.client
	FROM unnest(sent) s(id) JOIN mdd.object o ON o.id = s.id JOIN mdd.patient p ON p.id = o.patient;

	IF broken IS NOT NULL THEN
		-- what was answered is kept; the rest is tried again later, and a
		-- step that got nothing through counts as one more failed attempt
		IF cardinality(sent) + failures > 0 THEN
			UPDATE mdd.job x SET attempts = 0 WHERE x.id = j.id;
		END IF;
		PERFORM mdd._job_retry(j.id, '08006',
							   format('the association with node %s (%s at %s:%s) failed: %s',
									  n.name, n.ae_title, n.host, n.port, broken));
		RETURN 'wait';
	END IF;
	UPDATE mdd.job x SET attempts = 0, error = NULL
	WHERE x.id = j.id AND (x.attempts > 0 OR x.error IS NOT NULL);
	RETURN 'more';
END;
$$;
