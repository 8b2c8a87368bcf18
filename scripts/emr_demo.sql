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
