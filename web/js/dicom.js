// mdd web viewer: a small reader of DICOM Part 10 objects, enough for the
// RT objects the viewer draws (RT Structure Set contours, RT Dose grids)
// and for image pixels when WADO-RS frames are not to be had.  Explicit and
// implicit VR little endian, explicit VR big endian and deflated explicit
// VR little endian; sequences of defined and undefined length.

const IMPLICIT_LE = '1.2.840.10008.1.2';
const EXPLICIT_BE = '1.2.840.10008.1.2.2';
const DEFLATED = '1.2.840.10008.1.2.1.99';

// VRs whose explicit length field is 4 bytes (after 2 reserved bytes)
const LONG_VRS = new Set(['OB', 'OD', 'OF', 'OL', 'OV', 'OW', 'SQ', 'SV', 'UC', 'UN', 'UR', 'UT', 'UV']);

// sequences an implicit VR data set may hold with a defined length: the
// ones this viewer reads (tags as 8 hex digits)
const SEQUENCES = new Set([
	'30060010', '30060012', '30060014', '30060016', '30060020', '30060039', '30060040',
	'30060080', '300C0002', '300A0010', '300A00B0', '300A0111', '300A0070', '300C0004',
	'300A0180', '00081115', '00081140', '300A0012',
]);

export const TAG = {
	TransferSyntaxUID: '00020010',
	SOPClassUID: '00080016',
	SOPInstanceUID: '00080018',
	Modality: '00080060',
	Rows: '00280010',
	Columns: '00280011',
	BitsAllocated: '00280100',
	PixelRepresentation: '00280103',
	RescaleSlope: '00281053',
	RescaleIntercept: '00281052',
	PixelSpacing: '00280030',
	NumberOfFrames: '00280008',
	ImagePositionPatient: '00200032',
	ImageOrientationPatient: '00200037',
	FrameOfReferenceUID: '00200052',
	PixelData: '7FE00010',
	GridFrameOffsetVector: '3004000C',
	DoseGridScaling: '3004000E',
	DoseUnits: '30040002',
	DoseSummationType: '3004000A',
	ReferencedFrameOfReferenceSequence: '30060010',
	StructureSetROISequence: '30060020',
	ROINumber: '30060022',
	ROIName: '30060026',
	ROIContourSequence: '30060039',
	ROIDisplayColor: '3006002A',
	ContourSequence: '30060040',
	ContourGeometricType: '30060042',
	ContourData: '30060050',
	ReferencedROINumber: '30060084',
	RTROIObservationsSequence: '30060080',
	RTROIInterpretedType: '300600A4',
	StructureSetLabel: '30060002',
};

export class DicomError extends Error {}

/* One data set: elements by tag, each {vr, bytes} or {vr: 'SQ', items}. */
export class DataSet {
	constructor(littleEndian) {
		this.elements = new Map();
		this.littleEndian = littleEndian;
	}

	has(tag) {
		return this.elements.has(tag);
	}

	bytes(tag) {
		const e = this.elements.get(tag);
		return e && e.bytes ? e.bytes : null;
	}

	items(tag) {
		const e = this.elements.get(tag);
		return e && e.items ? e.items : [];
	}

	/* A text value, without padding. */
	string(tag) {
		const b = this.bytes(tag);
		if (!b) return null;
		return new TextDecoder('latin1').decode(b).replace(/[\0 ]+$/, '').replace(/^ +/, '');
	}

	/* The values of a DS or IS text attribute as numbers. */
	numbers(tag) {
		const s = this.string(tag);
		if (s === null || s === '') return [];
		return s.split('\\').map((x) => parseFloat(x));
	}

	number(tag) {
		const n = this.numbers(tag);
		return n.length ? n[0] : null;
	}

	/* An unsigned short (US) value. */
	uint16(tag) {
		const b = this.bytes(tag);
		if (!b || b.length < 2) return null;
		return new DataView(b.buffer, b.byteOffset, 2).getUint16(0, this.littleEndian);
	}
}

class Reader {
	constructor(bytes, littleEndian, explicit) {
		this.bytes = bytes;
		this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
		this.le = littleEndian;
		this.explicit = explicit;
		this.pos = 0;
	}

	need(n) {
		if (this.pos + n > this.bytes.length) throw new DicomError(`the object ends early, at byte ${this.pos}`);
	}

	u16() {
		this.need(2);
		const v = this.view.getUint16(this.pos, this.le);
		this.pos += 2;
		return v;
	}

	u32() {
		this.need(4);
		const v = this.view.getUint32(this.pos, this.le);
		this.pos += 4;
		return v;
	}

