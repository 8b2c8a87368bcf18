/*-------------------------------------------------------------------------
 *
 * workers.h
 *	  Background workers of mdd: the launcher, the DICOM listeners, the job
 *	  runners and the rule scheduler.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_WORKERS_H
#define MDD_WORKERS_H

#include "postgres.h"

#include <signal.h>

#include "fmgr.h"

/* settings (extension/mdd.c) */
extern char *mdd_database;
extern char *mdd_ae_title;
extern int	mdd_dicom_port;
extern char *mdd_dicom_listen_address;
extern int	mdd_dicom_workers;
extern bool mdd_accept_unknown_nodes;
extern int	mdd_dicom_max_pdu;
extern int	mdd_dicom_acse_timeout;
extern int	mdd_dicom_dimse_timeout;
extern int	mdd_job_workers;
extern int	mdd_find_timeout;
extern bool mdd_forward_keep;

/* listen_socket.c: the DICOM port, opened by the postmaster */
extern int	mdd_listen_fd;
extern int	mdd_tls_listen_fd;	/* the TLS port, or -1 */
extern void mdd_open_listen_socket(void);
extern int	mdd_open_tcp_port(const char *address, const char *address_setting, int portnum,
							  const char *port_setting, const char *what, int backlog);

/* launcher.c */
extern void mdd_register_launcher(void);
PGDLLEXPORT void mdd_launcher_main(Datum arg);

/* listener.c */
PGDLLEXPORT void mdd_listener_main(Datum arg);

/* runner.c */
PGDLLEXPORT void mdd_runner_main(Datum arg);

/* scheduler.c */
PGDLLEXPORT void mdd_scheduler_main(Datum arg);

/* worker_common.c */
extern volatile sig_atomic_t mdd_got_sigterm;
extern volatile sig_atomic_t mdd_got_sighup;
extern volatile sig_atomic_t mdd_connection_fd;	/* shut down on SIGTERM */
extern void mdd_worker_setup_signals(void);
extern void mdd_worker_reload_if_asked(void);
extern void mdd_worker_begin_transaction(const char *activity);
extern void mdd_worker_commit_transaction(void);
extern char *mdd_worker_run_sql(const char *activity, const char *sql, int64 arg, bool has_arg,
								ErrorData **error);
extern ErrorData *mdd_worker_in_transaction(const char *activity, void (*work) (void *ctx),
											void *ctx);
extern Datum mdd_wire_text_datum(const char *s);
extern unsigned short mdd_store_failure_status(int sqlerrcode);

/* fetch_step.c: the network step of retrieve and move jobs */
extern char *mdd_fetch_step(int64 job, ErrorData **error);

#endif							/* MDD_WORKERS_H */
