// mdd web viewer: an image series as a volume in patient coordinates (mm),
// loaded frame by frame over WADO-RS, and its three orthogonal planes.

import { api, base64Bytes, wado } from './api.js';
import { parseDicom, TAG } from './dicom.js';

export const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
export const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
const sub = (a, b) => [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
const num = (v, d) => (Array.isArray(v) ? (v.length ? Number(v[0]) : d) : v === null || v === undefined ? d : Number(v));

/*
 * The volume of an image series: voxel (i, j, k) is column i, row j of
 * slice k; slices sorted along the normal of the image plane.
 */
export class Volume {
	constructor(info) {
		this.info = info;
		this.columns = info.columns;
		this.rows = info.rows;
		const o = (info.orientation || [1, 0, 0, 0, 1, 0]).map(Number);
		this.rowDir = o.slice(0, 3); // the column index grows along it
		this.colDir = o.slice(3, 6); // the row index grows along it
		this.normal = cross(this.rowDir, this.colDir);
		const ps = (info.pixel_spacing || [1, 1]).map(Number);
		this.rowSpacing = ps[0]; // between rows
		this.colSpacing = ps[1]; // between columns
		this.slope = num(info.rescale_slope, 1);
		this.intercept = num(info.rescale_intercept, 0);
		this.instances = info.instances
			.filter((x) => Array.isArray(x.position))
			.map((x) => ({ ...x, w: dot(x.position.map(Number), this.normal) }))
			.sort((a, b) => a.w - b.w);
		this.slices = this.instances.length;
		this.w = this.instances.map((x) => x.w);
		this.sliceSpacing = this.slices > 1 ? (this.w[this.slices - 1] - this.w[0]) / (this.slices - 1) : 1;
		if (!(this.sliceSpacing > 0)) this.sliceSpacing = 1;
		this.origin = this.instances.length ? this.instances[0].position.map(Number) : [0, 0, 0];
		this.data = new Int16Array(this.columns * this.rows * Math.max(this.slices, 1));
		this.loaded = new Uint8Array(this.slices);
		this.windowCenter = num(info.window_center, 40);
		this.windowWidth = num(info.window_width, 400);
	}

	/* Patient coordinates of voxel (i, j, k), k fractional. */
	world(i, j, k) {
		const k0 = Math.max(0, Math.min(this.slices - 1, Math.floor(k)));
		const k1 = Math.min(this.slices - 1, k0 + 1);
		const f = Math.max(0, Math.min(1, k - k0));
		const p0 = this.instances[k0].position;
		const p1 = this.instances[k1].position;
		const base = [0, 1, 2].map((a) => Number(p0[a]) * (1 - f) + Number(p1[a]) * f);
		const out = new Array(3);
		for (let a = 0; a < 3; a++) out[a] = base[a] + i * this.colSpacing * this.rowDir[a] + j * this.rowSpacing * this.colDir[a];
		if (k < 0 || k > this.slices - 1) {
			const extra = (k < 0 ? k : k - (this.slices - 1)) * this.sliceSpacing;
			for (let a = 0; a < 3; a++) out[a] += extra * this.normal[a];
		}
		return out;
	}

	/* Fractional voxel index (i, j, k) of a point. */
	index(p) {
		const d = sub(p, this.origin);
		const i = dot(d, this.rowDir) / this.colSpacing;
		const j = dot(d, this.colDir) / this.rowSpacing;
		const w = dot(p, this.normal);
		const n = this.slices;
		let k;
		if (n < 2) k = (w - (n ? this.w[0] : 0)) / this.sliceSpacing;
		else if (w <= this.w[0]) k = (w - this.w[0]) / this.sliceSpacing;
		else if (w >= this.w[n - 1]) k = n - 1 + (w - this.w[n - 1]) / this.sliceSpacing;
		else {
			let lo = 0;
			let hi = n - 1;
			while (hi - lo > 1) {
				const mid = (lo + hi) >> 1;
				if (this.w[mid] <= w) lo = mid;
				else hi = mid;
			}
			k = lo + (w - this.w[lo]) / (this.w[hi] - this.w[lo]);
		}
		return [i, j, k];
	}

	/* Store the stored pixel values of slice k as Hounsfield units (or the modality's unit). */
	setSlice(k, bytes, bitsAllocated, signed) {
		const n = this.columns * this.rows;
		const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
		const out = this.data.subarray(k * n, (k + 1) * n);
		const step = bitsAllocated === 8 ? 1 : 2;
		if (bytes.byteLength < n * step) throw new Error(`slice ${k + 1}: ${bytes.byteLength} bytes of pixels, ${n * step} expected`);
		for (let x = 0; x < n; x++) {
			let v;
			if (step === 1) v = signed ? view.getInt8(x) : view.getUint8(x);
			else v = signed ? view.getInt16(2 * x, true) : view.getUint16(2 * x, true);
			const hu = v * this.slope + this.intercept;
			out[x] = hu < -32768 ? -32768 : hu > 32767 ? 32767 : Math.round(hu);
		}
		this.loaded[k] = 1;
	}

	value(i, j, k) {
		return this.data[(k * this.rows + j) * this.columns + i];
	}
}

/*
 * Load an image series: its geometry from /api/series, its pixels as
 * uncompressed frames from WADO-RS (or, when the frames are not to be had,
 * the objects themselves through /api/object).  onSlice(k) is called as
 * slices arrive.
 */
export async function loadVolume(seriesUid, onSlice, signal) {
	const info = await api('series', { series_instance_uid: seriesUid });
	const vol = new Volume(info);
	const bits = num(info.bits_allocated, 16);
	const signed = num(info.pixel_representation, 0) === 1;
	let useFrames = true;
	let next = 0;
	const one = async (k) => {
		const inst = vol.instances[k];
		if (useFrames) {
			try {
				const parts = await wado(`/studies/${info.study_instance_uid}/series/${seriesUid}/instances/${inst.sop_instance_uid}/frames/1`,
					'application/octet-stream');
				if (!parts.length) throw new Error('no frame in the answer');
				vol.setSlice(k, parts[0], bits, signed);
				return;
			} catch (e) {
				if (e.status === 401 || e.status === 403) throw e;
				useFrames = false; // the objects themselves, then
			}
		}
		const obj = await api('object', { id: inst.id });
		const ds = await parseDicom(base64Bytes(obj.data));
		const px = ds.bytes(TAG.PixelData);
		if (!px) throw new Error(`object ${inst.id} has no native pixel data`);
		vol.setSlice(k, px, ds.uint16(TAG.BitsAllocated) || bits, (ds.uint16(TAG.PixelRepresentation) || 0) === 1);
	};
	// the first slice alone: whether WADO-RS frames are to be had is
	// decided once, not by every concurrent request
	if (vol.slices > 0) {
		await one(0);
		onSlice(vol, 0);
		next = 1;
	}
	const worker = async () => {
		while (next < vol.slices) {
			if (signal && signal.aborted) return;
			const k = next++;
			await one(k);
			onSlice(vol, k);
		}
	};
	await Promise.all(Array.from({ length: 6 }, worker));
	return vol;
}