	tag() {
		const g = this.u16();
		const e = this.u16();
		return ((g << 16) | e) >>> 0;
	}
}

const hex = (t) => t.toString(16).toUpperCase().padStart(8, '0');
const ITEM = 0xfffee000;
const ITEM_END = 0xfffee00d;
const SEQ_END = 0xfffee0dd;

function readDataSet(r, end, depth) {
	if (depth > 16) throw new DicomError('sequences nest too deep');
	const ds = new DataSet(r.le);
	while (r.pos < end) {
		const start = r.pos;
		const tag = r.tag();
		if (tag === ITEM_END) {
			r.u32();
			return ds;
		}
		if (tag === SEQ_END || tag === ITEM) {
			r.pos = start;
			return ds;
		}
		let vr = null;
		let length;
		if (r.explicit) {
			r.need(2);
			vr = String.fromCharCode(r.bytes[r.pos], r.bytes[r.pos + 1]);
			r.pos += 2;
			if (LONG_VRS.has(vr)) {
				r.pos += 2;
				length = r.u32();
			} else {
				length = r.u16();
			}
		} else {
			length = r.u32();
		}
		const key = hex(tag);
		const undefinedLength = length === 0xffffffff;
		if (vr === 'SQ' || (!r.explicit && (SEQUENCES.has(key) || (undefinedLength && key !== '7FE00010')))
			|| (vr === 'UN' && undefinedLength)) {
			ds.elements.set(key, { vr: 'SQ', items: readItems(r, undefinedLength ? Infinity : r.pos + length, depth) });
			continue;
		}
		if (undefinedLength) {
			// encapsulated pixel data: the fragments, kept as they are
			const fragments = [];
			for (;;) {
				const t = r.tag();
				const len = r.u32();
				if (t === SEQ_END) break;
				if (t !== ITEM) throw new DicomError(`unexpected tag ${hex(t)} in encapsulated data`);
				r.need(len);
				fragments.push(r.bytes.subarray(r.pos, r.pos + len));
				r.pos += len;
			}
			ds.elements.set(key, { vr: vr || 'OB', fragments });
			continue;
		}
		r.need(length);
		ds.elements.set(key, { vr, bytes: r.bytes.subarray(r.pos, r.pos + length) });
		r.pos += length;
	}
	return ds;
}

function readItems(r, end, depth) {
	const items = [];
	while (r.pos < end) {
		const tag = r.tag();
		const length = r.u32();
		if (tag === SEQ_END) break;
		if (tag !== ITEM) throw new DicomError(`expected a sequence item, found ${hex(tag)}`);
		const itemEnd = length === 0xffffffff ? Infinity : r.pos + length;
		items.push(readDataSet(r, Math.min(itemEnd, r.bytes.length), depth + 1));
	}
	return items;
}

async function inflate(bytes) {
	const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate-raw'));
	return new Uint8Array(await new Response(stream).arrayBuffer());
}

/*
 * Parse a Part 10 object (or a bare data set in implicit VR little
 * endian).  Returns the data set; its file meta elements are in it too.
 */
export async function parseDicom(bytes) {
	let pos = 0;
	let ts = IMPLICIT_LE;
	const meta = new DataSet(true);
	if (bytes.length >= 132 && bytes[128] === 0x44 && bytes[129] === 0x49 && bytes[130] === 0x43 && bytes[131] === 0x4d) {
		const r = new Reader(bytes, true, true);
		r.pos = 132;
		// the meta header: group 0002, explicit VR little endian
		while (r.pos + 4 <= bytes.length && r.view.getUint16(r.pos, true) === 0x0002) {
			const tag = r.tag();
			const vr = String.fromCharCode(bytes[r.pos], bytes[r.pos + 1]);
			r.pos += 2;
			let length;
			if (LONG_VRS.has(vr)) {
				r.pos += 2;
				length = r.u32();
			} else {
				length = r.u16();
			}
			r.need(length);
			meta.elements.set(hex(tag), { vr, bytes: bytes.subarray(r.pos, r.pos + length) });
			r.pos += length;
		}
		pos = r.pos;
		ts = meta.string(TAG.TransferSyntaxUID) || ts;
	}
	let body = bytes.subarray(pos);
	if (ts === DEFLATED) body = await inflate(body);
	const explicit = ts !== IMPLICIT_LE;
	const le = ts !== EXPLICIT_BE;
	const r = new Reader(body, le, explicit);
	const ds = readDataSet(r, body.length, 0);
	for (const [k, v] of meta.elements) ds.elements.set(k, v);
	ds.transferSyntax = ts;
	return ds;
}
