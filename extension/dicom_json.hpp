/*
 * dicom_json.hpp
 *	  A small JSON text builder for the DCMTK side of mdd.
 *
 * The parser describes each object to PostgreSQL as one JSON document; this
 * writer keeps that text valid whatever the DICOM strings contain: invalid
 * UTF-8 becomes U+FFFD, control characters are escaped, NUL bytes dropped.
 * C++ only; includes no PostgreSQL header.
 */
#ifndef MDD_DICOM_JSON_HPP
#define MDD_DICOM_JSON_HPP

#include <string>

class MddJsonWriter
{
public:
	MddJsonWriter() : needComma_(false) {}

	void beginObject() { separate(); out_ += '{'; needComma_ = false; }
	void endObject() { out_ += '}'; needComma_ = true; }
	void beginArray() { separate(); out_ += '['; needComma_ = false; }
	void endArray() { out_ += ']'; needComma_ = true; }

	/* an object member name; the value written next belongs to it */
	void key(const std::string &name)
	{
		separate();
		appendString(name);
		out_ += ':';
		needComma_ = false;
	}

	void string(const std::string &value) { separate(); appendString(value); needComma_ = true; }
	void null() { separate(); out_ += "null"; needComma_ = true; }
	void boolean(bool v) { separate(); out_ += v ? "true" : "false"; needComma_ = true; }

	/* a number already known to follow JSON's grammar */
	void rawNumber(const std::string &text) { separate(); out_ += text; needComma_ = true; }

	/* a member with a string value, or null when the value is empty */
	void member(const char *name, const std::string &value)
	{
		key(name);
		if (value.empty())
			null();
		else
			string(value);
	}

	const std::string &text() const { return out_; }

	/* true when text is a number in JSON's grammar (no '+', no leading '.') */
	static bool isJsonNumber(const std::string &text);

private:
	void separate()
	{
		if (needComma_)
			out_ += ',';
	}
	void appendString(const std::string &value);

	std::string out_;
	bool needComma_;
};

#endif
