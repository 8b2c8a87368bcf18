/*
 * dicom_scu.hpp
 *	  mdd as a DICOM service user: associations it requests, and C-STORE
 *	  of stored objects with their bytes sent exactly as kept.
 *
 * C++ only; includes no PostgreSQL header.
 */
#ifndef MDD_DICOM_SCU_HPP
#define MDD_DICOM_SCU_HPP

#include "dicom.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dimse.h>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

/* a presentation context to propose */
struct MddProposedContext
{
	std::string abstractSyntax;
	std::vector<std::string> transferSyntaxes;
	/* ASC_SC_ROLE_SCP: we take the SCP role (a C-GET's storage contexts) */
	T_ASC_SC_ROLE role = ASC_SC_ROLE_DEFAULT;
};

/*
 * Called with the socket of an association's TCP connection as soon as it
 * is up (before negotiation), and with -1 once it is closed, so that the
 * caller can shut it down from a signal handler.
 */
typedef void (*MddSocketObserver) (void *arg, int fd);

/* an association mdd requested; aborted on destruction unless released */
class MddScuAssociation
{
public:
	MddScuAssociation() : net_(NULL), params_(NULL), assoc_(NULL) {}
	~MddScuAssociation();
	MddScuAssociation(const MddScuAssociation &) = delete;
	MddScuAssociation &operator=(const MddScuAssociation &) = delete;

	/*
	 * Before open: have observer called with the socket as soon as the TCP
	 * connection is up, before the association is negotiated on it (so
	 * that a stop request can shut it down in any wait that follows).
	 */
	void		observeSocket(MddSocketObserver observer, void *arg)
	{
		observer_ = observer;
		observerArg_ = arg;
	}

	/* before open: request it over TLS with these settings (NULL: plain TCP) */
	void		useTls(const MddTlsSettings *settings) { tls_ = settings; }

	/* request an association; false with a reason in error */
	bool		open(const std::string &ourAE, const std::string &peerAE,
					 const std::string &host, int port, int timeout,
					 const std::vector<MddProposedContext> &contexts, std::string &error);
	void		release();
	void		abort();

	T_ASC_Association *get() const { return assoc_; }

	/* after a failed open: the peer associated but accepted no context */
	bool		acceptedNone() const { return acceptedNone_; }

	/* after a failed open: the peer rejected the association */
	bool		rejected() const { return rejected_; }

	/* with a socket observer: whether the TCP connection came up, and its socket */
	bool		connected() const { return fd_ >= 0; }
	int			socket() const { return fd_; }

private:
	void		closed();

	T_ASC_Network *net_;
	T_ASC_Parameters *params_;
	T_ASC_Association *assoc_;
	bool		acceptedNone_ = false;
	bool		rejected_ = false;
	MddSocketObserver observer_ = NULL;
	void	   *observerArg_ = NULL;
	int			fd_ = -1;
	const MddTlsSettings *tls_ = NULL;

	friend class MddObservedTransportLayer;
};

/*
 * Close a handle the C side owns that holds an association (members
 * association and broken): release the association unless asked to abort
 * it or it broke, and free the handle.  Never throws.
 */
template <typename Handle>
void
mddCloseHandle(Handle *handle, int release)
{
	if (handle == NULL)
		return;
	try
	{
		if (release && !handle->broken)
			handle->association.release();
		/* the destructor aborts an association not released */
		delete handle;
	}
	catch (...)
	{
		/* nothing more can be done: the socket closes with the process */
	}
}

/* the C-STORE response to a request: its message, SOP class and instance */
T_DIMSE_C_StoreRSP mddStoreResponse(const T_DIMSE_C_StoreRQ &req);

/* the transfer syntaxes a receiver of uncompressed data always understands */
extern const char *const mddUncompressedTransferSyntaxes[3];
bool		mddIsUncompressed(const std::string &transferSyntax);

/*
 * The contexts to propose for sending objects of these SOP classes in
 * these stored transfer syntaxes (pairs class, syntax): for each SOP
 * class, its stored syntaxes one context each, and the uncompressed ones
 * together as a fallback for uncompressed objects.
 */
std::vector<MddProposedContext> mddStoreContexts(
	const std::vector<std::pair<std::string, std::string>> &classesAndSyntaxes);

/* one stored object to send by C-STORE */
struct MddStoreRequest
{
	const unsigned char *data;	/* as stored: Part 10 file or bare data set */
	size_t		len;
	std::string sopClass;
	std::string sopInstance;
	std::string transferSyntax; /* of the stored data set */
	DIC_US		messageID;
	std::string moveOriginatorAE;	/* empty unless a C-MOVE sub-operation */
	DIC_US		moveOriginatorID;
};

enum MddStoreOutcome
{
	MDD_STORE_ANSWERED,			/* the receiver answered; status says how */
	MDD_STORE_NOT_SENDABLE,		/* no context fits, or the data cannot be read */
	MDD_STORE_BROKEN			/* the association failed; stop using it */
};

/*
 * Send one object by C-STORE on assoc (whose socket is fd, or -1 when not
 * known) and wait for the
 * answer.  On a context whose accepted transfer syntax is the stored one
 * the data set bytes go out exactly as stored; an uncompressed object is
 * converted to another uncompressed syntax when only that was accepted.
 * asGetProvider: the association is a C-GET served by mdd, so only
 * contexts where the peer took the storage SCP role are used.  A C-CANCEL
 * for cancelMessageID that arrives meanwhile sets *cancelled.  comment,
 * when given, receives the Error Comment of the response (empty if none).
 */
MddStoreOutcome mddSendStored(T_ASC_Association *assoc, int fd, bool asGetProvider,
							  const MddStoreRequest &req, int timeout,
							  const MddDicomCallbacks *cb, DIC_US cancelMessageID,
							  bool *cancelled, DIC_US *status, std::string &error,
							  std::string *comment = NULL);

#endif
