/*
 * dicom_tls.cpp
 *	  DICOM over TLS (dicom_tls.hpp): DCMTK's TLS transport layer set up
 *	  from mdd's settings, for the listener's TLS port and for every
 *	  association mdd requests of a node with {"tls": true}.
 *
 * Profiles are DCMTK's BCP 195 ones: bcp195-nd (non-downgrading, TLS 1.2
 * and 1.3, the default), bcp195 and bcp195-extended.  Peers are verified
 * against the CA file; keys are PEM and not encrypted.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes (the
 * callers catch).
 */
#include "dicom_tls.hpp"
#include "dicom_common.hpp"

#include <dcmtk/dcmtls/tlslayer.h>
#include <dcmtk/dcmtls/tlsciphr.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstring>
#include <memory>

namespace
{

std::string lastHandshake;

/* record what each finished handshake agreed on, for the audit */
void
infoCallback(const SSL *ssl, int where, int)
{
	if (!(where & SSL_CB_HANDSHAKE_DONE))
		return;

	std::string what = std::string(SSL_get_version(ssl)) + " " +
		SSL_CIPHER_get_name(SSL_get_current_cipher(ssl));
	X509	   *peer = SSL_get1_peer_certificate(ssl);

	if (peer)
	{
		char		subject[256];

		X509_NAME_oneline(X509_get_subject_name(peer), subject, sizeof(subject));
		what += std::string(", certificate ") + subject;
		X509_free(peer);
	}
	else
		what += ", no certificate";
	lastHandshake = what;
}

/* DCMTK's TLS layer, telling an observer of each socket it is given */
class MddTlsLayer : public DcmTLSTransportLayer
{
public:
	MddTlsLayer(T_ASC_NetworkRole role, std::function<void(int)> onSocket)
		: DcmTLSTransportLayer(role, NULL, OFTrue), onSocket_(onSocket) {}

	DcmTransportConnection *createConnection(DcmNativeSocketType socket,
											 OFBool useSecureLayer) override
	{
		if (onSocket_)
			onSocket_((int) socket);
		return DcmTLSTransportLayer::createConnection(socket, useSecureLayer);
	}

private:
	std::function<void(int)> onSocket_;
};

bool
setProfile(DcmTLSTransportLayer *layer, const char *profile, std::string &error)
{
	DcmTLSSecurityProfile p;
	std::string name = profile && *profile ? profile : "bcp195-nd";

	if (name == "bcp195-nd")
		p = TSP_Profile_BCP195_ND;
	else if (name == "bcp195")
		p = TSP_Profile_BCP195;
	else if (name == "bcp195-extended")
		p = TSP_Profile_BCP195_Extended;
	else
	{
		error = "unknown mdd.dicom_tls_profile \"" + name +
			"\" (bcp195-nd, bcp195 or bcp195-extended)";
		return false;
	}
	OFCondition cond = layer->setTLSProfile(p);

	if (cond.good())
		cond = layer->activateCipherSuites();
	if (cond.bad())
	{
		error = "cannot set up the TLS profile " + name + ": " + cond.text();
		return false;
	}
	return true;
}

/* no passphrase prompt, ever: encrypted keys are refused */
int
noPassword(char *, int, int, void *)
{
	return 0;
}

/* whether the file holds a private key OpenSSL can read without a passphrase */
bool
keyIsReadable(const char *file)
{
	FILE	   *f = fopen(file, "r");
	EVP_PKEY   *key;

	if (f == NULL)
		return false;
	key = PEM_read_PrivateKey(f, NULL, noPassword, NULL);
	fclose(f);
	ERR_clear_error();
	if (key == NULL)
		return false;
	EVP_PKEY_free(key);
	return true;
}

bool
readable(const char *setting, const char *file, std::string &error)
{
	FILE	   *f = fopen(file, "r");

	if (f == NULL)
	{
		error = std::string(setting) + " \"" + file + "\" cannot be read: " + strerror(errno);
		return false;
	}
	fclose(f);
	return true;
}

}								/* namespace */

