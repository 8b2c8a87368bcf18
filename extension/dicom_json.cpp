/*
 * dicom_json.cpp
 *	  String escaping and number checks of the JSON builder (dicom_json.hpp).
 *
 * C++ only; includes no PostgreSQL header.
 */
#include "dicom_json.hpp"

#include <cctype>
#include <cstdio>

/*
 * Length of the valid UTF-8 sequence starting at s (at most n bytes), or 0
 * when the bytes there are not valid UTF-8 (overlong forms, surrogates and
 * code points above U+10FFFF are invalid too).
 */
static size_t
utf8SequenceLength(const unsigned char *s, size_t n)
{
	unsigned char c = s[0];
	size_t		len;
	unsigned int cp;

	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
	{
		len = 2;
		cp = c & 0x1F;
	}
	else if (c >= 0xE0 && c <= 0xEF)
	{
		len = 3;
		cp = c & 0x0F;
	}
	else if (c >= 0xF0 && c <= 0xF4)
	{
		len = 4;
		cp = c & 0x07;
	}
	else
		return 0;
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++)
	{
		if ((s[i] & 0xC0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3F);
	}
	if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
		cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
		return 0;
	return len;
}

void
MddJsonWriter::appendString(const std::string &value)
{
	const unsigned char *s = reinterpret_cast<const unsigned char *>(value.data());
	size_t		n = value.size();

	out_ += '"';
	for (size_t i = 0; i < n;)
	{
		unsigned char c = s[i];

		if (c == 0)
		{
			i++;
			continue;
		}
		if (c == '"' || c == '\\')
		{
			out_ += '\\';
			out_ += static_cast<char>(c);
			i++;
		}
		else if (c < 0x20)
		{
			char		esc[8];

			snprintf(esc, sizeof(esc), "\\u%04x", c);
			out_ += esc;
			i++;
		}
		else
		{
			size_t		len = utf8SequenceLength(s + i, n - i);

			if (len == 0)
			{
				out_ += "\xEF\xBF\xBD";		/* U+FFFD replacement character */
				i++;
			}
			else
			{
				out_.append(value, i, len);
				i += len;
			}
		}
	}
	out_ += '"';
}

bool
MddJsonWriter::isJsonNumber(const std::string &t)
{
	size_t		i = 0,
				n = t.size();

	if (i < n && t[i] == '-')
		i++;
	if (i >= n || !isdigit(static_cast<unsigned char>(t[i])))
		return false;
	if (t[i] == '0')
		i++;
	else
		while (i < n && isdigit(static_cast<unsigned char>(t[i])))
			i++;
	if (i < n && t[i] == '.')
	{
		i++;
		if (i >= n || !isdigit(static_cast<unsigned char>(t[i])))
			return false;
		while (i < n && isdigit(static_cast<unsigned char>(t[i])))
			i++;
	}
	if (i < n && (t[i] == 'e' || t[i] == 'E'))
	{
		i++;
		if (i < n && (t[i] == '+' || t[i] == '-'))
			i++;
		if (i >= n || !isdigit(static_cast<unsigned char>(t[i])))
			return false;
		while (i < n && isdigit(static_cast<unsigned char>(t[i])))
			i++;
	}
	return i == n;
}
