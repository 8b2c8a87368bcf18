/*-------------------------------------------------------------------------
 *
 * dicom.h
 *	  The only door between mdd's C code and DCMTK (C++).
 *
 * Everything behind this header lives in dicom_*.cpp, which include no
 * PostgreSQL header.  Functions here never throw and never longjmp: they
 * return a status code and, on failure, a message in the caller's buffer.
 * Memory handed back is malloc()ed and released with the matching
 * mdd_dicom_free_*() function.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_DICOM_H
#define MDD_DICOM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C"
{
#endif

/* status codes returned by the functions of this header */
typedef enum MddDicomStatus
{
	MDD_DICOM_OK = 0,
	MDD_DICOM_EMPTY,			/* no bytes at all */
	MDD_DICOM_NOT_DICOM,		/* bytes are not a DICOM file or data set */
	MDD_DICOM_MALFORMED,		/* DICOM, but truncated or unreadable */
	MDD_DICOM_MISSING_UID,		/* readable, but without SOP class/instance UID */
	MDD_DICOM_OUT_OF_MEMORY,
	MDD_DICOM_NETWORK,			/* connection, negotiation or peer failure */
	MDD_DICOM_NOT_SENDABLE,		/* the peer accepts no context the object can go in */
	MDD_DICOM_INTERNAL,			/* anything else (a caught C++ exception) */
	MDD_DICOM_INVALID,			/* readable, but a required attribute is
								 * missing or has an impossible value */
	MDD_DICOM_UNSUPPORTED,		/* valid, but in a form mdd cannot use (for
								 * example compressed dose pixels) */
	MDD_DICOM_REFUSED			/* the peer answered a request with a failure
								 * status */
} MddDicomStatus;

/*
 * Parse one DICOM object (a Part 10 file or a bare data set in any transfer
 * syntax) held in memory.  On success *json_out receives a NUL-terminated
 * JSON document (malloc()ed, free with mdd_dicom_free_json) describing the
 * object: the catalog attributes as UTF-8 text, the references it makes to
 * other objects, and the rest of its top-level header.  On failure *json_out
 * is NULL and errbuf holds a one-line reason.
 */
extern MddDicomStatus mdd_dicom_parse(const unsigned char *data, size_t len,
									  char **json_out,
									  char *errbuf, size_t errbuf_len);

extern void mdd_dicom_free_json(char *json);

/* ---------------------------------------------------------------------
 * DICOM network service (dicom_net.cpp)
 * ---------------------------------------------------------------------
 */

/* what an admitted peer may do (bits of the value returned by admit) */
#define MDD_PERMIT_ASSOCIATE	0x01	/* any admitted peer: C-ECHO */
#define MDD_PERMIT_STORE		0x02
#define MDD_PERMIT_QUERY		0x04
#define MDD_PERMIT_RETRIEVE		0x08

/* log levels of the log callback */
#define MDD_LOG_DEBUG	0
#define MDD_LOG_INFO	1
#define MDD_LOG_WARNING 2

/* one value of one C-FIND match (row numbers from 0) */
typedef struct MddFindItem
{
	int			row;
	const char *keyword;		/* DICOM keyword, e.g. "StudyInstanceUID"; rows share one string per keyword */
	const char *value;			/* UTF-8 */
} MddFindItem;

/* the matches of a C-FIND: items sorted by row; memory malloc()ed by the C side */
typedef struct MddFindResult
{
	int			nrows;
	int			nitems;
	MddFindItem *items;			/* free() */
	char	   *strings;		/* free(): the text items point into */
} MddFindResult;

/* one object a C-MOVE or C-GET sends */
typedef struct MddRetrieveItem
{
	long long	object_id;
	const char *sop_class_uid;
	const char *sop_instance_uid;
	const char *transfer_syntax_uid;	/* of the stored bytes */
} MddRetrieveItem;

/* the objects a C-MOVE or C-GET identifier selects; malloc()ed by the C side */
typedef struct MddRetrieveList
{
	int			nitems;
	MddRetrieveItem *items;		/* free() */
	char	   *strings;		/* free(): the text items point into */

	/*
	 * Move forwarding: instances the request asked for that a span node was
	 * to bring here and did not; each is a failed sub-operation.  Their SOP
	 * Instance UIDs joined by backslashes (free(); may be NULL).
	 */
	int			nmissing;
	char	   *missing_uids;
} MddRetrieveList;

