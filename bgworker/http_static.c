/*-------------------------------------------------------------------------
 *
 * http_static.c
 *	  The route of static files: "/" and "/web/..." serve the files of
 *	  $(pg_config --sharedir)/mdd/web (the web viewer, installed with the
 *	  extension).
 *
 * A path must be relative to that directory, made of non-empty parts that
 * are neither "." nor ".." nor hidden (leading dot); anything else is
 * refused (403) before the file system is asked.  A file reached through a
 * symbolic link must still lie inside the directory.  Replies carry a
 * content type by extension, an ETag (size and modification time), a
 * Last-Modified date and "Cache-Control: no-cache", and a request whose
 * If-None-Match names the current ETag gets 304.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "miscadmin.h"

#include "http.h"

static const struct
{
	const char *extension;
	const char *type;
}			content_types[] = {
	{".html", "text/html; charset=utf-8"},
	{".htm", "text/html; charset=utf-8"},
	{".css", "text/css; charset=utf-8"},
	{".js", "text/javascript; charset=utf-8"},
	{".mjs", "text/javascript; charset=utf-8"},
	{".json", "application/json"},
	{".map", "application/json"},
	{".svg", "image/svg+xml"},
	{".png", "image/png"},
	{".jpg", "image/jpeg"},
	{".jpeg", "image/jpeg"},
	{".gif", "image/gif"},
	{".ico", "image/x-icon"},
	{".webp", "image/webp"},
	{".woff", "font/woff"},
	{".woff2", "font/woff2"},
	{".wasm", "application/wasm"},
	{".pdf", "application/pdf"},
	{".txt", "text/plain; charset=utf-8"},
};

static const char *
content_type_of(const char *path)
{
	const char *dot = strrchr(path, '.');

	if (dot && strchr(dot, '/') == NULL)
		for (int i = 0; i < lengthof(content_types); i++)
			if (pg_strcasecmp(dot, content_types[i].extension) == 0)
				return content_types[i].type;
	return "application/octet-stream";
}

/* true when every part of the relative path is a plain name */
static bool
plain_relative_path(const char *path)
{
	const char *p = path;

	if (*p == '\0' || strchr(path, '\\') != NULL)
		return false;
	while (*p)
	{
		const char *end = strchrnul(p, '/');

		if (end == p || *p == '.')
			return false;		/* empty, ".", "..", or hidden */
		p = *end ? end + 1 : end;
		if (*end && *p == '\0')
			return false;		/* trailing slash */
	}
	return true;
}

void
mdd_http_static(MddHttpRequest *req)
{
	char		share[MAXPGPATH];
	char	   *root;
	char	   *rel;
	char	   *path;
	char		real[PATH_MAX];
	char		real_root[PATH_MAX];
	struct stat st;
	int			fd;
	char		etag[64];
	char		date[64];
	const char *match;
	struct tm	tm;

	get_share_path(my_exec_path, share);
	root = psprintf("%s/mdd/web", share);
	rel = (strcmp(req->path, "/") == 0 || req->subpath[0] == '\0') ? "index.html" : (char *) req->subpath;
	if (!plain_relative_path(rel))
	{
		mdd_http_reply_error(req, 403, "42501",
							 "file paths must be relative, without empty, \".\" or \"..\" parts: %s",
							 req->path);
		return;
	}
	if (realpath(root, real_root) == NULL)
	{
		mdd_http_reply_error(req, 404, "58P01", "the web viewer is not installed (%s does not exist)", root);
		return;
	}
	path = psprintf("%s/%s", real_root, rel);
	if (realpath(path, real) == NULL || stat(real, &st) != 0)
	{
		mdd_http_reply_error(req, 404, "58P01", "no such file: %s", req->path);
		return;
	}
	if (strncmp(real, real_root, strlen(real_root)) != 0 || real[strlen(real_root)] != '/')
	{
		mdd_http_reply_error(req, 403, "42501", "file %s lies outside the web directory", req->path);
		return;
	}
	if (S_ISDIR(st.st_mode))
	{
		strlcat(real, "/index.html", sizeof(real));
		if (stat(real, &st) != 0)
		{
			mdd_http_reply_error(req, 404, "58P01", "no such file: %s", req->path);
			return;
		}
	}
	if (!S_ISREG(st.st_mode))
	{
		mdd_http_reply_error(req, 404, "58P01", "no such file: %s", req->path);
		return;
	}

	snprintf(etag, sizeof(etag), "\"%llx-%llx-%lx\"", (unsigned long long) st.st_size,
			 (unsigned long long) st.st_mtim.tv_sec, (long) st.st_mtim.tv_nsec);
	gmtime_r(&st.st_mtim.tv_sec, &tm);
	strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
	match = mdd_http_header(req, "If-None-Match");
	if (match && strstr(match, etag) != NULL)
		mdd_http_reply(req, 304, NULL, "", 0);
	else
	{
		fd = open(real, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
		{
			mdd_http_reply_error(req, 404, "58P01", "cannot open %s: %m", req->path);
			return;
		}
		mdd_http_reply_file(req, 200, content_type_of(real), fd, 0, st.st_size);
	}
	mdd_http_add_header(req, "ETag", etag);
	mdd_http_add_header(req, "Last-Modified", date);
	mdd_http_add_header(req, "Cache-Control", "no-cache");
}
