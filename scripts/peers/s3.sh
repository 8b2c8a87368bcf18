#!/usr/bin/env bash
# Installs, starts and stops the S3-compatible server of mdd's tests: s3rver
# (npm, version pinned with its dependencies in scripts/peers/s3rver/) behind
# scripts/peers/s3-server.js, which adds the checks of a real S3 (signature
# V4, x-amz-content-sha256, Content-MD5).  It listens on 127.0.0.1 only and,
# started as root, runs as MDD_PEER_USER (default nobody).
#
#   scripts/peers/s3.sh install          install s3rver into the cache, unless there
#   scripts/peers/s3.sh start DIR PORT   start it (installing first) with its objects in
#                                        DIR/data and its log in DIR/s3.log; returns once
#                                        it answers
#   scripts/peers/s3.sh stop DIR         stop it
#
# start reads MDD_S3_ACCESS_KEY_ID and MDD_S3_SECRET_ACCESS_KEY (required),
# MDD_S3_REGION (us-east-1), MDD_S3_BUCKETS (space-separated buckets to
# create, default "mdd"), MDD_S3_REQUIRE_CONTENT_MD5 (1: refuse PUTs without
# Content-MD5).  The cache is MDD_NPM_CACHE_DIR, else /var/cache/mdd-test/npm
# when that can be written, else ~/.cache/mdd-test/npm; npm runs only when
# the installed lock file differs from the pinned one.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
peer_user=${MDD_PEER_USER:-nobody}

# shellcheck source=npm-cache.sh
source "$here/npm-cache.sh"
cache_dir() { npm_cache_top; }

install() (
	local dir
	dir=$(cache_dir)
	mkdir -p "$dir"
	# one installer at a time (test runs may share the cache); a subshell,
	# so that the lock is not inherited by the server
	exec 9>"$dir/.install.lock"
	flock 9
	if [[ -f "$dir/node_modules/s3rver/package.json" ]] &&
		cmp -s "$here/s3rver/package-lock.json" "$dir/package-lock.json"; then
		return 0
	fi
	command -v npm >/dev/null || { echo "s3.sh: npm is missing (scripts/install-deps.sh)" >&2; exit 1; }
	echo "s3.sh: installing s3rver into $dir" >&2
	cp "$here/s3rver/package.json" "$here/s3rver/package-lock.json" "$dir/"
	(cd "$dir" && npm_config_cache="$dir/.npm" npm ci --no-audit --no-fund --loglevel=error >&2)
	chmod -R a+rX "$dir"
)

as_peer() {
	if [[ $(id -u) -eq 0 ]]; then
		runuser -u "$peer_user" -- "$@"
	else
		"$@"
	fi
}

cmd=${1:?usage: s3.sh install | start DIR PORT | stop DIR}
case "$cmd" in
install)
	install
	;;
start)
	dir=${2:?data directory missing}
	port=${3:?port missing}
	: "${MDD_S3_ACCESS_KEY_ID:?MDD_S3_ACCESS_KEY_ID must be set}"
	: "${MDD_S3_SECRET_ACCESS_KEY:?MDD_S3_SECRET_ACCESS_KEY must be set}"
	install
	modules=$(cache_dir)
	mkdir -p "$dir/data"
	[[ $(id -u) -eq 0 ]] && chown -R "$peer_user" "$dir"
	if [[ -s "$dir/s3.pid" ]] && kill -0 "$(cat "$dir/s3.pid")" 2>/dev/null; then
		echo "s3.sh: already running in $dir" >&2
		exit 1
	fi
	# the secret reaches node through its environment, not its command line;
	# node writes its own pid file once it listens
	rm -f "$dir/s3.pid"
	as_peer env MDD_S3RVER_DIR="$modules" MDD_S3_DIR="$dir/data" MDD_S3_PORT="$port" \
		MDD_S3_PIDFILE="$dir/s3.pid" \
		MDD_S3_ACCESS_KEY_ID="$MDD_S3_ACCESS_KEY_ID" MDD_S3_SECRET_ACCESS_KEY="$MDD_S3_SECRET_ACCESS_KEY" \
		MDD_S3_REGION="${MDD_S3_REGION:-us-east-1}" MDD_S3_BUCKETS="${MDD_S3_BUCKETS:-mdd}" \
		MDD_S3_REQUIRE_CONTENT_MD5="${MDD_S3_REQUIRE_CONTENT_MD5:-0}" \
		node "$here/s3-server.js" >>"$dir/s3.log" 2>&1 </dev/null &
	launcher=$!
	for _ in $(seq 1 200); do
		if [[ -s "$dir/s3.pid" ]] && grep -q "^mdd s3 peer listening" "$dir/s3.log" 2>/dev/null; then
			exit 0
		fi
		if ! kill -0 "$launcher" 2>/dev/null; then
			echo "s3.sh: the server exited; its log:" >&2
			tail -20 "$dir/s3.log" >&2
			exit 1
		fi
		sleep 0.05
	done
	echo "s3.sh: the server did not answer within 10 s; its log:" >&2
	tail -20 "$dir/s3.log" >&2
	exit 1
	;;
stop)
	dir=${2:?data directory missing}
	[[ -f "$dir/s3.pid" ]] || exit 0
	pid=$(cat "$dir/s3.pid")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.05
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$dir/s3.pid"
	;;
*)
	echo "s3.sh: unknown command $cmd" >&2
	exit 2
	;;
esac
