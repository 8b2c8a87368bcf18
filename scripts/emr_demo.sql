-- A small EMR of its own for mdd's demo, tests and benchmark: the tables a
-- radiotherapy EMR keeps of patients and their treatment courses, which
-- archive rules join with mdd.objects.  Not part of the extension.
--
--   psql -f scripts/emr_demo.sql
CREATE SCHEMA IF NOT EXISTS emr;

-- patients, by the medical record number that DICOM carries as Patient ID
CREATE TABLE IF NOT EXISTS emr.patient (
	id			serial PRIMARY KEY,
	mrn			text NOT NULL UNIQUE,
	name		text NOT NULL,
	birth_date	date
);

-- treatment courses: end_date NULL while the course is open
CREATE TABLE IF NOT EXISTS emr.course (
	id			serial PRIMARY KEY,
	patient		integer NOT NULL REFERENCES emr.patient(id),
	name		text NOT NULL,
	intent		text CHECK (intent IN ('curative', 'palliative')),
	start_date	date NOT NULL,
	end_date	date CHECK (end_date >= start_date)
);
CREATE INDEX IF NOT EXISTS course_patient ON emr.course (patient);

-- who may read it: the EMR's own reporting role, and the role that owns
-- mdd's archive rules
DO $$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'emr_reader') THEN
		CREATE ROLE emr_reader NOLOGIN;
	END IF;
END;
$$;
GRANT USAGE ON SCHEMA emr TO emr_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA emr TO emr_reader;

-- ---------------------------------------------------------------------------
-- What the EMR asks of the archive (docs/emr.md).  They run with the rights
-- of whoever calls them: the EMR's application role needs mdd_operator.

-- The objects of a course: the patient's objects of studies dated from 30
-- days before the course began (its planning) to the day it ended, or to
-- today while it is open.
CREATE OR REPLACE FUNCTION emr.course_objects(course_id integer) RETURNS SETOF bigint
LANGUAGE sql STABLE
AS $$
	SELECT o.id
	FROM emr.course c
	JOIN emr.patient p ON p.id = c.patient
	JOIN mdd.objects o ON o.patient_id = p.mrn
	WHERE c.id = course_id
	  AND o.study_date BETWEEN c.start_date - 30 AND coalesce(c.end_date, current_date)
$$;

-- Archive a finished course: its objects still online, with what travels
-- with them, go to the archive storage (NULL: the default one).  job is the
-- archive job (mdd.jobs), or NULL when nothing of the course is online.
CREATE OR REPLACE PROCEDURE emr.archive_course(course_id integer, storage text DEFAULT NULL,
											   INOUT job bigint DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
	c emr.course;
	ids bigint[];
BEGIN
	SELECT * INTO c FROM emr.course x WHERE x.id = course_id;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'course % does not exist', course_id USING ERRCODE = '42704';
	END IF;
	IF c.end_date IS NULL THEN
		RAISE EXCEPTION 'course % (%) is still open', course_id, c.name
			USING ERRCODE = '55000', HINT = 'Archive a course once it has ended.';
	END IF;
	SELECT array_agg(o.id) INTO ids
	FROM emr.course_objects(course_id) x JOIN mdd.objects o ON o.id = x
	WHERE o.tier = 'online';
	job := CASE WHEN ids IS NOT NULL THEN mdd.archive(ids, storage, include_related => true) END;
END;
$$;

-- Bring a patient's archived objects back online, for re-treatment.  job
-- is the restore job, or NULL when nothing of the patient is archived.
CREATE OR REPLACE PROCEDURE emr.restore_patient(mrn text, INOUT job bigint DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
	ids bigint[];
BEGIN
	IF NOT EXISTS (SELECT 1 FROM emr.patient p WHERE p.mrn = restore_patient.mrn) THEN
		RAISE EXCEPTION 'patient % does not exist', mrn USING ERRCODE = '42704';
	END IF;
	SELECT array_agg(o.id) INTO ids FROM mdd.objects o
	WHERE o.patient_id = restore_patient.mrn AND o.tier = 'archive';
	job := CASE WHEN ids IS NOT NULL THEN mdd.restore(ids, include_related => true) END;
END;
$$;
