/*
 * dicom_tls.hpp
 *	  DICOM over TLS (DCMTK's dcmtls): the one place where the TLS transport
 *	  layer of an association, requested or accepted, is set up.
 *
 * C++ only; includes no PostgreSQL header.
 */
#ifndef MDD_DICOM_TLS_HPP
#define MDD_DICOM_TLS_HPP

#include "dicom.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmnet/dcmlayer.h>
#include <dcmtk/dcmnet/dcmtrans.h>

#include <functional>
#include <string>

/*
 * A new TLS transport layer (for ASC_setTransportLayer) from the settings:
 * server for the listener (certificate and key needed; client
 * certificates required, checked or ignored as the settings say), else
 * for an association mdd requests (the peer's certificate must chain to
 * the CA file; mdd's certificate shown when one is set).  onSocket, when
 * set, is called with each socket before its handshake.  NULL with a
 * reason in error when the settings cannot be used.
 */
DcmTransportLayer *mddNewTlsLayer(bool server, const MddTlsSettings *settings,
								  std::function<void(int)> onSocket, std::string &error);

/*
 * What the last TLS handshake of this process agreed on: protocol, cipher
 * suite and the peer's certificate subject ("TLSv1.3 TLS_AES_256_GCM_SHA384,
 * certificate CN=x"); empty before any.
 */
std::string mddTlsLastHandshake();

/* a DCMTK network error on a TLS association, said so: "... (TLS: ...)" */
std::string mddTlsErrorText(const std::string &text);

#endif
