#!/usr/bin/env bash
# Starts and stops the WebDAV server of mdd's tests: a private nginx (Debian's
# nginx with its DAV module, and libnginx-mod-http-dav-ext when installed)
# on 127.0.0.1, with everything it writes under one directory.  Started as
# root, it runs as MDD_PEER_USER (default nobody).
#
#   scripts/peers/nginx-dav.sh start DIR PORT   serve DIR/www; returns once it answers
#   scripts/peers/nginx-dav.sh stop DIR
#
# Locations of http://127.0.0.1:PORT/:
#   /dav/     WebDAV (PUT, GET, HEAD, DELETE, MKCOL); PUT creates missing
#             parent collections
#   /strict/  WebDAV whose PUT answers 409 Conflict when the parent collection
#             is missing, as RFC 4918 servers do (the client then uses MKCOL)
#   /auth/    as /dav/, behind HTTP basic authentication: user MDD_DAV_USER
#             (default mdd), password MDD_DAV_PASSWORD (required for start)
#   /full/    answers everything with 507 Insufficient Storage
#   /busy/    answers everything with 503 Service Unavailable
# Blobs land in DIR/www/<location>/...; the access log is DIR/access.log.
set -euo pipefail

peer_user=${MDD_PEER_USER:-nobody}
nginx=$(command -v nginx || echo /usr/sbin/nginx)

as_peer() {
	if [[ $(id -u) -eq 0 ]]; then
		runuser -u "$peer_user" -- "$@"
	else
		"$@"
	fi
}

cmd=${1:?usage: nginx-dav.sh start DIR PORT | stop DIR}
dir=${2:?directory missing}

case "$cmd" in
start)
	port=${3:?port missing}
	: "${MDD_DAV_PASSWORD:?MDD_DAV_PASSWORD must be set}"
	[[ -x "$nginx" ]] || { echo "nginx-dav.sh: nginx is missing (scripts/install-deps.sh)" >&2; exit 1; }
	mkdir -p "$dir/www/dav" "$dir/www/strict" "$dir/www/auth" "$dir/tmp"
	dir=$(cd "$dir" && pwd)
	if [[ -s "$dir/nginx.pid" ]] && kill -0 "$(cat "$dir/nginx.pid")" 2>/dev/null; then
		echo "nginx-dav.sh: already running in $dir" >&2
		exit 1
	fi
	printf '%s:%s\n' "${MDD_DAV_USER:-mdd}" \
		"$(printf '%s' "$MDD_DAV_PASSWORD" | openssl passwd -apr1 -stdin)" >"$dir/htpasswd"
	dav_ext=""
	if [[ -f /usr/lib/nginx/modules/ngx_http_dav_ext_module.so ]]; then
		dav_ext="load_module /usr/lib/nginx/modules/ngx_http_dav_ext_module.so;"
	fi
	dav_ext_methods=""
	[[ -n "$dav_ext" ]] && dav_ext_methods="dav_ext_methods PROPFIND OPTIONS;"
	cat >"$dir/nginx.conf" <<EOF
$dav_ext
daemon on;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 256; }
http {
	access_log $dir/access.log;
	client_body_temp_path $dir/tmp/body;
	proxy_temp_path $dir/tmp/proxy;
	fastcgi_temp_path $dir/tmp/fastcgi;
	uwsgi_temp_path $dir/tmp/uwsgi;
	scgi_temp_path $dir/tmp/scgi;
	client_max_body_size 0;
	server {
		listen 127.0.0.1:$port;
		root $dir/www;
		location /dav/ {
			dav_methods PUT DELETE MKCOL;
			$dav_ext_methods
			create_full_put_path on;
			dav_access user:rw group:r all:r;
		}
		location /strict/ {
			# nginx itself answers 500 here; RFC 4918 servers answer 409
			set \$put_missing_parent "";
			if (\$request_method = PUT) { set \$put_missing_parent "put"; }
			if (\$uri ~ ^(.*/)[^/]+\$) { set \$parent \$1; }
			if (!-d \$document_root\$parent) { set \$put_missing_parent "\${put_missing_parent}-missing"; }
			if (\$put_missing_parent = "put-missing") { return 409; }
			dav_methods PUT DELETE MKCOL;
			dav_access user:rw group:r all:r;
		}
		location /auth/ {
			auth_basic "mdd";
			auth_basic_user_file $dir/htpasswd;
			dav_methods PUT DELETE MKCOL;
			create_full_put_path on;
			dav_access user:rw group:r all:r;
		}
		location /full/ { return 507; }
		location /busy/ { return 503; }
	}
}
EOF
	[[ $(id -u) -eq 0 ]] && chown -R "$peer_user" "$dir"
	chmod 600 "$dir/htpasswd"
	as_peer "$nginx" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
	for _ in $(seq 1 200); do
		code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/dav/" || true)
		if [[ "$code" != "000" && -s "$dir/nginx.pid" ]]; then
			exit 0
		fi
		sleep 0.05
	done
	echo "nginx-dav.sh: nginx did not answer within 10 s; its error log:" >&2
	tail -20 "$dir/error.log" >&2 || true
	exit 1
	;;
stop)
	[[ -f "$dir/nginx.pid" ]] || exit 0
	pid=$(cat "$dir/nginx.pid")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.05
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$dir/nginx.pid"
	;;
*)
	echo "nginx-dav.sh: unknown command $cmd" >&2
	exit 2
	;;
esac
