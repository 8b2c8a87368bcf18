/*-------------------------------------------------------------------------
 *
 * find.h
 *	  What the backend running mdd.find (find.c) and its find workers
 *	  (bgworker/find_worker.c) share: the layout of the dynamic shared
 *	  memory segment of one query, and the messages a worker sends back.
 *
 * The segment holds a table of contents (shm_toc) with the query (level,
 * filters, our AE title, the nodes) and one message queue per node, from
 * its worker to the backend.  A worker sends one message per match, then
 * one end message saying how its C-FIND ended.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_FIND_H
#define MDD_FIND_H

#include "postgres.h"

#define MDD_FIND_MAGIC			0x6d646446	/* "mddF" */
#define MDD_FIND_KEY_QUERY		0
#define MDD_FIND_KEY_QUEUE(i)	(1 + (i))
#define MDD_FIND_QUEUE_SIZE		65536

/* the levels of mdd.find */
#define MDD_FIND_STUDY			1
#define MDD_FIND_SERIES			2
#define MDD_FIND_IMAGE			3

/* the filters of mdd.find, in the order of its arguments */
typedef enum MddFindFilter
{
	MDD_FILTER_PATIENT_ID,
	MDD_FILTER_PATIENT_NAME,
	MDD_FILTER_STUDY_DATE,
	MDD_FILTER_MODALITY,
	MDD_FILTER_STUDY_UID,
	MDD_FILTER_ACCESSION,
	MDD_FIND_NFILTERS
} MddFindFilter;

/* the columns of a match, as mdd.find returns them after location, status, level */
typedef enum MddFindColumn
{
	MDD_COL_PATIENT_ID,
	MDD_COL_PATIENT_NAME,
	MDD_COL_STUDY_UID,
	MDD_COL_STUDY_DATE,
	MDD_COL_SERIES_UID,
	MDD_COL_SOP_UID,
	MDD_COL_MODALITY,
	MDD_COL_DESCRIPTION,
	MDD_COL_INSTANCES,
	MDD_FIND_NCOLUMNS
} MddFindColumn;

#define MDD_FIND_MAX_FILTER		4096	/* bytes of one filter value */

/* one node to query */
typedef struct MddFindNode
{
	char		name[64];
	char		ae_title[17];
	char		host[256];
	int			port;
	int			timeout_ms;
	bool		tls;			/* the node's tls option */
} MddFindNode;

/* the query, at MDD_FIND_KEY_QUERY */
typedef struct MddFindQuery
{
	char		our_ae[17];
	int			level;
	bool		has_filter[MDD_FIND_NFILTERS];
	char		filter[MDD_FIND_NFILTERS][MDD_FIND_MAX_FILTER + 1];
	int			nnodes;
	MddFindNode nodes[FLEXIBLE_ARRAY_MEMBER];
} MddFindQuery;

/*
 * Messages from a worker: a match is 'M' then, for each column, a 4-byte
 * length (MDD_FIND_NULL for NULL) and the UTF-8 bytes; the end is 'E', one
 * byte of MddFindFailure, and the text of the reason.
 */
#define MDD_FIND_MSG_MATCH		'M'
#define MDD_FIND_MSG_END		'E'
#define MDD_FIND_NULL			0xFFFFFFFFu

/* bgworker/find_worker.c */
PGDLLEXPORT void mdd_find_worker_main(Datum arg);

#endif							/* MDD_FIND_H */
