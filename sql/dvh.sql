-- mdd: dose-volume histograms of the ROIs of a structure set over a dose grid

-- The C side (extension/dvh.c): reads both objects from their bytes and
-- computes one row per ROI.  The ids only name the objects in messages.
CREATE FUNCTION mdd._dvh(dose_id bigint, dose bytea, structure_set_id bigint,
						 structure_set bytea, bin_width double precision)
RETURNS TABLE(roi_number integer, roi_name text, volume_cc double precision,
			  min_gy double precision, mean_gy double precision, max_gy double precision,
			  d95_gy double precision, dose_gy double precision[],
			  volume_pct double precision[], d2_gy double precision,
			  d50_gy double precision, d98_gy double precision,
			  v20_pct double precision, voxels bigint)
AS 'MODULE_PATHNAME', 'mdd_dvh_sql'
LANGUAGE C STRICT VOLATILE;

-- Cumulative DVH of each ROI of an RT Structure Set over an RT Dose, from
-- the stored bytes of both (any storage, any tier), with dicompyler-core's
-- method (see docs/sql.md).
CREATE FUNCTION mdd.dvh(dose_id bigint, structure_set_id bigint,
						bin_width_gy double precision DEFAULT 0.01)
RETURNS TABLE(roi_number integer, roi_name text, volume_cc double precision,
			  min_gy double precision, mean_gy double precision, max_gy double precision,
			  d95_gy double precision, dose_gy double precision[],
			  volume_pct double precision[], d2_gy double precision,
			  d50_gy double precision, d98_gy double precision,
			  v20_pct double precision, voxels bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	want constant text[] := ARRAY['1.2.840.10008.5.1.4.1.1.481.2', '1.2.840.10008.5.1.4.1.1.481.3'];
	label constant text[] := ARRAY['RT Dose', 'RT Structure Set'];
	ids bigint[] := ARRAY[dose_id, structure_set_id];
	cls text;
	modality text;
	patient text;
BEGIN
	IF dose_id IS NULL OR structure_set_id IS NULL OR bin_width_gy IS NULL THEN
		RAISE EXCEPTION 'dose id, structure set id and bin width must not be NULL'
			USING ERRCODE = '22004';
	END IF;
	IF NOT (bin_width_gy > 0 AND bin_width_gy < 'infinity') THEN
		RAISE EXCEPTION 'bin width % Gy is not a positive number', bin_width_gy
			USING ERRCODE = '22023';
	END IF;
	FOR i IN 1 .. 2 LOOP
		SELECT o.sop_class_uid, se.modality INTO cls, modality
		FROM mdd.object o LEFT JOIN mdd.series se ON se.id = o.series
		WHERE o.id = ids[i];
		IF NOT FOUND THEN
			RAISE EXCEPTION 'object % does not exist', ids[i] USING ERRCODE = '42704';
		END IF;
		IF cls IS DISTINCT FROM want[i] THEN
			RAISE EXCEPTION 'object % is not an %', ids[i], label[i]
				USING ERRCODE = '22023',
					  DETAIL = format('Its modality is %s and its SOP Class UID %s.',
									  coalesce(modality, 'none'), coalesce(cls, 'none'));
		END IF;
	END LOOP;

	RETURN QUERY
	SELECT * FROM mdd._dvh(dose_id, mdd._fetch(dose_id, false),
						   structure_set_id, mdd._fetch(structure_set_id, false),
						   bin_width_gy);

	FOR i IN 1 .. 2 LOOP
		SELECT p.patient_id INTO patient
		FROM mdd.object o JOIN mdd.patient p ON p.id = o.patient WHERE o.id = ids[i];
		PERFORM mdd._audit('dvh', ids[i], patient,
						   format('dose %s, structure set %s', dose_id, structure_set_id));
	END LOOP;
END;
$$;
COMMENT ON FUNCTION mdd.dvh(bigint, bigint, double precision) IS
	'Cumulative dose-volume histogram and dose statistics of each ROI of an RT Structure Set over an RT Dose';