/*
 * DICOM over TLS (dicom_tls.cpp): the files and profile of mdd.dicom_tls_*.
 * Where a config below has a tls member, NULL means plain TCP.
 */
typedef struct MddTlsSettings
{
	const char *cert_file;		/* PEM certificate mdd shows; may be empty */
	const char *key_file;		/* its PEM key, not encrypted */
	const char *ca_file;		/* PEM certificates peers must chain to */
	const char *profile;		/* bcp195-nd, bcp195 or bcp195-extended */
	int			require_client_certificate; /* listener: refuse clients without */
} MddTlsSettings;

/*
 * Whether the settings make a usable TLS layer (server: for the TLS port,
 * else for calling nodes): MDD_DICOM_OK, or MDD_DICOM_INVALID with the
 * reason.
 */
extern MddDicomStatus mdd_dicom_tls_check(const MddTlsSettings *settings, int server,
										  char *errbuf, size_t errbuf_len);

typedef struct MddDicomServerConfig
{
	const char *ae_title;		/* our AE title; a peer calling another is refused */
	int			max_pdu;		/* largest PDU we receive, bytes */
	int			acse_timeout;	/* seconds for association negotiation */
	int			dimse_timeout;	/* seconds a peer may stay silent */
	const MddTlsSettings *tls;	/* the connection is of the TLS port */
	const MddTlsSettings *client_tls;	/* for C-MOVE destinations that use TLS */
} MddDicomServerConfig;

/*
 * Functions of the C side that the association loop calls.  They run
 * PostgreSQL code, so each must catch its own errors (PG_TRY) and return
 * normally: neither an exception nor a longjmp may come back through here.
 */
typedef struct MddDicomCallbacks
{
	void	   *arg;

	/*
	 * Decide on an association request: 0 refuses it (reason says why), any
	 * other value is the MDD_PERMIT_* bits granted.
	 */
	int			(*admit) (void *arg, const char *calling_ae, const char *called_ae,
						  const char *peer_host, const char *transport,
						  char *reason, size_t reason_len);

	/*
	 * Archive one received object (a Part 10 file built around the data set
	 * exactly as received).  Returns the DIMSE status to answer, with a
	 * comment for failures; success only once the object is committed.
	 */
	unsigned short (*store) (void *arg, const unsigned char *data, size_t len,
							 const char *sop_class_uid, const char *sop_instance_uid,
							 char *comment, size_t comment_len);

	/*
	 * Match a C-FIND identifier: model "PATIENT" or "STUDY" (root), level,
	 * and the identifier's keys as a JSON object keyword -> value.  Returns
	 * 0 with *result filled, or the DIMSE failure status with a comment.
	 */
	unsigned short (*find) (void *arg, const char *model, const char *level,
							const char *keys_json, MddFindResult *result,
							char *comment, size_t comment_len);

	/*
	 * Query spanning: called after the matches of find were sent, for the
	 * matches of the nodes mdd spans (same arguments; may be NULL).  A
	 * failure status leaves the query answered with the local matches only.
	 */
	unsigned short (*find_remote) (void *arg, const char *model, const char *level,
								   const char *keys_json, MddFindResult *result,
								   char *comment, size_t comment_len);

	/*
	 * Select the objects of a C-MOVE or C-GET identifier (same arguments
	 * as find; operation is "C-MOVE" or "C-GET", destination the move
	 * destination's AE title or NULL).  Returns 0 with *list filled, or the
	 * DIMSE failure status with a comment.
	 */
	unsigned short (*retrieve) (void *arg, const char *operation, const char *model,
								const char *level, const char *keys_json,
								const char *destination, MddRetrieveList *list,
								char *comment, size_t comment_len);

	/*
	 * Called once a C-MOVE or C-GET for which retrieve was called has ended
	 * (its last response sent, or the association lost); may be NULL.
	 */
	void		(*retrieve_done) (void *arg);

	/*
	 * Where a C-MOVE destination listens: 0 with host and port filled (and
	 * *tls true when it is called over TLS), or
	 * the DIMSE failure status (0xA801 for an AE that is no known node).
	 */
	unsigned short (*destination) (void *arg, const char *ae_title, char *host,
								   size_t host_len, int *port, int *tls,
								   char *comment, size_t comment_len);

	/*
	 * The stored bytes of one object, checked against its checksum, into
	 * *data (malloc()ed; the caller frees it).  Returns true on success,
	 * false with a reason in error.
	 */
	int			(*fetch) (void *arg, long long object_id, const char *operation,
						  unsigned char **data, size_t *len,
						  char *error, size_t error_len);

	/*
	 * Take a Storage Commitment request (N-ACTION): the Transaction UID and
	 * the n instances referenced.  Returns 0 once the report is queued, or
	 * the DIMSE failure status with a comment.
	 */
	unsigned short (*commit) (void *arg, const char *transaction_uid,
							  const char *const *classes, const char *const *instances,
							  int n, char *comment, size_t comment_len);

	/* write an audit row for the peer: action and what was refused or done */
	void		(*audit) (void *arg, const char *action, const char *detail);

	/* true when the service must stop (SIGTERM, postmaster death) */
	int			(*should_stop) (void *arg);

	/*
	 * Wait until fd is readable, a stop is requested or timeout_ms passed;
	 * true when readable.  Lets the C side wake at once on a stop request.
	 */
	int			(*wait_readable) (void *arg, int fd, int timeout_ms);

	/* a line for the server log */
	void		(*log) (void *arg, int level, const char *message);
} MddDicomCallbacks;

