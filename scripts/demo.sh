#!/usr/bin/env bash
# The guided tour behind `make demo`: in about a minute a newcomer sees the
# whole product at work, each step printed with what it shows.  It builds
# and installs mdd, starts a private PostgreSQL cluster under .demo/ with
# mdd's DICOM service, and two DICOM peers of its own: a "PACS" (DCMTK's
# dcmqrscp, holding a prior study of the patient) and a "planning system"
# (DCMTK's storescp).  Then: a modality stores a radiotherapy patient by
# C-STORE (storescu), the canonical archive rule moves the CBCTs to an
# archive-tier storage, the patient list, a restore, a find across the
# archive and the PACS, a send to the planning system, the audit trail.
# The peers are stopped at the end; the cluster keeps running to play with.
#
# Settings (environment): MDD_DEMO_DIR (default .demo), MDD_DEMO_PORT
# (PostgreSQL, default 54329; the DICOM service, the PACS and the planning
# system listen on the three ports after it), MDD_DEMO_SLICES (planning CT
# slices, default 100), MDD_DEMO_NO_BUILD=1 (mdd is already installed).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
demo=${MDD_DEMO_DIR:-$top/.demo}
port=${MDD_DEMO_PORT:-54329}
dicom_port=$((port + 1))
pacs_port=$((port + 2))
tps_port=$((port + 3))
slices=${MDD_DEMO_SLICES:-100}
patient=RT-DEMO-001
export TCP_NODELAY=1

sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)

step_no=0
step() {
	step_no=$((step_no + 1))
	printf '\n==== Step %d: %s\n' "$step_no" "$1"
	shift
	for line in "$@"; do printf '     %s\n' "$line"; done
	echo
}
q() { scripts/cluster.sh psql "$demo/pgdata" -X -q -v ON_ERROR_STOP=1 "$@"; }

# the peers this script starts, stopped whatever happens
peer_pids=()
stop_peers() {
	for pid in "${peer_pids[@]}"; do
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	peer_pids=()
}
trap stop_peers EXIT

