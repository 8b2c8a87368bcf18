/*
 * dicom_pdu_check.cpp
 *	  The connections DCMTK reads associations from, checking each PDU
 *	  before DCMTK parses it (mddNewCheckedLayer of dicom_pdu_check.hpp).
 *
 * C++ only; includes no PostgreSQL header.
 */
#include "dicom_pdu_check.hpp"

#include <dcmtk/dcmnet/dcmtrans.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <vector>

namespace
{

/*
 * The connection DCMTK reads an association from.  It reads whole PDUs and
 * hands them on only after checking their structure: an association
 * request first, known PDU types, a length within bounds (P-DATA within
 * the maximum PDU we announced), and items that fit exactly inside the PDU
 * (the PDV items of a P-DATA-TF, the items and sub-items of an association
 * request).  DCMTK 3.6.7 trusts these lengths and reads past its buffers
 * on inconsistent ones, which in a PostgreSQL backend would restart the
 * whole server; and it takes a P-DATA-TF in place of the request for a
 * request with empty AE titles.  A PDU that fails the checks is answered
 * with an A-ABORT from the service provider saying why (unexpected PDU,
 * unrecognized PDU, invalid PDU parameter value) and ends the connection
 * as a read error.
 */
class CheckedConnection : public DcmTCPConnection
{
public:
	CheckedConnection(DcmNativeSocketType socket, size_t maxPdu, int pduTimeout)
		: DcmTCPConnection(socket), maxPdu_(maxPdu), pduTimeout_(pduTimeout), pos_(0),
		  failed_(false), deadline_(0), abortReason_(-1), first_(true) {}

	ssize_t read(void *buf, size_t nbyte) override
	{
		if (pos_ == pdu_.size())
		{
			pdu_.clear();
			pos_ = 0;
			if (failed_ || !fetch())
			{
				/* to DCMTK, a malformed PDU looks like the peer hanging up */
				if (!failed_ && abortReason_ >= 0)
					sendAbort();
				failed_ = true;
				return 0;
			}
		}
		size_t		n = std::min(nbyte, pdu_.size() - pos_);

		memcpy(buf, pdu_.data() + pos_, n);
		pos_ += n;
		return static_cast<ssize_t>(n);
	}

	/* true once a PDU failed the checks or the connection broke */
	bool failed() const { return failed_; }