/*
 * Serve one association on an accepted TCP connection to its end.  The
 * connection is closed on return.  Returns MDD_DICOM_OK when the association
 * ended normally (released, or refused as it should be), otherwise a status
 * and a message.
 */
extern MddDicomStatus mdd_dicom_serve(int fd, const MddDicomServerConfig *config,
									  const MddDicomCallbacks *callbacks,
									  char *errbuf, size_t errbuf_len);

/*
 * C-ECHO as SCU: open an association from our_ae to peer_ae at host:port
 * (over TLS when tls is not NULL), verify, release.  MDD_DICOM_OK when the
 * peer answered success.
 */
extern MddDicomStatus mdd_dicom_echo(const char *our_ae, const char *peer_ae,
									 const char *host, int port, int timeout,
									 const MddTlsSettings *tls, char *errbuf, size_t errbuf_len);

/*
 * The N-EVENT-REPORT of a Storage Commitment transaction (dicom_commit.cpp),
 * on an association from our_ae to peer_ae at host:port (TLS unless tls is
 * NULL) in which mdd is the
 * SCP of the Storage Commitment Push Model: reasons[i] is 0 for an
 * instance committed, else its Failure Reason.  MDD_DICOM_OK once the peer
 * answered success; MDD_DICOM_NETWORK when it could not be reached or the
 * exchange failed; MDD_DICOM_REFUSED when it answered a failure status.
 */
extern MddDicomStatus mdd_dicom_commit_report(const char *our_ae, const char *peer_ae,
											  const char *host, int port, int timeout,
											  const MddTlsSettings *tls,
											  const char *transaction_uid,
											  const char *const *classes,
											  const char *const *instances,
											  const int *reasons, int n,
											  char *errbuf, size_t errbuf_len);

/* ---------------------------------------------------------------------
 * C-STORE of stored objects to a node, for mdd.send (dicom_send.cpp)
 * ---------------------------------------------------------------------
 */

/* an association mdd opened to send objects; owned by the C++ side */
typedef struct MddDicomSender MddDicomSender;

/* what the SCU side of the sender needs to know */
typedef struct MddDicomSenderConfig
{
	const char *our_ae;
	const char *peer_ae;
	const char *host;
	int			port;
	int			acse_timeout;	/* seconds to connect and negotiate */
	int			dimse_timeout;	/* seconds to wait for each answer */
	void	   *arg;
	int			(*should_stop) (void *arg);	/* true: stop waiting at once */
	const MddTlsSettings *tls;
} MddDicomSenderConfig;

