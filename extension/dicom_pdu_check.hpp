/*
 * dicom_pdu_check.hpp
 *	  A DCMTK transport layer that checks every PDU before DCMTK reads it.
 *
 * C++ only; includes no PostgreSQL header.
 */
#ifndef MDD_DICOM_PDU_CHECK_HPP
#define MDD_DICOM_PDU_CHECK_HPP

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmnet/dcmlayer.h>
#include <dcmtk/dcmnet/dcmtrans.h>

#include <cstddef>

/*
 * A new transport layer (for ASC_setTransportLayer) whose connections pass
 * on only well-formed PDUs: P-DATA no longer than max_pdu, each PDU whole
 * within pdu_timeout seconds of its first byte.
 */
DcmTransportLayer *mddNewCheckedLayer(size_t max_pdu, int pdu_timeout);

/*
 * True when connection is one of that layer's and a PDU failed its checks
 * or the peer went away: what DCMTK read from it is not to be trusted.
 */
bool		mddCheckedConnectionFailed(DcmTransportConnection *connection);

#endif
