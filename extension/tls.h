/*-------------------------------------------------------------------------
 *
 * tls.h
 *	  The mdd.dicom_tls_* settings (tls.c) as the DICOM side takes them.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_TLS_H
#define MDD_TLS_H

#include "dicom.h"

extern int	mdd_dicom_tls_port;

/* from _PG_init */
extern void mdd_define_tls_settings(void);

/* the current settings, for associations over TLS (valid until the next call) */
extern const MddTlsSettings *mdd_tls_settings(void);

/* the settings, or NULL when tls is false: for a node's tls option */
extern const MddTlsSettings *mdd_tls_if(bool tls);

#endif							/* MDD_TLS_H */