/*
 * Open an association for objects of the given SOP classes, each in the
 * transfer syntax it is stored in (classes[i] with syntaxes[i]; pairs may
 * repeat).  MDD_DICOM_OK with *sender set; MDD_DICOM_NETWORK when the peer
 * cannot be reached or refuses the association; MDD_DICOM_NOT_SENDABLE
 * when it associated but accepted none of the contexts proposed.
 */
extern MddDicomStatus mdd_dicom_sender_open(const MddDicomSenderConfig *config,
											const char *const *classes,
											const char *const *syntaxes, int n,
											MddDicomSender **sender,
											char *errbuf, size_t errbuf_len);

/*
 * C-STORE one stored object (Part 10 file or bare data set, as kept) and
 * wait for the answer: MDD_DICOM_OK with the DIMSE status in *status and
 * the Error Comment, if any, in errbuf; MDD_DICOM_NOT_SENDABLE when the
 * peer accepted no context the object can go in (nothing was sent), with
 * the reason; MDD_DICOM_NETWORK when the association failed (it is of no
 * further use: close it).
 */
extern MddDicomStatus mdd_dicom_sender_store(MddDicomSender *sender,
											 const unsigned char *data, size_t len,
											 const char *sop_class_uid,
											 const char *sop_instance_uid,
											 const char *transfer_syntax_uid,
											 unsigned short *status,
											 char *errbuf, size_t errbuf_len);

/* release the association (or abort it when release is 0) and free sender */
extern void mdd_dicom_sender_close(MddDicomSender *sender, int release);

/* ---------------------------------------------------------------------
 * C-FIND as a service user, for mdd.find (dicom_find.cpp)
 * ---------------------------------------------------------------------
 */

/* an association mdd opened to query a node; owned by the C++ side */
typedef struct MddDicomFinder MddDicomFinder;

/* why a C-FIND did not come to its end */
typedef enum MddFindFailure
{
	MDD_FIND_DONE = 0,			/* it did: the node answered success */
	MDD_FIND_UNREACHABLE,		/* no TCP connection to the node */
	MDD_FIND_REFUSED,			/* association rejected, C-FIND context not
								 * accepted, or a failure status answered */
	MDD_FIND_TIMEOUT,			/* the node did not answer in time */
	MDD_FIND_BROKEN,			/* the association failed (aborted, protocol
								 * error) */
	MDD_FIND_STOPPED			/* should_stop, or the answer callback, ended it */
} MddFindFailure;

typedef struct MddDicomFinderConfig
{
	const char *our_ae;
	const char *peer_ae;
	const char *host;
	int			port;
	int			timeout_ms;		/* to connect and negotiate */
	void	   *arg;
	int			(*should_stop) (void *arg); /* true: stop waiting at once */

	/*
	 * Called with the association's socket once the TCP connection is up
	 * (before negotiation), so that a signal handler may shut it down; may
	 * be NULL.  Async-signal-safe code only: it runs inside DCMTK.
	 */
	void		(*on_socket) (void *arg, int fd);
	const MddTlsSettings *tls;
} MddDicomFinderConfig;

/*
 * One match of a C-FIND: the values of the keys asked (UTF-8, decoded from
 * the answer's Specific Character Set; "" when absent or empty; values of
 * several items joined by backslashes), in the order asked.  Returns
 * nonzero to go on, 0 to cancel the query.
 */
typedef int (*MddFindAnswer) (void *arg, int nkeys, const char *const *values);

/*
 * Open an association for C-FIND in the Study Root model.  MDD_DICOM_OK
 * with *finder set; otherwise *failure says why and errbuf how.
 */
extern MddDicomStatus mdd_dicom_finder_open(const MddDicomFinderConfig *config,
											MddDicomFinder **finder,
											MddFindFailure *failure,
											char *errbuf, size_t errbuf_len);

/*
 * One C-FIND at level ("STUDY", "SERIES", "IMAGE") with the given keys
 * (keywords of the data dictionary; an empty value asks for the attribute,
 * any other value also matches on it), calling answer for each match.
 * The identifier says Specific Character Set ISO_IR 192.  MDD_DICOM_OK when
 * the node answered success within timeout_ms; otherwise *failure says why
 * and errbuf how (a refusal carries the status and its Error Comment).
 * After a failure other than MDD_FIND_REFUSED the association is of no
 * further use.
 */
