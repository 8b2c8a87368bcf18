#!/usr/bin/env python3
"""Write small hand-made DICOM edge cases into a seed corpus directory.

Used by `make -C fuzz seed` next to the pydicom test files; each file is one
corner of the reader the fuzzer should start from (empty meta header, bare
data sets in each transfer syntax, sequences, odd character sets, ...).
Plain Python, no DICOM library: the bytes are spelled out here.
"""
import os
import struct
import sys
import zlib

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN",
            "UR", "UT", "UV"}


def pad(value, vr):
    """Encode a value and pad it to even length as DICOM requires."""
    if isinstance(value, str):
        value = value.encode("latin-1")
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    return value


def explicit(group, elem, vr, value, big=False, length=None):
    e = ">" if big else "<"
    value = value if vr == "SQ" else pad(value, vr)
    n = len(value) if length is None else length
    head = struct.pack(e + "HH", group, elem) + vr.encode()
    if vr in LONG_VRS:
        head += b"\0\0" + struct.pack(e + "I", n)
    else:
        head += struct.pack(e + "H", n)
    return head + value


def implicit(group, elem, value, vr="UI", length=None):
    value = value if vr == "SQ" else pad(value, vr)
    n = len(value) if length is None else length
    return struct.pack("<HHI", group, elem, n) + value


def item(body, undefined=False, big=False):
    e = ">" if big else "<"
    if undefined:
        return (struct.pack(e + "HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body +
                struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0))
    return struct.pack(e + "HHI", 0xFFFE, 0xE000, len(body)) + body


def seq_undefined_end(big=False):
    e = ">" if big else "<"
    return struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)


def meta(ts, sop_class=CT_IMAGE, sop_inst="1.2.3.4", extra=b""):
    body = (explicit(0x0002, 0x0001, "OB", b"\x00\x01") +
            explicit(0x0002, 0x0002, "UI", sop_class) +
            explicit(0x0002, 0x0003, "UI", sop_inst) +
            explicit(0x0002, 0x0010, "UI", ts) +
            explicit(0x0002, 0x0012, "UI", "1.2.3.999") + extra)
    return (b"\0" * 128 + b"DICM" +
            explicit(0x0002, 0x0000, "UL", struct.pack("<I", len(body))) + body)


def basic_ds(enc, sop_class=CT_IMAGE, sop_inst="1.2.3.4"):
    return (enc(0x0008, 0x0016, "UI", sop_class) +
            enc(0x0008, 0x0018, "UI", sop_inst) +
            enc(0x0010, 0x0010, "PN", "Doe^John") +
            enc(0x0010, 0x0020, "LO", "PID1") +
            enc(0x0020, 0x000D, "UI", "1.2.3.1") +
            enc(0x0020, 0x000E, "UI", "1.2.3.2"))


def ex_le(g, e, vr, v):
    return explicit(g, e, vr, v)


def ex_be(g, e, vr, v):
    return explicit(g, e, vr, v, big=True)


def im_le(g, e, vr, v):
    return implicit(g, e, v, vr)


