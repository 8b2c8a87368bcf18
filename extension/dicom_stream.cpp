/*
 * dicom_stream.cpp
 *	  An in-memory input stream for DCMTK (mddReadFromMemory of
 *	  dicom_stream.hpp), written so that hostile input cannot hurt the
 *	  server process that parses it.
 *
 * DCMTK's own DcmInputBufferStream cannot re-open itself, so DCMTK
 * allocates every value at its declared length up front, even a length the
 * input does not hold; it recurses into nested sequences without a depth
 * limit; and it inflates deflated data sets without a size limit.  The
 * stream here can hand DCMTK a factory (values are loaded later, from the
 * bytes that are really there), reports an error once the recursion has
 * used more than MDD_READ_STACK_LIMIT of stack, and inflates a deflated
 * data set itself within MDD_INFLATE_LIMIT.
 *
 * C++ only; includes no PostgreSQL header.
 */
#include "dicom_stream.hpp"

#include <dcmtk/dcmdata/dcistrma.h>
#include <dcmtk/dcmdata/dcistrmb.h>
#include <dcmtk/dcmdata/dcerror.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

/* stack DCMTK may use while reading nested sequences (about 1.5 kB a level) */
#define MDD_READ_STACK_LIMIT (256 * 1024)
/* largest data set a deflated transfer syntax may inflate to */
#define MDD_INFLATE_LIMIT ((size_t) 512 * 1024 * 1024)

namespace
{

/*
 * The bytes a MemoryStream reads: the caller's buffer, except that from
 * offset inflatedAt on a deflated data set is replaced by its inflated form.
 */
struct MemorySource
{
	const unsigned char *raw;
	size_t		rawLen;
	size_t		inflatedAt;		/* == rawLen while nothing is inflated */
	std::vector<unsigned char> inflated;

	size_t size() const { return inflatedAt + inflated.size(); }

	size_t copy(size_t pos, unsigned char *buf, size_t n) const
	{
		size_t		done = 0;

		if (pos >= size())
			return 0;
		n = std::min(n, size() - pos);
		if (pos < inflatedAt)
		{
			done = std::min(n, inflatedAt - pos);
			if (buf)
				memcpy(buf, raw + pos, done);
		}
		if (done < n && buf)
			memcpy(buf + done, inflated.data() + (pos + done - inflatedAt), n - done);
		return n;
	}
};

typedef std::shared_ptr<MemorySource> MemorySourcePtr;

/* a DcmProducer over a MemorySource */
class MemoryProducer : public DcmProducer
{
public:
	explicit MemoryProducer(const MemorySourcePtr &src) : src_(src), pos_(0), bad_(false) {}

	OFBool good() const override { return !bad_; }
	OFCondition status() const override { return bad_ ? EC_PutbackFailed : EC_Normal; }
	OFBool eos() override { return pos_ >= src_->size(); }
	offile_off_t avail() override { return bad_ ? 0 : static_cast<offile_off_t>(src_->size() - pos_); }

	offile_off_t read(void *buf, offile_off_t buflen) override
	{
		if (bad_ || buflen <= 0)
			return 0;
		size_t		n = src_->copy(pos_, static_cast<unsigned char *>(buf), static_cast<size_t>(buflen));

		pos_ += n;
		return static_cast<offile_off_t>(n);
	}

	offile_off_t skip(offile_off_t skiplen) override
	{
		if (bad_ || skiplen <= 0)
			return 0;
		size_t		n = std::min(static_cast<size_t>(skiplen), src_->size() - pos_);

		pos_ += n;
		return static_cast<offile_off_t>(n);
	}

	void putback(offile_off_t num) override
	{
		if (num < 0 || static_cast<size_t>(num) > pos_)
			bad_ = true;
		else
			pos_ -= static_cast<size_t>(num);
	}

	size_t position() const { return pos_; }

private:
	MemorySourcePtr src_;
	size_t		pos_;
	bool		bad_;
};

makeOFConditionConst(MddNestedTooDeep, OFM_dcmdata, 0x7f01, OF_error,
					 "sequences nested too deeply");
makeOFConditionConst(MddInflateTooLarge, OFM_dcmdata, 0x7f02, OF_error,
					 "deflated data set inflates beyond the size limit");

/*
 * The input stream mdd_dicom_parse reads from.  Unlike DcmInputBufferStream
 * it can hand DCMTK a factory, so that values longer than the read limit are
 * skipped and loaded only when asked for: DCMTK then never allocates room
 * for a value the input does not hold.  It also stops the read (with an
 * error status) when DCMTK's recursion over nested sequences has used more
 * than MDD_READ_STACK_LIMIT of stack, and inflates a deflated data set
 * itself, within MDD_INFLATE_LIMIT, instead of installing DCMTK's filter.
 */
class MemoryStream : public DcmInputStream
{
public:
	MemoryStream(const MemorySourcePtr &src, const char *stackBase)
		: DcmInputStream(&producer_), producer_(src), src_(src),
		  stackBase_(stackBase), tooDeep_(false), error_(EC_Normal) {}