extern MddDicomStatus mdd_dicom_finder_query(MddDicomFinder *finder, const char *level,
											 int nkeys, const char *const *keywords,
											 const char *const *values, int timeout_ms,
											 MddFindAnswer answer, void *answer_arg,
											 MddFindFailure *failure,
											 char *errbuf, size_t errbuf_len);

/* release the association (or abort it when release is 0) and free finder */
extern void mdd_dicom_finder_close(MddDicomFinder *finder, int release);

/* ---------------------------------------------------------------------
 * Asking a node for objects (dicom_fetch.cpp), for the retrieve and move
 * jobs: the instances it holds (C-FIND), then C-MOVE of them to an AE
 * title or C-GET of them on the association
 * ---------------------------------------------------------------------
 */

/* the node to ask, and the timeouts of the association */
typedef struct MddFetchPeer
{
	const char *our_ae;
	const char *peer_ae;
	const char *host;
	int			port;
	int			acse_timeout;	/* seconds to connect and negotiate */
	int			dimse_timeout;	/* seconds the peer may stay silent */
	const MddTlsSettings *tls;
} MddFetchPeer;

/* how far a C-MOVE or C-GET has come, for the progress callback */
typedef struct MddFetchProgress
{
	int			request;		/* index of the request being answered */
	int			response;		/* 1: a pending response came with the
								 * counts below; 0: a second went by */
	int			remaining;		/* of the response; -1 when absent */
	int			completed;
	int			failed;
	int			warning;
} MddFetchProgress;

/*
 * Functions of the C side the fetch functions call.  Like those of
 * MddDicomCallbacks, each catches its own errors and returns normally.
 */
typedef struct MddFetchCallbacks
{
	void	   *arg;

	/* true when the work must stop at once (server stop, postmaster death) */
	int			(*should_stop) (void *arg);

	/*
	 * Wait until fd is readable, a stop is requested or timeout_ms passed;
	 * true when readable.
	 */
	int			(*wait_readable) (void *arg, int fd, int timeout_ms);

	/*
	 * The same for several sockets (the associations of a parallel
	 * C-MOVE): the index in fds of one that is readable, or -1 when a stop
	 * is requested or timeout_ms passed first.
	 */
	int			(*wait_any_readable) (void *arg, const int *fds, int nfds, int timeout_ms);

	/*
	 * The socket of the association as soon as it is connected, and -1
	 * once it is closed: the C side shuts it down on a stop request, so
	 * that no read inside DCMTK holds the stop up.  With several
	 * associations open, the one connected last.
	 */
	void		(*socket) (void *arg, int fd);

	/*
	 * During a C-MOVE or C-GET: after each pending response, and each
	 * second without one.  Negative: stop now (the job was cancelled);
	 * positive: something arrived meanwhile, so a peer that is silent on
	 * the association is still at work; 0 otherwise.
	 */
	int			(*progress) (void *arg, const MddFetchProgress *progress);

	/*
	 * C-GET: archive one object received on the association (a Part 10
	 * file built around the data set exactly as received).  Returns the
	 * DIMSE status to answer, with a comment for failures.
	 */
	unsigned short (*store) (void *arg, const unsigned char *data, size_t len,
							 const char *sop_class_uid, const char *sop_instance_uid,
							 char *comment, size_t comment_len);
} MddFetchCallbacks;

/* one instance a node holds */
typedef struct MddRemoteInstance
{
	const char *series_instance_uid;
	const char *sop_instance_uid;
	const char *sop_class_uid;	/* "" when the node did not say */
} MddRemoteInstance;

/* the instances a node holds; release with mdd_dicom_free_instances */
typedef struct MddRemoteInstances
{
	int			n;
	MddRemoteInstance *items;
	char	   *strings;		/* the text the items point into */
} MddRemoteInstances;

/*
 * The instances of a study (of one series of it when series is not NULL,
 * the one instance when sop is not NULL) that the node holds, by C-FIND in
 * the Study Root model, hierarchically: at SERIES level for the series of
 * the study (when series is NULL), then at IMAGE level in each series.
 * MDD_DICOM_OK with *list filled; MDD_DICOM_NETWORK when the node cannot
 * be reached, refuses the association or breaks it off; MDD_DICOM_REFUSED
 * when it answered a C-FIND with a failure status (in *dimse_status).
 */
