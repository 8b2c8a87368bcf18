#!/usr/bin/env bash
# The demo behind `make demo`: builds and installs mdd, starts a private
# PostgreSQL cluster under .demo/, creates the extension, generates a
# sample radiotherapy patient (planning CT, structure set, plan, dose, CBCT,
# a PDF), archives it, creates a small EMR whose course for the patient
# ended 120 days ago, moves the CBCT to an archive-tier file storage by the
# canonical archive rule, and shows what a user would look at first.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
demo="$top/.demo"
port=${MDD_DEMO_PORT:-54329}

sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)

echo "== building and installing mdd"
make -s
"${sudo[@]}" make -s install >/dev/null

mkdir -p "$demo"
chmod 755 "$demo"
echo "== generating a sample patient (100-slice CT, RT structure set, plan, dose, CBCT, PDF)"
/usr/bin/python3 scripts/generate_patient.py --out "$demo/patient" --slices 100 \
	--patient-id RT-DEMO-001 --patient-name "Demo^Patient" >/dev/null
chmod -R a+rX "$demo/patient"

echo "== starting PostgreSQL on 127.0.0.1:$port (data in .demo/pgdata)"
scripts/cluster.sh start "$demo/pgdata" "$port" "mdd.allowed_paths = '$demo'"

q() { scripts/cluster.sh psql "$demo/pgdata" -X -q -v ON_ERROR_STOP=1 "$@"; }

q -c "CREATE EXTENSION IF NOT EXISTS mdd"
echo "== archiving the patient"
q -c "SELECT count(object_id) AS stored, count(error) AS not_dicom
      FROM mdd.import('$demo/patient')"
q -c "SELECT mdd.store_document('RT-DEMO-001', pg_read_binary_file('$demo/patient/document.pdf'),
                                'document.pdf', description => 'Treatment summary') AS document_id" >/dev/null

echo
echo "== the patient's objects, by series"
q -c "SELECT coalesce(modality, kind) AS modality,
             coalesce(series_description, filename) AS series,
             study_date, count(*) AS objects,
             pg_size_pretty(sum(size)) AS size, min(tier) AS tier
      FROM mdd.objects WHERE patient_id = 'RT-DEMO-001'
      GROUP BY 1, 2, 3 ORDER BY min(id)"

echo "== what travels with the planning CT (mdd.related of its first slice)"
q -c "SELECT r.modality, r.sop_class_uid, r.series_description, pg_size_pretty(r.size) AS size
      FROM mdd.objects ct,
           LATERAL mdd.related(ct.id) AS rel(id)
           JOIN mdd.objects r ON r.id = rel.id
      WHERE ct.id = (SELECT min(id) FROM mdd.objects
                     WHERE patient_id = 'RT-DEMO-001' AND modality = 'CT'
                       AND series_description LIKE 'Planning CT%')
      ORDER BY r.id"

echo "== the clinic's EMR (scripts/emr_demo.sql): the patient's course ended 120 days ago"
q -f scripts/emr_demo.sql
q -c "INSERT INTO emr.patient (mrn, name, birth_date) VALUES ('RT-DEMO-001', 'Demo^Patient', '1950-01-01')
      ON CONFLICT (mrn) DO NOTHING" >/dev/null
q -c "INSERT INTO emr.course (patient, name, intent, start_date, end_date)
      SELECT p.id, 'C1 Prostate', 'curative', current_date - 160, current_date - 120
      FROM emr.patient p WHERE p.mrn = 'RT-DEMO-001'
        AND NOT EXISTS (SELECT 1 FROM emr.course c WHERE c.patient = p.id)" >/dev/null
q -c "SELECT p.mrn, c.name AS course, c.start_date, c.end_date
      FROM emr.course c JOIN emr.patient p ON p.id = c.patient ORDER BY c.id"

echo "== an archive rule: every CBCT of a patient whose courses all ended more than 90 days ago"
mkdir -p "$demo/archive"
[[ $(id -u) -eq 0 ]] && chown postgres: "$demo/archive"
q -c "SELECT mdd.add_storage('demo_archive', 'file', 'archive', '{\"root\": \"$demo/archive\"}')
      WHERE NOT EXISTS (SELECT 1 FROM mdd.storages WHERE name = 'demo_archive')" >/dev/null
q <<'SQL' >/dev/null
SELECT mdd.create_rule('cbct-after-course',
    $p$o.modality = 'CT'
       AND (o.series_description ILIKE '%CBCT%' OR o.image_type LIKE '%CBCT%')
       AND EXISTS (SELECT 1 FROM emr.patient p JOIN emr.course c ON c.patient = p.id
                   WHERE p.mrn = o.patient_id)
       AND NOT EXISTS (SELECT 1 FROM emr.patient p JOIN emr.course c ON c.patient = p.id
                       WHERE p.mrn = o.patient_id
                         AND (c.end_date IS NULL OR c.end_date > current_date - 90))$p$,
    storage => 'demo_archive', schedule => '0 1 * * *',
    window_start => '20:00', window_end => '06:00', batch_size => 500)
WHERE NOT EXISTS (SELECT 1 FROM mdd.rules WHERE name = 'cbct-after-course');
SQL
q -c "SELECT name, action, storage, schedule, window_start, window_end, batch_size FROM mdd.rules"
q -c "SELECT count(*) AS objects_the_rule_selects_now FROM mdd.preview_rule('cbct-after-course')"
echo "== running it now, outside its quiet-hours window (ignore_window): a job"
job=$(q -tA -c "SELECT mdd.run_rule('cbct-after-course', ignore_window => true)
                WHERE EXISTS (SELECT 1 FROM mdd.preview_rule('cbct-after-course'))")
if [[ -n $job ]]; then
	q -c "SELECT mdd.wait($job) AS job_$job"
	q -c "SELECT id, kind, rule, state, storage, total, done, failed, batches, pg_size_pretty(bytes) AS moved
	      FROM mdd.jobs WHERE id = $job"
fi
q -c "SELECT name, last_job, last_state, last_objects, pg_size_pretty(last_bytes) AS last_bytes, next_run
      FROM mdd.rules"
q -c "SELECT tier, count(*) AS objects, count(*) FILTER (WHERE mdd.read(id, true) IS NOT NULL) AS readable
      FROM mdd.objects WHERE patient_id = 'RT-DEMO-001' GROUP BY tier ORDER BY tier"

echo "== storage usage"
q -c "SELECT name, kind, tier, objects, pg_size_pretty(bytes) AS size FROM mdd.storages"

cat <<EOT
The demo cluster is running.
  connect:  psql -h 127.0.0.1 -p $port -U postgres
            then for example: SELECT * FROM mdd.objects WHERE patient_id = 'RT-DEMO-001';
  stop:     scripts/cluster.sh stop .demo/pgdata
  remove:   rm -rf .demo
EOT

# the web viewer (docs/viewer.md): mdd's HTTP service on the fifth port
# after PostgreSQL's (read at server start, hence the restart) and a role
# to sign in with
http_port=${MDD_DEMO_HTTP_PORT:-$((port + 5))}
if [[ $(q -tA -c "SHOW mdd.http_port") != "$http_port" ]]; then
	q -c "ALTER SYSTEM SET mdd.http_port = $http_port"
	scripts/cluster.sh stop "$demo/pgdata"
	scripts/cluster.sh start "$demo/pgdata" "$port"
fi
q -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'demo') THEN
          CREATE ROLE demo LOGIN PASSWORD 'demo' IN ROLE mdd_operator;
        END IF;
      END \$\$"
echo "  viewer:   http://127.0.0.1:$http_port/  (role demo, password demo; see docs/viewer.md)"
