/*-------------------------------------------------------------------------
 *
 * dicomweb.h
 *	  DICOMweb (PS3.18) on the HTTP service: the route /dicomweb/ and what
 *	  its parts share.  dicomweb.c routes and searches (QIDO-RS),
 *	  dicomweb_wado.c retrieves (WADO-RS), dicomweb_stow.c stores (STOW-RS).
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_DICOMWEB_H
#define MDD_DICOMWEB_H

#include "http.h"

/* binary values longer than this (bytes) are BulkDataURIs in metadata; 0: none */
extern int	mdd_dicomweb_bulk_threshold;

extern void mdd_dicomweb_define_settings(void);

/* the handler of the route /dicomweb/ (http_routes.c) */
extern void mdd_dicomweb_handler(MddHttpRequest *req);

/* WADO-RS: what is asked, from the path */
typedef struct DicomwebTarget
{
	const char *study;
	const char *series;			/* NULL: the whole study */
	const char *instance;		/* NULL: the whole series */
	const char *frames;			/* "1,3,5" or NULL */
	const char *bulk_tag;		/* "7FE00010" or NULL */
	bool		metadata;
} DicomwebTarget;

extern void mdd_dicomweb_retrieve(MddHttpRequest *req, const DicomwebTarget *t);
extern void mdd_dicomweb_store(MddHttpRequest *req, const char *study);

/* "http://host:port/dicomweb" */
extern char *mdd_dicomweb_root(MddHttpRequest *req);

/* the bytes of object id by the strict read path (mdd.read) */
extern bytea *mdd_dicomweb_read_object(int64 id);

#endif