extern MddDicomStatus mdd_dicom_list_instances(const MddFetchPeer *peer,
											   const MddFetchCallbacks *callbacks,
											   const char *study, const char *series,
											   const char *sop, MddRemoteInstances *list,
											   unsigned short *dimse_status,
											   char *errbuf, size_t errbuf_len);

extern void mdd_dicom_free_instances(MddRemoteInstances *list);

/* one C-MOVE or C-GET request, and what the node answered to it */
typedef struct MddFetchRequest
{
	const char *level;			/* "STUDY", "SERIES" or "IMAGE" */
	const char *study;
	const char *series;			/* SERIES and IMAGE */
	const char *sops;			/* IMAGE: a UID, or several separated by '\' */

	/* the final response; answered stays 0 when none came */
	int			answered;
	unsigned short status;
	int			remaining;		/* -1 when the response did not say */
	int			completed;
	int			failed;
	int			warning;
	char		comment[128];	/* Error Comment, or "" */
	char	   *failed_uids;	/* Failed SOP Instance UID List ('\'
								 * separated), malloc()ed, or NULL */
} MddFetchRequest;

/*
 * One association with the node for the requests, made one after the
 * other: C-MOVE to move_destination, or C-GET on the association when
 * move_destination is NULL (proposing storage contexts for the SOP classes
 * given, or for the usual classes of a radiotherapy department when none
 * are given, in the SCP role).  A C-MOVE may use up to associations
 * associations at once (each takes the next request once its own is
 * answered), so that the node sends on as many associations in parallel.
 * MDD_DICOM_OK once every request was answered (each request's answer in
 * it); MDD_DICOM_NETWORK when the node cannot be reached or refuses the
 * (first) association (no request answered), or when an association
 * broke, timed out or was stopped by should_stop or progress (the
 * requests answered before say so; the other associations are aborted).
 * *associated tells whether an association was set up.  Release each
 * request's failed_uids with mdd_dicom_free_fetch.
 */
extern MddDicomStatus mdd_dicom_fetch(const MddFetchPeer *peer,
									  const MddFetchCallbacks *callbacks,
									  const char *move_destination,
									  const char *const *sop_classes, int nclasses,
									  MddFetchRequest *requests, int nrequests,
									  int associations, int *associated,
									  char *errbuf, size_t errbuf_len);

extern void mdd_dicom_free_fetch(MddFetchRequest *requests, int nrequests);

/* ---------------------------------------------------------------------
 * RT Dose grids and RT Structure Set contours (dicom_rt.cpp), read for
 * dose-volume histograms.  Geometry is in DICOM patient coordinates (mm).
 * ---------------------------------------------------------------------
 */

/* one RT Dose grid; malloc()ed, released with mdd_dicom_free_dose */
typedef struct MddDoseGrid
{
	int			rows;
	int			columns;
	int			frames;
	double		position[3];	/* centre of the first voxel (Image Position) */
	double		row_direction[3];	/* along a row: the column index grows */
	double		column_direction[3];	/* down a column: the row index grows */
	double		normal[3];		/* row_direction x column_direction */
	double		row_spacing;	/* mm between rows (Pixel Spacing, 1st value) */
	double		column_spacing; /* mm between columns (2nd value) */
	double	   *frame_offsets;	/* per frame: mm along normal from position */
	double	   *dose;			/* frames x rows x columns: stored value x
								 * Dose Grid Scaling, frame by frame, row by
								 * row */
	char		frame_of_reference_uid[65];
	char		dose_units[17]; /* as stored: GY, RELATIVE, ... */
	char		dose_type[17];
	char		summation_type[17];
} MddDoseGrid;

/* one closed planar contour of a ROI */
typedef struct MddContour
{
	int			npoints;
	const double *points;		/* npoints (x, y, z) triples */
} MddContour;