	OFBool networkDataAvailable(int timeout) override
	{
		if (pos_ < pdu_.size())
			return OFTrue;
		return DcmTCPConnection::networkDataAvailable(timeout);
	}

private:
	static unsigned long be32(const unsigned char *p)
	{
		return (static_cast<unsigned long>(p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3];
	}
	static unsigned be16(const unsigned char *p) { return (p[0] << 8) | p[1]; }

	/* refuse the PDU just read: an A-ABORT from the service provider */
	bool refuse(int reason)
	{
		abortReason_ = reason;
		return false;
	}

	void sendAbort()
	{
		unsigned char abort[10] = {0x07, 0, 0, 0, 0, 4, 0, 0, 2,
		static_cast<unsigned char>(abortReason_)};

		(void) DcmTCPConnection::write(abort, sizeof(abort));
	}

	/*
	 * Read n bytes.  Once a PDU has begun, all of it must arrive within the
	 * PDU timeout: a peer trickling bytes cannot hold a listener for long.
	 */
	bool readExactly(unsigned char *p, size_t n)
	{
		while (n > 0)
		{
			if (deadline_ != 0)
			{
				long		left = static_cast<long>(deadline_ - time(NULL));

				if (left <= 0 || !DcmTCPConnection::networkDataAvailable(static_cast<int>(left)))
					return false;
			}
			ssize_t		r = DcmTCPConnection::read(p, n);

			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return false;
			p += r;
			n -= static_cast<size_t>(r);
		}
		return true;
	}

	/* items of 2-byte length from off to end must tile it exactly */
	static bool itemsFit(const unsigned char *b, size_t off, size_t end, bool nested)
	{
		while (off < end)
		{
			if (end - off < 4)
				return false;
			unsigned	type = b[off];
			size_t		len = be16(b + off + 2);

			if (len > end - off - 4)
				return false;
			if (nested && type == 0x20 && !(len >= 4 && itemsFit(b, off + 8, off + 4 + len, false)))
				return false;
			if (nested && type == 0x21 && !(len >= 4 && itemsFit(b, off + 8, off + 4 + len, false)))
				return false;
			if (nested && type == 0x50 && !itemsFit(b, off + 4, off + 4 + len, false))
				return false;
			off += 4 + len;
		}
		return off == end;
	}

	bool fetch()
	{
		unsigned char header[6];

		deadline_ = 0;
		if (!readExactly(header, 1))
			return false;
		deadline_ = time(NULL) + pduTimeout_;
		if (!readExactly(header + 1, 5))
			return false;

		unsigned	type = header[0];
		unsigned long len = be32(header + 2);
		bool		sizeOk;

		/* connections are accepted: an association request comes first */
		if (first_ && type != 0x01)
			return refuse(type <= 0x07 ? 2 : 1);	/* unexpected / unrecognized */
		first_ = false;

		switch (type)
		{
			case 0x01:			/* A-ASSOCIATE-RQ */
			case 0x02:			/* A-ASSOCIATE-AC */
				sizeOk = len >= 68 && len <= (1UL << 20);
				break;
			case 0x03:			/* A-ASSOCIATE-RJ */
			case 0x05:			/* A-RELEASE-RQ */
			case 0x06:			/* A-RELEASE-RP */
			case 0x07:			/* A-ABORT */
				sizeOk = len == 4;
				break;
			case 0x04:			/* P-DATA-TF */
				sizeOk = len >= 6 && len <= maxPdu_;
				break;
			default:
				return refuse(1);	/* unrecognized PDU */
		}
		if (!sizeOk)
			return refuse(6);	/* invalid PDU parameter value */

		pdu_.resize(6 + len);
		memcpy(pdu_.data(), header, 6);
		if (!readExactly(pdu_.data() + 6, len))
			return false;

		const unsigned char *b = pdu_.data();

		if (type == 0x04)
		{
			std::vector<unsigned char> split;
			size_t		off = 6;

			/*
			 * Pass each PDV on in a P-DATA-TF of its own: equivalent in
			 * DICOM, and DCMTK 3.6.7 crashes on some PDUs that hold a
			 * command's last fragment followed by many data fragments.
			 */
			while (off < pdu_.size())
			{
				if (pdu_.size() - off < 4)
					return refuse(6);
				unsigned long ilen = be32(b + off);

				if (ilen < 2 || ilen > pdu_.size() - off - 4)
					return refuse(6);
				split.push_back(0x04);
				split.push_back(0x00);
				for (int i = 3; i >= 0; i--)
					split.push_back(((ilen + 4) >> (8 * i)) & 0xFF);
				split.insert(split.end(), b + off, b + off + 4 + ilen);
				off += 4 + ilen;
			}
			pdu_.swap(split);
			return true;
		}
		if ((type == 0x01 || type == 0x02) && !itemsFit(b, 6 + 68, pdu_.size(), true))
			return refuse(6);
		return true;
	}

	size_t		maxPdu_;
	int			pduTimeout_;
	std::vector<unsigned char> pdu_;
	size_t		pos_;
	bool		failed_;
	time_t		deadline_;
	int			abortReason_;	/* A-ABORT reason for a refused PDU, or -1 */
	bool		first_;			/* no PDU read yet */
};

/* the transport layer that gives DCMTK CheckedConnections */
class CheckedLayer : public DcmTransportLayer
{
public:
	CheckedLayer(size_t maxPdu, int pduTimeout) : maxPdu_(maxPdu), pduTimeout_(pduTimeout) {}

	DcmTransportConnection *createConnection(DcmNativeSocketType socket, OFBool) override
	{
		return new CheckedConnection(socket, maxPdu_, pduTimeout_);
	}

private:
	size_t		maxPdu_;
	int			pduTimeout_;
};

}								/* namespace */

DcmTransportLayer *
mddNewCheckedLayer(size_t max_pdu, int pdu_timeout)
{
	return new CheckedLayer(max_pdu, pdu_timeout);
}

bool
mddCheckedConnectionFailed(DcmTransportConnection *connection)
{
	CheckedConnection *c = dynamic_cast<CheckedConnection *>(connection);

	return c != NULL && c->failed();
}
