#!/usr/bin/env bash
# Starts and stops private PostgreSQL 15 clusters for mdd's demo, tests and
# benchmarks, with mdd preloaded.  As root, the server runs as "postgres".
#
#   scripts/cluster.sh start DATADIR PORT [setting=value ...]
#   scripts/cluster.sh stop DATADIR
#   scripts/cluster.sh psql DATADIR [psql arguments ...]   (connects as postgres)
set -euo pipefail

bindir=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
[[ -x "$bindir/initdb" ]] || bindir=/usr/lib/postgresql/15/bin

as_owner() {
	if [[ $(id -u) -eq 0 ]]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

cmd=${1:?usage: cluster.sh start|stop|psql DATADIR ...}
datadir=${2:?data directory missing}

case "$cmd" in
start)
	port=${3:?port missing}
	shift 3
	if [[ ! -f "$datadir/PG_VERSION" ]]; then
		mkdir -p "$datadir"
		[[ $(id -u) -eq 0 ]] && chown postgres: "$datadir"
		chmod 700 "$datadir"
		if ! as_owner test -w "$datadir"; then
			echo "cluster.sh: the server user cannot write $datadir (are its parent directories searchable?)" >&2
			exit 1
		fi
		as_owner "$bindir/initdb" -D "$datadir" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
		{
			echo "port = $port"
			echo "listen_addresses = '127.0.0.1'"
			echo "unix_socket_directories = '$datadir'"
			echo "shared_preload_libraries = 'mdd'"
			echo "max_connections = 50"
			echo "max_worker_processes = 16"
			echo "shared_buffers = 256MB"
			echo "max_wal_size = 4GB"
			echo "logging_collector = off"
			for setting in "$@"; do echo "$setting"; done
		} >> "$datadir/postgresql.conf"
	fi
	# already running (a demo started again): nothing to do
	if as_owner "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
		exit 0
	fi
	as_owner "$bindir/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w -t 60 start >/dev/null
	;;
stop)
	if [[ -f "$datadir/postmaster.pid" ]]; then
		as_owner "$bindir/pg_ctl" -D "$datadir" -m fast -w -t 60 stop >/dev/null || true
	fi
	;;
psql)
	shift 2
	port=$(sed -n 's/^port = //p' "$datadir/postgresql.conf" | tail -1)
	exec psql -h 127.0.0.1 -p "$port" -U postgres "$@"
	;;
*)
	echo "cluster.sh: unknown command $cmd" >&2
	exit 2
	;;
esac