/* one ROI of a structure set, with its closed planar contours */
typedef struct MddRoi
{
	int			number;			/* ROI Number */
	const char *name;			/* ROI Name, UTF-8 ("" when absent) */
	const char *frame_of_reference_uid; /* the ROI's, or "" when absent */
	int			ncontours;
	const MddContour *contours;
} MddRoi;

/*
 * The ROIs of an RT Structure Set in the order of StructureSetROISequence;
 * malloc()ed, released with mdd_dicom_free_structure_set.  Contours other
 * than CLOSED_PLANAR (points, open contours) are not included;
 * skipped_contours counts them.
 */
typedef struct MddStructureSet
{
	int			nrois;
	MddRoi	   *rois;
	int			skipped_contours;
	char		frame_of_reference_uid[65]; /* of ReferencedFrameOfReferenceSequence, or "" */
	/* storage the pointers above point into */
	MddContour *contour_store;
	double	   *point_store;
	char	   *string_store;
} MddStructureSet;

/*
 * Read an RT Dose object held in memory.  MDD_DICOM_OK with *grid set, or
 * a status (MDD_DICOM_INVALID names the attribute at fault) and a message;
 * grids of more than max_voxels voxels are refused (MDD_DICOM_UNSUPPORTED).
 */
extern MddDicomStatus mdd_dicom_read_dose(const unsigned char *data, size_t len,
										  size_t max_voxels, MddDoseGrid **grid,
										  char *errbuf, size_t errbuf_len);

extern void mdd_dicom_free_dose(MddDoseGrid *grid);

/*
 * Read an RT Structure Set object held in memory.  MDD_DICOM_OK with *set
 * set, or a status and a message naming the sequence item at fault.
 */
extern MddDicomStatus mdd_dicom_read_structure_set(const unsigned char *data, size_t len,
												   MddStructureSet **set,
												   char *errbuf, size_t errbuf_len);

extern void mdd_dicom_free_structure_set(MddStructureSet *set);

/* ---------------------------------------------------------------------
 * DICOMweb (dicom_web.cpp)
 * ---------------------------------------------------------------------
 */

/*
 * The metadata of one object as a DICOM JSON object (PS3.18 F.2), written
 * by DCMTK's JSON writer (dcm2json's), text decoded to UTF-8.  With
 * bulk_threshold > 0, top-level binary values longer than that are given
 * as BulkDataURI bulk_prefix + "/GGGGEEEE" instead of inline.
 */
extern MddDicomStatus mdd_dicomweb_metadata(const unsigned char *data, size_t len,
											size_t bulk_threshold, const char *bulk_prefix,
											char **json_out, char *errbuf, size_t errbuf_len);

/*
 * Search results as a DICOM JSON array: nrows objects of the ncols
 * attributes names (keywords or "GGGGEEEE"), values[r * ncols + c] the
 * value of row r (backslash-separated values; NULL or "" is empty).
 */
extern MddDicomStatus mdd_dicomweb_results(int nrows, int ncols, const char *const *names,
										   const char *const *values, char **json_out,
										   char *errbuf, size_t errbuf_len);

/* the dictionary keyword of a keyword or "GGGGEEEE"; 0 when there is none */
extern int	mdd_dicomweb_keyword(const char *name, char *keyword, size_t keyword_len);

/*
 * Frames numbers[0..count-1] (from 1) of an image with uncompressed pixel
 * data, each of *frame_size bytes, one after the other in *out.
 * MDD_DICOM_REFUSED: a frame number out of range; MDD_DICOM_UNSUPPORTED:
 * compressed pixel data.
 */
extern MddDicomStatus mdd_dicomweb_frames(const unsigned char *data, size_t len,
										  const int *numbers, int count, unsigned char **out,
										  size_t *frame_size, char *errbuf, size_t errbuf_len);

/*
 * The value of the top-level binary attribute tag ("GGGGEEEE") as bytes
 * (little endian).  MDD_DICOM_REFUSED: no such binary attribute.
 */
extern MddDicomStatus mdd_dicomweb_bulk(const unsigned char *data, size_t len, const char *tag,
										unsigned char **out, size_t *out_len,
										char *errbuf, size_t errbuf_len);

/* release what the functions above handed out */
extern void mdd_dicomweb_free(void *p);

#ifdef __cplusplus
}
#endif

#endif							/* MDD_DICOM_H */
