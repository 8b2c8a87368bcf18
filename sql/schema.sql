-- mdd: the catalog (patients, studies, series, objects and their references)
\echo Use "CREATE EXTENSION mdd" to load this file. \quit

-- One row per patient.  patient_id is the DICOM Patient ID ('' when a
-- DICOM object had none; such objects still belong to a patient row).
CREATE TABLE mdd.patient (
	id				bigserial PRIMARY KEY,
	patient_id		text NOT NULL UNIQUE,
	patient_name	text,
	birth_date		date,
	sex				text,
	created_at		timestamptz NOT NULL DEFAULT now()
);

-- One row per study.  The modality list and the counts are kept up to date
-- as objects arrive, so that queries need not compute them: series_count
-- when a series is created, object_count at the commit of the transaction
-- that stored objects (extension/tally.c).
CREATE TABLE mdd.study (
	id					bigserial PRIMARY KEY,
	patient				bigint NOT NULL REFERENCES mdd.patient(id),
	study_instance_uid	text NOT NULL UNIQUE,
	study_date			date,
	study_time			time,
	study_description	text,
	study_id			text,
	accession_number	text,
	referring_physician text,
	modalities			text[] NOT NULL DEFAULT '{}',
	series_count		integer NOT NULL DEFAULT 0,
	object_count		integer NOT NULL DEFAULT 0
);
CREATE INDEX ON mdd.study (patient);
CREATE INDEX ON mdd.study (study_date);
CREATE INDEX ON mdd.study (accession_number);

CREATE TABLE mdd.series (
	id						bigserial PRIMARY KEY,
	study					bigint NOT NULL REFERENCES mdd.study(id),
	series_instance_uid		text NOT NULL UNIQUE,
	modality				text,
	series_number			text,
	series_description		text,
	series_date				date,
	body_part_examined		text,
	frame_of_reference_uid	text,
	object_count			integer NOT NULL DEFAULT 0
);
CREATE INDEX ON mdd.series (study);

-- One row per archived thing: a DICOM instance or a document.
CREATE TABLE mdd.object (
	id						bigserial PRIMARY KEY,
	kind					text NOT NULL CHECK (kind IN ('dicom', 'document')),
	patient					bigint NOT NULL REFERENCES mdd.patient(id),
	study					bigint REFERENCES mdd.study(id),
	series					bigint REFERENCES mdd.series(id),
	sop_instance_uid		text UNIQUE,
	sop_class_uid			text,
	instance_number			text,
	image_type				text,
	manufacturer			text,
	manufacturer_model_name text,
	station_name			text,
	frame_of_reference_uid	text,
	transfer_syntax_uid		text,
	number_of_frames		integer,
	content_date			date,
	content_type			text,
	filename				text,
	description				text,
	size					bigint NOT NULL,
	sha256					bytea NOT NULL,
	header					jsonb,
	source					text,
	ingested_at				timestamptz NOT NULL DEFAULT now(),
	archived_at				timestamptz,
	-- 'online' while a present copy is on an online-tier storage; kept by
	-- the steps that change that (mdd._keep, mdd._copy_items), in the same
	-- transaction, so that queries over tiers need not look at the copies
	tier					text NOT NULL DEFAULT 'online' CHECK (tier IN ('online', 'archive')),
	CHECK ((kind = 'dicom') = (sop_instance_uid IS NOT NULL)),
	CHECK (kind = 'document' OR series IS NOT NULL)
);
CREATE INDEX ON mdd.object (patient);
CREATE INDEX ON mdd.object (series);
CREATE INDEX ON mdd.object (study);
CREATE INDEX ON mdd.object (sha256);
CREATE INDEX ON mdd.object (frame_of_reference_uid);

-- References an object makes to other objects, series or frames of
-- reference, by UID: they resolve against the catalog when read, so a
-- reference to something not (yet) archived waits for it to arrive.
CREATE TABLE mdd.reference (
	object			bigint NOT NULL REFERENCES mdd.object(id) ON DELETE CASCADE,
	kind			text NOT NULL CHECK (kind IN ('instance', 'series', 'frame_of_reference')),
	uid				text NOT NULL,
	sop_class_uid	text,
	via				text,
	PRIMARY KEY (object, kind, uid)
);
CREATE INDEX ON mdd.reference (uid, kind);

-- C functions.  Names with a leading underscore are internal: callable only
-- by mdd's own SECURITY DEFINER functions (see sql/roles.sql).
CREATE FUNCTION mdd.parse(data bytea) RETURNS jsonb
	AS 'MODULE_PATHNAME', 'mdd_parse_sql' LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION mdd.parse(bytea) IS
	'Describe a DICOM object without storing it: catalog attributes, references and header as JSON';
CREATE FUNCTION mdd._caller() RETURNS name
	AS 'MODULE_PATHNAME', 'mdd_caller_sql' LANGUAGE C STABLE;
CREATE FUNCTION mdd._check_path(path text, for_write boolean) RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_check_path_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._check_directory(path text, writable boolean) RETURNS text
	AS 'MODULE_PATHNAME', 'mdd_check_directory_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._read_file(path text) RETURNS bytea
	AS 'MODULE_PATHNAME', 'mdd_read_file_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._write_file(path text, data bytea, overwrite boolean) RETURNS bigint
	AS 'MODULE_PATHNAME', 'mdd_write_file_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._list_files(directory text) RETURNS SETOF text
	AS 'MODULE_PATHNAME', 'mdd_list_files_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._file_put(root text, locator text, data bytea) RETURNS bigint
	AS 'MODULE_PATHNAME', 'mdd_file_put_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._file_get(root text, locator text) RETURNS bytea
	AS 'MODULE_PATHNAME', 'mdd_file_get_sql' LANGUAGE C VOLATILE;
CREATE FUNCTION mdd._tally(series bigint, study bigint) RETURNS void
	AS 'MODULE_PATHNAME', 'mdd_tally_sql' LANGUAGE C VOLATILE;
