/*-------------------------------------------------------------------------
 *
 * tls.c
 *	  The settings of DICOM over TLS: the TLS port of the listener, the
 *	  certificate and key mdd shows, the certificates peers must chain to,
 *	  the security profile and whether TLS clients need a certificate.
 *	  The TLS layer itself is on the DCMTK side (dicom_tls.cpp).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/guc.h"

#include "tls.h"

int			mdd_dicom_tls_port = 0;
static char *tls_cert_file = NULL;
static char *tls_key_file = NULL;
static char *tls_ca_file = NULL;
static char *tls_profile = NULL;
static bool tls_require_client_certificate = true;

static bool
check_profile(char **newval, void **extra, GucSource source)
{
	if (*newval && strcmp(*newval, "bcp195-nd") != 0 && strcmp(*newval, "bcp195") != 0 &&
		strcmp(*newval, "bcp195-extended") != 0)
	{
		GUC_check_errdetail("The profiles are bcp195-nd, bcp195 and bcp195-extended.");
		return false;
	}
	return true;
}

void
mdd_define_tls_settings(void)
{
	DefineCustomIntVariable("mdd.dicom_tls_port",
							"TCP port of the DICOM service over TLS; 0 turns it off.",
							"It listens beside mdd.dicom_port, on mdd.dicom_listen_address.",
							&mdd_dicom_tls_port, 0, 0, 65535,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.dicom_tls_cert_file",
							   "Certificate (PEM) mdd shows on the TLS port and to nodes called with TLS.",
							   NULL, &tls_cert_file, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.dicom_tls_key_file",
							   "Private key (PEM, not encrypted) of mdd.dicom_tls_cert_file.",
							   NULL, &tls_key_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.dicom_tls_ca_file",
							   "Certificates (PEM) that the certificates of DICOM peers over TLS must chain to.",
							   "Certificate authorities, or the peers' own certificates.",
							   &tls_ca_file, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.dicom_tls_profile",
							   "DICOM TLS security profile: bcp195-nd (TLS 1.2 or 1.3, non-downgrading), bcp195 or bcp195-extended.",
							   NULL, &tls_profile, "bcp195-nd",
							   PGC_SIGHUP, 0, check_profile, NULL, NULL);
	DefineCustomBoolVariable("mdd.dicom_tls_require_client_certificate",
							 "Refuse TLS clients that show no certificate signed as mdd.dicom_tls_ca_file says.",
							 "When off, a certificate a client shows must still verify.",
							 &tls_require_client_certificate, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
}

/*
 * A copy of the settings: a reload in the middle of an association (a
 * listener serving C-MOVE sub-operations) frees the old strings of the GUCs.
 */
const MddTlsSettings *
mdd_tls_settings(void)
{
	static char cert[MAXPGPATH],
				key[MAXPGPATH],
				ca[MAXPGPATH],
				profile[32];
	static MddTlsSettings s = {cert, key, ca, profile, 1};

	strlcpy(cert, tls_cert_file ? tls_cert_file : "", sizeof(cert));
	strlcpy(key, tls_key_file ? tls_key_file : "", sizeof(key));
	strlcpy(ca, tls_ca_file ? tls_ca_file : "", sizeof(ca));
	strlcpy(profile, tls_profile ? tls_profile : "bcp195-nd", sizeof(profile));
	s.require_client_certificate = tls_require_client_certificate;
	return &s;
}

const MddTlsSettings *
mdd_tls_if(bool tls)
{
	return tls ? mdd_tls_settings() : NULL;
}
