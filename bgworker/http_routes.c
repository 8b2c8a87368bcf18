/*-------------------------------------------------------------------------
 *
 * http_routes.c
 *	  The routes of the HTTP service: path prefix, methods, the role the
 *	  caller must be a member of, and the handler (see http.h).  The first
 *	  route whose prefix matches serves the request; a path no route
 *	  matches gets 404.  A service adds its line here.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "http.h"
#include "dicomweb.h"

const MddHttpRoute mdd_http_routes[] = {
	/* the web viewer's files (http_static.c) */
	{"/", true, "GET, HEAD", "mdd_reader", mdd_http_static},
	{"/web/", false, "GET, HEAD", "mdd_reader", mdd_http_static},

	/* the JSON API of the web pages: mdd.web_api(name, params) (http_api.c) */
	{"/api/", false, "GET, HEAD, POST", "mdd_reader", mdd_http_api},

	/* DICOMweb: QIDO-RS, WADO-RS, STOW-RS (dicomweb*.c; STOW needs mdd_operator) */
	{"/dicomweb/", false, "GET, HEAD, POST", "mdd_reader", mdd_dicomweb_handler},
};

const int	mdd_http_route_count = lengthof(mdd_http_routes);
