/*-------------------------------------------------------------------------
 *
 * mdd.h
 *	  Declarations shared by the C files of the mdd extension.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_H
#define MDD_H

#include "postgres.h"

#include "nodes/pg_list.h"
#include "utils/array.h"

/* settings (mdd.c) */
extern char *mdd_allowed_paths;
extern bool mdd_superuser_any_path;

/* paths.c: resolve a path and check it lies under mdd.allowed_paths */
extern char *mdd_checked_path(const char *path, bool for_write);
extern char *mdd_checked_directory(text *path, bool writable);

/* file_io.c: whole-file helpers shared by export and the file storage */
extern bytea *mdd_read_whole_file(const char *path);
extern void mdd_write_file_atomically(const char *path, const char *tmp_path,
									  const char *data, Size len, bool durable);
extern void mdd_fsync_path(const char *path, bool is_dir);
extern void mdd_make_directories(const char *path, List **created);

/* storage_file.c */
extern void mdd_storage_file_init(void);

/* tally.c */
extern void mdd_tally_init(void);

/* shmem.c: shared memory regions of the subsystems */
extern void mdd_shmem_region(const char *name, Size size, void **pointer,
							 void (*init) (void *region));

/* job_wake.c */
#define MDD_MAX_RUNNERS 32
extern void mdd_job_wake_init(bool preloading);
extern void mdd_runner_attach(int slot);
extern void mdd_scheduler_attach(void);

/* throttle.c: the bandwidth cap of rule-driven work */
extern double mdd_rule_bandwidth;

/* send.c: the elements of a text[] as C strings (NULL elements refused) */
extern int	mdd_text_array_strings(ArrayType *array, const char *what, char ***out);
extern void mdd_throttle_init(void);

#endif							/* MDD_H */