def seeds():
    s = {}
    # Part 10 header with an empty meta group and nothing after it
    s["meta_empty"] = (b"\0" * 128 + b"DICM" +
                       explicit(0x0002, 0x0000, "UL", struct.pack("<I", 0)))
    # preamble + magic only
    s["magic_only"] = b"\0" * 128 + b"DICM"
    # a bare implicit VR data set with only a SOP Instance UID
    s["implicit_sop_uid_only"] = implicit(0x0008, 0x0018, "1.2.3.4")
    # bare data sets in each uncompressed transfer syntax
    s["implicit_basic"] = basic_ds(im_le)
    s["explicit_le_basic"] = basic_ds(ex_le)
    s["explicit_be_basic"] = basic_ds(ex_be)
    # Part 10 files in each transfer syntax
    s["p10_implicit"] = meta(IMPLICIT_LE) + basic_ds(im_le)
    s["p10_explicit_le"] = meta(EXPLICIT_LE) + basic_ds(ex_le)
    s["p10_explicit_be"] = meta(EXPLICIT_BE) + basic_ds(ex_be)
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    s["p10_deflated"] = (meta(DEFLATED_LE) +
                         raw.compress(basic_ds(ex_le)) + raw.flush())
    # meta header that lies about its transfer syntax
    s["p10_ts_mismatch"] = meta(EXPLICIT_BE) + basic_ds(ex_le)
    # meta group length larger than the file
    s["p10_meta_len_too_big"] = (b"\0" * 128 + b"DICM" +
                                 explicit(0x0002, 0x0000, "UL",
                                          struct.pack("<I", 0x7FFFFFF0)))
    # truncated in the middle of a tag
    s["truncated_tag"] = basic_ds(ex_le)[:-3]
    # RT structure set with nested undefined-length reference sequences
    contour = item(ex_le(0x0008, 0x1150, "UI", CT_IMAGE) +
                   ex_le(0x0008, 0x1155, "UI", "1.2.3.100"), undefined=True)
    series = item(ex_le(0x0020, 0x000E, "UI", "1.2.3.200") +
                  explicit(0x3006, 0x0016, "SQ", contour + seq_undefined_end(),
                           length=0xFFFFFFFF))
    frame = item(ex_le(0x0020, 0x0052, "UI", "1.2.3.300") +
                 explicit(0x3006, 0x0012, "SQ",
                          item(explicit(0x3006, 0x0014, "SQ",
                                        series + seq_undefined_end(),
                                        length=0xFFFFFFFF)) +
                          seq_undefined_end(), length=0xFFFFFFFF))
    s["rtstruct_refs"] = (meta(EXPLICIT_LE, RT_STRUCT) +
                          basic_ds(ex_le, RT_STRUCT) +
                          explicit(0x3006, 0x0010, "SQ",
                                   frame + seq_undefined_end(),
                                   length=0xFFFFFFFF))
    # sequence delimiter without a sequence, item outside a sequence
    s["stray_delimiters"] = (basic_ds(ex_le) + seq_undefined_end() +
                             item(b"", undefined=True))
    # character sets: Latin-1 bytes, ISO 2022 escapes, an unknown term
    s["charset_latin1"] = (ex_le(0x0008, 0x0005, "CS", "ISO_IR 100") +
                           ex_le(0x0008, 0x0016, "UI", CT_IMAGE) +
                           ex_le(0x0008, 0x0018, "UI", "1.2.3.4") +
                           ex_le(0x0010, 0x0010, "PN", b"M\xfcller^J\xf6rg"))
    s["charset_iso2022_jp"] = (
        ex_le(0x0008, 0x0005, "CS", "\\ISO 2022 IR 87") +
        ex_le(0x0008, 0x0016, "UI", CT_IMAGE) +
        ex_le(0x0008, 0x0018, "UI", "1.2.3.4") +
        ex_le(0x0010, 0x0010, "PN",
              b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"))
    s["charset_unknown"] = (ex_le(0x0008, 0x0005, "CS", "ISO_IR 999") +
                            ex_le(0x0008, 0x0016, "UI", CT_IMAGE) +
                            ex_le(0x0008, 0x0018, "UI", "1.2.3.4") +
                            ex_le(0x0010, 0x0010, "PN", b"\xff\xfe\x80"))
    # a text attribute with VR UN, numbers, dates and odd values
    s["un_and_values"] = (ex_le(0x0008, 0x0016, "UI", CT_IMAGE) +
                          ex_le(0x0008, 0x0018, "UI", "1.2.3.4") +
                          explicit(0x0008, 0x1030, "UN", "STUDY DESC") +
                          ex_le(0x0008, 0x0020, "DA", "20000229") +
                          ex_le(0x0008, 0x0030, "TM", "23:59:60.1234567") +
                          ex_le(0x0010, 0x0030, "DA", "1900.02.29") +
                          ex_le(0x0020, 0x0013, "IS", "+0012") +
                          ex_le(0x0018, 0x0050, "DS", "1e999\\-.5\\NaN") +
                          ex_le(0x0028, 0x0010, "US", b"\x00\x02") +
                          ex_le(0x0018, 0x1030, "FD", b"\x00" * 6 + b"\xf0\x7f") +
                          ex_le(0x0009, 0x0010, "LO", "PRIVATE") +
                          ex_le(0x0009, 0x1001, "UN", b"\x01\x02"))
    # pixel data as an encapsulated (undefined length) fragment sequence
    s["p10_encapsulated"] = (meta("1.2.840.10008.1.2.4.50") + basic_ds(ex_le) +
                             explicit(0x7FE0, 0x0010, "OB",
                                      item(b"") + item(b"\xff\xd8\xff\xd9") +
                                      seq_undefined_end(),
                                      length=0xFFFFFFFF))
    # odd length value, zero-length values
    s["odd_and_empty"] = (ex_le(0x0008, 0x0016, "UI", CT_IMAGE) +
                          struct.pack("<HH", 0x0008, 0x0018) + b"UI" +
                          struct.pack("<H", 7) + b"1.2.3.4" +
                          struct.pack("<HH", 0x0010, 0x0010) + b"PN\0\0")
    # tiny inputs
    s["one_byte"] = b"\x08"
    s["dicm_no_preamble"] = b"DICM" + basic_ds(ex_le)
    return s


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "corpus"
    os.makedirs(out, exist_ok=True)
    for name, data in seeds().items():
        with open(os.path.join(out, "seed_" + name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
