/*
 * dicom_send.cpp
 *	  C-STORE of stored objects to a DICOM node for mdd.send (the sender
 *	  functions of dicom.h): one association per batch of a send job, each
 *	  object sent by mddSendStored (dicom_scu.cpp), the same code that
 *	  serves C-MOVE and C-GET, so that data set bytes go out exactly as
 *	  stored, or converted only between uncompressed syntaxes.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes.
 */
#include "dicom_common.hpp"
#include "dicom_scu.hpp"

#include <memory>
#include <new>
#include <utility>

struct MddDicomSender
{
	MddScuAssociation association;
	MddDicomCallbacks callbacks;
	int			dimseTimeout;
	DIC_US		nextMessageID;
	bool		broken;
};

extern "C" MddDicomStatus
mdd_dicom_sender_open(const MddDicomSenderConfig *config, const char *const *classes,
					  const char *const *syntaxes, int n, MddDicomSender **sender,
					  char *errbuf, size_t errbuf_len)
{
	*sender = NULL;
	mddSetError(errbuf, errbuf_len, "");
	try
	{
		std::unique_ptr<MddDicomSender> s(new MddDicomSender());
		std::vector<std::pair<std::string, std::string>> objects;
		std::string error;

		for (int i = 0; i < n; i++)
			objects.emplace_back(classes[i], syntaxes[i]);
		/* the wait for answers calls should_stop only; no socket is passed */
		s->callbacks = MddDicomCallbacks();
		s->callbacks.arg = config->arg;
		s->callbacks.should_stop = config->should_stop;
		s->dimseTimeout = config->dimse_timeout;
		s->nextMessageID = 1;
		s->broken = false;
		s->association.useTls(config->tls);
		if (!s->association.open(config->our_ae, config->peer_ae, config->host, config->port,
								 config->acse_timeout, mddStoreContexts(objects), error))
		{
			mddSetError(errbuf, errbuf_len, error);
			return s->association.acceptedNone() ? MDD_DICOM_NOT_SENDABLE : MDD_DICOM_NETWORK;
		}
		*sender = s.release();
		return MDD_DICOM_OK;
	}
	catch (const std::bad_alloc &)
	{
		mddSetError(errbuf, errbuf_len, "out of memory opening the association");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "opening the association failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}

extern "C" MddDicomStatus
mdd_dicom_sender_store(MddDicomSender *sender, const unsigned char *data, size_t len,
					   const char *sop_class_uid, const char *sop_instance_uid,
					   const char *transfer_syntax_uid, unsigned short *status,
					   char *errbuf, size_t errbuf_len)
{
	*status = 0;
	mddSetError(errbuf, errbuf_len, "");
	try
	{
		MddStoreRequest req;
		std::string error;
		std::string comment;
		DIC_US		answer = 0;
		MddStoreOutcome outcome;

		if (sender->broken)
		{
			mddSetError(errbuf, errbuf_len, "the association failed before");
			return MDD_DICOM_NETWORK;
		}
		req.data = data;
		req.len = len;
		req.sopClass = sop_class_uid;
		req.sopInstance = sop_instance_uid;
		req.transferSyntax = transfer_syntax_uid;
		req.messageID = sender->nextMessageID++;
		req.moveOriginatorID = 0;
		outcome = mddSendStored(sender->association.get(), -1, false, req, sender->dimseTimeout,
								&sender->callbacks, 0, NULL, &answer, error, &comment);
		switch (outcome)
		{
			case MDD_STORE_ANSWERED:
				*status = answer;
				mddSetError(errbuf, errbuf_len, comment);
				return MDD_DICOM_OK;
			case MDD_STORE_NOT_SENDABLE:
				mddSetError(errbuf, errbuf_len, error);
				return MDD_DICOM_NOT_SENDABLE;
			case MDD_STORE_BROKEN:
				break;
		}
		sender->broken = true;
		mddSetError(errbuf, errbuf_len, error);
		return MDD_DICOM_NETWORK;
	}
	catch (...)
	{
		sender->broken = true;
		mddSetError(errbuf, errbuf_len, "C-STORE failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}

extern "C" void
mdd_dicom_sender_close(MddDicomSender *sender, int release)
{
	mddCloseHandle(sender, release);
}
