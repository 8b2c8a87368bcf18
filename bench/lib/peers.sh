# bench/lib/peers.sh: helpers shared by the DICOM benchmarks (bench/ingest_cstore,
# bench/find); sourced, not run.  The caller sets "set -euo pipefail", $work
# (a private directory, mode 755) and calls these from the top of the repository.
#
# Servers run unprivileged: as "postgres" when we are root (PostgreSQL refuses
# root, and Orthanc has no need of it), as ourselves otherwise.  Every DICOM
# process runs with TCP_NODELAY=1: DCMTK 3.6.7 reads it, and so does Orthanc,
# which is built on DCMTK.

export TCP_NODELAY=1

say() { printf '%s\n' "$*" >&2; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }
# best (smallest) and median of a space-separated list of numbers
best() { tr ' ' '\n' <<<"$1" | awk 'NF {if (m == "" || $1 < m) m = $1} END {print m}'; }
median() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{v[NR] = $1} END {print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }

# a TCP port nobody listens on now (another process may still take it: the
# callers check that their server came up)
free_port() {
	/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# the prefix that runs a command as the unprivileged server user in place
# (setpriv execs it: "${as_server[@]}" cmd & gives cmd's own pid in $!)
as_server=()
if [[ $(id -u) -eq 0 ]]; then
	as_server=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

# a directory the server user may write
server_dir() {
	mkdir -p "$1"
	if [[ $(id -u) -eq 0 ]]; then chown postgres: "$1"; fi
}

# wait until a DICOM peer answers C-ECHO: wait_echo AET PORT [seconds]
wait_echo() {
	local aet=$1 port=$2 tries=$((${3:-30} * 5))
	for ((k = 0; k < tries; k++)); do
		if echoscu -q -to 2 -aet BENCH -aec "$aet" 127.0.0.1 "$port" 2>/dev/null; then
			return 0
		fi
		sleep 0.2
	done
	say "no C-ECHO answer from $aet on port $port"
	return 1
}

# ---- PostgreSQL clusters (scripts/cluster.sh) --------------------------------

# start_cluster DATADIR SETTING... ; sets $cluster_port.  Tries a few ports.
start_cluster() {
	local datadir=$1 attempt
	shift
	for attempt in 1 2 3 4 5; do
		cluster_port=$(free_port)
		rm -rf "$datadir"
		if scripts/cluster.sh start "$datadir" "$cluster_port" "$@"; then
			return 0
		fi
		scripts/cluster.sh stop "$datadir" || true
		say "   could not start a cluster on port $cluster_port (attempt $attempt)"
	done
	return 1
}

# psql_at PORT [psql arguments ...]
psql_at() {
	local port=$1
	shift
	psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

# ---- Orthanc with the PostgreSQL index and storage plugins --------------------

orthanc_pid=

# orthanc_config FILE DIR PGPORT PGDB DICOMPORT HTTPPORT [EXTRA_JSON_MEMBERS]
# DIR gets the storage and index directories (unused with both plugins on,
# but Orthanc wants them writable).
orthanc_config() {
	local file=$1 dir=$2 pgport=$3 pgdb=$4 dicomport=$5 httpport=$6 extra=${7:-}
	local index storage
	index=$(dpkg -L orthanc-postgresql 2>/dev/null | grep '/libOrthancPostgreSQLIndex\.so$' | head -1)
	storage=$(dpkg -L orthanc-postgresql 2>/dev/null | grep '/libOrthancPostgreSQLStorage\.so$' | head -1)
	: "${index:=/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so}"
	: "${storage:=/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so}"
	server_dir "$dir"
	cat >"$file" <<-EOF
	{
	  "Name": "mdd-bench",
	  "StorageDirectory": "$dir",
	  "IndexDirectory": "$dir",
	  "Plugins": ["$index", "$storage"],
	  "PostgreSQL": {
	    "EnableIndex": true,
	    "EnableStorage": true,
	    "Host": "127.0.0.1",
	    "Port": $pgport,
	    "Database": "$pgdb",
	    "Username": "postgres",
	    "Password": "",
	    "Lock": false,
	    "IndexConnectionsCount": 1
	  },
	  "HttpServerEnabled": true,
	  "HttpPort": $httpport,
	  "RemoteAccessAllowed": false,
	  "AuthenticationEnabled": false,
	  "OrthancExplorerEnabled": false,
	  "WebDavEnabled": false,
	  "DicomServerEnabled": true,
	  "DicomAet": "ORTHANC",
	  "DicomPort": $dicomport,
	  "DicomCheckCalledAet": false,
	  "DicomAlwaysAllowEcho": true,
	  "DicomAlwaysAllowStore": true,
	  "DicomAlwaysAllowFind": true,
	  "DicomThreadsCount": 4,
	  "MaximumPduLength": 65536,
	  "StorageCompression": false,
	  "StableAge": 3600,
	  "SaveJobs": false,
	  "LimitFindResults": 0,
	  "LimitFindInstances": 0${extra:+,
	  $extra}
	}
	EOF
}

# orthanc_start CONFIG LOG HTTPPORT DICOMPORT: start, wait for REST and DICOM
orthanc_start() {
	local config=$1 log=$2 httpport=$3 dicomport=$4 k
	"${as_server[@]}" env TCP_NODELAY=1 Orthanc "$config" >>"$log" 2>&1 &
	orthanc_pid=$!
	for ((k = 0; k < 300; k++)); do
		if curl -sf "http://127.0.0.1:$httpport/system" >/dev/null; then
			wait_echo ORTHANC "$dicomport" 30
			return
		fi
		if ! kill -0 "$orthanc_pid" 2>/dev/null; then
			say "Orthanc exited at start; its log:"
			tail -20 "$log" >&2
			orthanc_pid=
			return 1
		fi
		sleep 0.2
	done
	say "Orthanc did not answer on http://127.0.0.1:$httpport within 60 s"
	return 1
}

orthanc_stop() {
	if [[ -n $orthanc_pid ]]; then
		kill -TERM "$orthanc_pid" 2>/dev/null || true
		wait "$orthanc_pid" 2>/dev/null || true
		orthanc_pid=
	fi
}

# orthanc_count HTTPPORT FIELD: a count of /statistics (CountInstances, CountStudies)
orthanc_count() {
	curl -sf "http://127.0.0.1:$1/statistics" |
		/usr/bin/python3 -c "import json, sys; print(json.load(sys.stdin)['$2'])"
}