wait_port() {
	for _ in $(seq 100); do
		(echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.1
	done
	echo "demo: nothing listens on port $1 ($2)" >&2
	return 1
}

step "Build and install" "make && make install: the extension (SQL), mdd.so (C, C++ for DICOM through DCMTK)."
if [[ -z ${MDD_DEMO_NO_BUILD:-} ]]; then
	make -s
	"${sudo[@]}" make -s install >/dev/null
fi
mkdir -p "$demo"
chmod 755 "$demo"
if [[ ! -f "$demo/patient/manifest.json" ]]; then
	/usr/bin/python3 scripts/generate_patient.py --out "$demo/patient" --slices "$slices" \
		--patient-id "$patient" --patient-name "Demo^Patient" >/dev/null
	# a prior study of the same patient, which only the PACS has
	/usr/bin/python3 scripts/generate_patient.py --out "$demo/prior" --slices 5 --seed 2 --no-pdf \
		--patient-id "$patient" --patient-name "Demo^Patient" >/dev/null
	chmod -R a+rX "$demo/patient" "$demo/prior"
fi
echo "generated: a radiotherapy patient ($slices-slice planning CT, RT structure set, plan, dose, CBCTs, a PDF)"

step "Start PostgreSQL with mdd" \
	"shared_preload_libraries = 'mdd': a launcher starts the DICOM listeners, job runners and" \
	"the rule scheduler as background workers once CREATE EXTENSION mdd has run."
scripts/cluster.sh start "$demo/pgdata" "$port" "mdd.allowed_paths = '$demo'" \
	"mdd.dicom_port = $dicom_port" "mdd.dicom_listen_address = '127.0.0.1'"
q -c "CREATE EXTENSION IF NOT EXISTS mdd"
q -c "SELECT extversion AS mdd_version FROM pg_extension WHERE extname = 'mdd'"

step "Register the DICOM nodes" \
	"Only known AE titles may talk to the archive: a CT scanner that stores, a PACS to query," \
	"a treatment planning system to send plans to (mdd.add_node; see mdd.nodes)."
q <<SQL >/dev/null
SELECT mdd.add_node('scanner', 'CT_SCANNER', '127.0.0.1', NULL, '{"query": false, "retrieve": false}')
WHERE NOT EXISTS (SELECT 1 FROM mdd.nodes WHERE name = 'scanner');
SELECT mdd.add_node('pacs', 'DEMO_PACS', '127.0.0.1', $pacs_port)
WHERE NOT EXISTS (SELECT 1 FROM mdd.nodes WHERE name = 'pacs');
SELECT mdd.add_node('planning', 'DEMO_TPS', '127.0.0.1', $tps_port, '{"store": false, "find": false}')
WHERE NOT EXISTS (SELECT 1 FROM mdd.nodes WHERE name = 'planning');
SQL
q -c "SELECT name, ae_title, host, port, may_store, may_query, may_send FROM mdd.nodes ORDER BY name"

# the PACS: dcmqrscp with the prior study; the planning system: storescp
mkdir -p "$demo/pacs/storage" "$demo/planning"
cat >"$demo/pacs/dcmqrscp.cfg" <<EOF
NetworkTCPPort  = $pacs_port
MaxPDUSize      = 65536
MaxAssociations = 16
UserName        = $(id -un)
GroupName       = $(id -gn)
HostTable BEGIN
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
DEMO_PACS  $demo/pacs/storage  RW  (500, 1024mb)  ANY
AETable END
EOF
if [[ ! -f "$demo/pacs/storage/index.dat" ]]; then
	find "$demo/prior" -name '*.dcm' -exec cp {} "$demo/pacs/storage/" \;
	dcmqridx "$demo/pacs/storage" "$demo/pacs/storage"/*.dcm
fi
dcmqrscp -c "$demo/pacs/dcmqrscp.cfg" "$pacs_port" >"$demo/pacs/dcmqrscp.log" 2>&1 &
peer_pids+=($!)
rm -rf "$demo/planning/received"
mkdir -p "$demo/planning/received"
storescp -aet DEMO_TPS -od "$demo/planning/received" "$tps_port" >"$demo/planning/storescp.log" 2>&1 &
peer_pids+=($!)
wait_port "$pacs_port" "the PACS (dcmqrscp)"
wait_port "$tps_port" "the planning system (storescp)"
wait_port "$dicom_port" "mdd's DICOM service"
echo "started: the PACS DEMO_PACS (dcmqrscp) on port $pacs_port, the planning system DEMO_TPS (storescp) on port $tps_port"

step "A modality stores the patient by C-STORE" \
	"storescu (DCMTK) sends every DICOM file to mdd's AE title MDD on port $dicom_port; each object" \
	"is parsed, catalogued and kept byte for byte. The PDF goes in over SQL (mdd.store_document)."
storescu -aet CT_SCANNER -aec MDD +sd +r +sp '*.dcm' 127.0.0.1 "$dicom_port" "$demo/patient" >/dev/null 2>&1 || true
q -c "SELECT mdd.store_document('$patient', pg_read_binary_file('$demo/patient/document.pdf'),
                                'document.pdf', description => 'Treatment summary') AS document_id" >/dev/null
q -c "SELECT coalesce(modality, kind) AS modality,
             coalesce(series_description, filename) AS series,
             count(*) AS objects, pg_size_pretty(sum(size)) AS size, min(tier) AS tier
      FROM mdd.objects WHERE patient_id = '$patient'
      GROUP BY 1, 2 ORDER BY min(id)"

step "The canonical archive rule: CBCTs of finished courses go to the archive tier" \
	"A rule is an SQL predicate over mdd.objects that may join the EMR's own tables (here a" \
	"demo EMR whose course ended 120 days ago), run by the scheduler in a night window." \
	"We run it now, outside its window, and wait for the job."
q -f scripts/emr_demo.sql >/dev/null
q -c "INSERT INTO emr.patient (mrn, name, birth_date) VALUES ('$patient', 'Demo^Patient', '1950-01-01')
      ON CONFLICT (mrn) DO NOTHING" >/dev/null
q -c "INSERT INTO emr.course (patient, name, intent, start_date, end_date)
      SELECT p.id, 'C1 Prostate', 'curative', current_date - 160, current_date - 120
      FROM emr.patient p WHERE p.mrn = '$patient'
        AND NOT EXISTS (SELECT 1 FROM emr.course c WHERE c.patient = p.id)" >/dev/null
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
q -c "SELECT name, action, storage, schedule, window_start, window_end FROM mdd.rules"
job=$(q -tA -c "SELECT mdd.run_rule('cbct-after-course', ignore_window => true)
                WHERE EXISTS (SELECT 1 FROM mdd.preview_rule('cbct-after-course'))")
if [[ -n $job ]]; then
	q -c "SELECT mdd.wait($job) AS rule_job_$job"
fi
q -c "SELECT coalesce(modality, kind) AS modality, tier, count(*) AS objects
      FROM mdd.objects WHERE patient_id = '$patient' GROUP BY 1, 2 ORDER BY 1, 2"

step "The patient list" \
	"mdd.patient_list: everything known about a patient, online or archived, here or (with" \
	"include_remote) on the nodes: one list for the EMR's screens."
q -c "SELECT location, tier, kind, study_date, modality,
             coalesce(series_description, '') AS series, objects, pg_size_pretty(bytes) AS size
      FROM mdd.patient_list('$patient', include_remote => true)"

step "A restore" \
	"The patient comes back for re-treatment: mdd.restore brings the archived CBCTs back to the" \
	"online tier (a job: copy, verify, then release the archive copy)."
job=$(q -tA -c "SELECT mdd.restore(array_agg(id), false) FROM mdd.objects
                WHERE patient_id = '$patient' AND tier = 'archive' HAVING count(*) > 0")
if [[ -n $job ]]; then
	q -c "SELECT mdd.wait($job) AS restore_job_$job"
	q -c "SELECT kind, state, total, done, failed, pg_size_pretty(bytes) AS moved FROM mdd.jobs WHERE id = $job"
fi

step "A find across the archive and the PACS" \
	"mdd.find: one C-FIND per node, in parallel, merged with the local catalog; the PACS" \
	"holds a prior study that the archive does not."
q -c "SELECT location, status, study_date, study_instance_uid, modality, instances
      FROM mdd.find(patient_id => '$patient') ORDER BY location, study_date"

step "A send to the planning system" \
	"mdd.send: the plan with its structure set, dose and planning CT go to DEMO_TPS by" \
	"C-STORE (a job, retried while the node is down)."
job=$(q -tA -c "SELECT mdd.send(array_agg(id), 'planning') FROM mdd.objects
                WHERE patient_id = '$patient'
                  AND (modality IN ('RTPLAN', 'RTSTRUCT', 'RTDOSE') OR series_description LIKE 'Planning CT%')")
q -c "SELECT mdd.wait($job) AS send_job_$job"
q -c "SELECT kind, state, total, done, failed FROM mdd.jobs WHERE id = $job"
echo "the planning system received $(find "$demo/planning/received" -type f | wc -l) files"

step "The audit trail" \
	"Every store, read, archive, restore, find, send and DICOM association is in mdd.audit_log," \
	"with the role or AE title and the client's address."
q -c "SELECT action, count(*) AS rows, min(client) AS a_client
      FROM mdd.audit_log GROUP BY action ORDER BY min(at)"

stop_peers
echo
echo "stopped: the PACS and the planning system"

# ---- further steps of the tour go here, before the closing words ----

cat <<EOT

The demo cluster is running.
  connect:  psql -h 127.0.0.1 -p $port -U postgres
            then for example: SELECT * FROM mdd.objects WHERE patient_id = '$patient';
  DICOM:    AE title MDD on 127.0.0.1:$dicom_port
  stop:     scripts/cluster.sh stop $demo/pgdata
  remove:   rm -rf $demo
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