	OFBool good() const override { return status().good(); }

	OFCondition status() const override
	{
		if (error_.bad())
			return error_;
		if (stackBase_ && stackUsed() > MDD_READ_STACK_LIMIT)
			tooDeep_ = true;
		if (tooDeep_)
			return MddNestedTooDeep;
		return DcmInputStream::status();
	}


	DcmInputStreamFactory *newFactory() const override;

	OFCondition installCompressionFilter(E_StreamCompression filterType) override
	{
		if (filterType != ESC_zlib || src_->inflatedAt != src_->rawLen)
			return DcmInputStream::installCompressionFilter(filterType);
		error_ = inflateRest();
		return error_;
	}

private:
	size_t stackUsed() const
	{
		char		here;
		uintptr_t	a = reinterpret_cast<uintptr_t>(&here),
					b = reinterpret_cast<uintptr_t>(stackBase_);

		return a > b ? a - b : b - a;
	}

	/* replace the raw bytes from here on by their inflated form */
	OFCondition inflateRest()
	{
		size_t		pos = producer_.position();
		DcmInputBufferStream z;
		std::vector<unsigned char> out;
		unsigned char buf[65536];

		if (pos > src_->rawLen)
			return EC_IllegalCall;
		z.setBuffer(src_->raw + pos, static_cast<offile_off_t>(src_->rawLen - pos));
		z.setEos();
		OFCondition cond = z.installCompressionFilter(ESC_zlib);

		while (cond.good() && z.good() && !z.eos())
		{
			offile_off_t n = z.read(buf, sizeof(buf));

			if (n <= 0)
				break;
			if (out.size() + static_cast<size_t>(n) > MDD_INFLATE_LIMIT)
			{
				cond = MddInflateTooLarge;
				break;
			}
			out.insert(out.end(), buf, buf + n);
		}
		if (cond.good() && z.status().bad())
			cond = z.status();
		z.releaseBuffer();
		if (cond.bad())
			return cond;
		src_->inflatedAt = pos;
		src_->inflated.swap(out);
		return EC_Normal;
	}

	MemoryProducer producer_;
	MemorySourcePtr src_;
	const char *stackBase_;
	mutable bool tooDeep_;
	OFCondition error_;
};

/* recreates a MemoryStream at a given position, to load a value later */
class MemoryStreamFactory : public DcmInputStreamFactory
{
public:
	MemoryStreamFactory(const MemorySourcePtr &src, size_t pos) : src_(src), pos_(pos) {}

	DcmInputStream *create() const override
	{
		MemoryStream *s = new MemoryStream(src_, NULL);

		s->skip(static_cast<offile_off_t>(pos_));
		return s;
	}
	DcmInputStreamFactory *clone() const override { return new MemoryStreamFactory(*this); }
	/* not looked at by dcmdata; a file-like stream is the closest kind */
	DcmInputStreamFactoryType ident() const override { return DFT_DcmInputFileStreamFactory; }

private:
	MemorySourcePtr src_;
	size_t		pos_;
};

DcmInputStreamFactory *
MemoryStream::newFactory() const
{
	if (currentProducer() != &producer_)
		return NULL;			/* a DCMTK filter is installed */
	return new MemoryStreamFactory(src_, producer_.position());
}

}								/* namespace */

OFCondition
mddReadFromMemory(DcmFileFormat &ff, const unsigned char *data, size_t len)
{
	char		stackBase;
	MemorySourcePtr src = std::make_shared<MemorySource>();
	OFCondition cond;

	src->raw = data;
	src->rawLen = len;
	src->inflatedAt = len;
	{
		MemoryStream stream(src, &stackBase);

		ff.transferInit();
		cond = ff.read(stream, EXS_Unknown, EGL_noChange, DCM_MaxReadLength);
		ff.transferEnd();
	}
	return cond;
}