DcmTransportLayer *
mddNewTlsLayer(bool server, const MddTlsSettings *s, std::function<void(int)> onSocket,
			   std::string &error)
{
	bool		haveCert = s->cert_file && *s->cert_file;
	bool		haveKey = s->key_file && *s->key_file;
	bool		haveCA = s->ca_file && *s->ca_file;

	mddInitialiseDcmtk();
	lastHandshake.clear();
	if (haveCert != haveKey)
	{
		error = "mdd.dicom_tls_cert_file and mdd.dicom_tls_key_file must be set together";
		return NULL;
	}
	if (server && !haveCert)
	{
		error = "the TLS port needs a certificate: set mdd.dicom_tls_cert_file and mdd.dicom_tls_key_file";
		return NULL;
	}
	if (!server && !haveCA)
	{
		error = "mdd.dicom_tls_ca_file is not set: mdd verifies the certificate of every node it calls over TLS";
		return NULL;
	}
	if (server && s->require_client_certificate && !haveCA)
	{
		error = "mdd.dicom_tls_require_client_certificate is on, but mdd.dicom_tls_ca_file does not say which certificates to trust";
		return NULL;
	}
	if ((haveCert && !readable("mdd.dicom_tls_cert_file", s->cert_file, error)) ||
		(haveKey && !readable("mdd.dicom_tls_key_file", s->key_file, error)) ||
		(haveCA && !readable("mdd.dicom_tls_ca_file", s->ca_file, error)))
		return NULL;

	std::unique_ptr<MddTlsLayer> layer(new MddTlsLayer(server ? NET_ACCEPTOR : NET_REQUESTOR,
													   onSocket));
	OFCondition cond;

	if (!setProfile(layer.get(), s->profile, error))
		return NULL;
	if (layer->getNativeHandle())
		SSL_CTX_set_default_passwd_cb(layer->getNativeHandle(), noPassword);
	if (haveCert)
	{
		if (layer->setCertificateFile(s->cert_file, DCF_Filetype_PEM).bad())
		{
			error = std::string("mdd.dicom_tls_cert_file \"") + s->cert_file +
				"\" holds no certificate mdd can use (PEM)";
			return NULL;
		}
		if (layer->setPrivateKeyFile(s->key_file, DCF_Filetype_PEM).bad())
		{
			/* OpenSSL checks the key against the certificate as it loads it */
			if (keyIsReadable(s->key_file))
				error = std::string("mdd.dicom_tls_key_file \"") + s->key_file +
					"\" is not the key of the certificate in mdd.dicom_tls_cert_file \"" +
					s->cert_file + "\"";
			else
				error = std::string("mdd.dicom_tls_key_file \"") + s->key_file +
					"\" holds no private key mdd can use (PEM, not encrypted)";
			return NULL;
		}
		if (!layer->checkPrivateKeyMatchesCertificate())
		{
			error = std::string("mdd.dicom_tls_key_file \"") + s->key_file +
				"\" is not the key of the certificate in mdd.dicom_tls_cert_file \"" +
				s->cert_file + "\"";
			return NULL;
		}
	}
	if (haveCA && layer->addTrustedCertificateFile(s->ca_file, DCF_Filetype_PEM).bad())
	{
		error = std::string("mdd.dicom_tls_ca_file \"") + s->ca_file +
			"\" holds no certificates mdd can use (PEM)";
		return NULL;
	}
	if (!server || s->require_client_certificate)
		layer->setCertificateVerification(DCV_requireCertificate);
	else if (haveCA)
		layer->setCertificateVerification(DCV_checkCertificate);
	else
		layer->setCertificateVerification(DCV_ignoreCertificate);

	SSL_CTX    *ctx = layer->getNativeHandle();

	if (ctx)
		SSL_CTX_set_info_callback(ctx, infoCallback);
	ERR_clear_error();
	return layer.release();
}

std::string
mddTlsLastHandshake()
{
	return lastHandshake;
}

std::string
mddTlsErrorText(const std::string &text)
{
	unsigned long e = ERR_peek_last_error();
	char		buf[256];

	if (e == 0)
		return text;
	ERR_error_string_n(e, buf, sizeof(buf));
	ERR_clear_error();

	const char *reason = ERR_reason_error_string(e);

	return text + " (TLS: " + (reason ? reason : buf) + ")";
}

extern "C" MddDicomStatus
mdd_dicom_tls_check(const MddTlsSettings *settings, int server, char *errbuf, size_t errbuf_len)
{
	try
	{
		std::string error;
		DcmTransportLayer *layer = mddNewTlsLayer(server != 0, settings, nullptr, error);

		if (layer == NULL)
		{
			mddSetError(errbuf, errbuf_len, error);
			return MDD_DICOM_INVALID;
		}
		delete layer;
		mddSetError(errbuf, errbuf_len, "");
		return MDD_DICOM_OK;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "setting TLS up failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}
