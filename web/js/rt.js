// mdd web viewer: the RT objects drawn over the images.  Structure set
// contours and RT Dose grids are read from the stored objects
// (/api/object, dicom.js); plan beams come from /api/plan.

import { api, base64Bytes } from './api.js';
import { parseDicom, TAG } from './dicom.js';
import { cross, dot } from './volume.js';

async function objectDataSet(id) {
	const obj = await api('object', { id });
	return parseDicom(base64Bytes(obj.data));
}

/*
 * The ROIs of an RT Structure Set: number, name, colour, type and their
 * closed planar contours (points as a flat x, y, z array in mm).
 */
export async function loadStructures(id) {
	const ds = await objectDataSet(id);
	const rois = new Map();
	for (const item of ds.items(TAG.StructureSetROISequence)) {
		const number = item.number(TAG.ROINumber);
		rois.set(number, { number, name: item.string(TAG.ROIName) || `ROI ${number}`, color: [255, 255, 255], type: '', contours: [], visible: true });
	}
	for (const item of ds.items(TAG.RTROIObservationsSequence)) {
		const roi = rois.get(item.number(TAG.ReferencedROINumber));
		if (roi) roi.type = item.string(TAG.RTROIInterpretedType) || '';
	}
	for (const item of ds.items(TAG.ROIContourSequence)) {
		const number = item.number(TAG.ReferencedROINumber);
		let roi = rois.get(number);
		if (!roi) {
			roi = { number, name: `ROI ${number}`, color: [255, 255, 255], type: '', contours: [], visible: true };
			rois.set(number, roi);
		}
		const color = item.numbers(TAG.ROIDisplayColor);
		if (color.length === 3) roi.color = color;
		for (const c of item.items(TAG.ContourSequence)) {
			const type = c.string(TAG.ContourGeometricType);
			const points = c.numbers(TAG.ContourData);
			if (type !== 'CLOSED_PLANAR' || points.length < 9 || points.length % 3) continue;
			roi.contours.push({ points: Float64Array.from(points) });
		}
	}
	return { id, label: ds.string(TAG.StructureSetLabel), rois: [...rois.values()].sort((a, b) => a.number - b.number) };
}

/* An RT Dose grid in Gy, with its geometry, and a sampler at any point. */
export class DoseGrid {
	constructor(ds) {
		this.rows = ds.uint16(TAG.Rows);
		this.columns = ds.uint16(TAG.Columns);
		this.frames = ds.number(TAG.NumberOfFrames) || 1;
		this.position = ds.numbers(TAG.ImagePositionPatient);
		const o = ds.numbers(TAG.ImageOrientationPatient);
		this.rowDir = o.slice(0, 3);
		this.colDir = o.slice(3, 6);
		this.normal = cross(this.rowDir, this.colDir);
		const ps = ds.numbers(TAG.PixelSpacing);
		this.rowSpacing = ps[0];
		this.colSpacing = ps[1];
		let offsets = ds.numbers(TAG.GridFrameOffsetVector);
		if (offsets.length !== this.frames) throw new Error('the dose grid has no usable Grid Frame Offset Vector');
		// absolute offsets (the first equals the position along the normal) become relative
		if (offsets[0] !== 0) {
			const w0 = dot(this.position, this.normal);
			if (Math.abs(offsets[0] - w0) < 1e-3) offsets = offsets.map((x) => x - w0);
		}
		this.offsets = offsets;
		this.units = ds.string(TAG.DoseUnits) || '';
		const scaling = ds.number(TAG.DoseGridScaling) || 1;
		const bits = ds.uint16(TAG.BitsAllocated);
		const signed = ds.uint16(TAG.PixelRepresentation) === 1;
		const px = ds.bytes(TAG.PixelData);
		const n = this.rows * this.columns * this.frames;
		if (!px || px.byteLength < n * (bits / 8)) throw new Error('the dose grid has too few pixels');
		const view = new DataView(px.buffer, px.byteOffset, px.byteLength);
		const le = ds.littleEndian;
		this.dose = new Float32Array(n);
		let max = 0;
		for (let x = 0; x < n; x++) {
			let v;
			if (bits === 32) v = signed ? view.getInt32(4 * x, le) : view.getUint32(4 * x, le);
			else v = signed ? view.getInt16(2 * x, le) : view.getUint16(2 * x, le);
			const d = v * scaling;
			this.dose[x] = d;
			if (d > max) max = d;
		}
		this.max = max;
		this.uniform = this.frames < 2 || this.offsets.every((x, k) => Math.abs(x - k * (this.offsets[1] - this.offsets[0])) < 1e-3);
	}

	/* Dose (Gy) at a point, interpolated trilinearly; 0 outside the grid. */
	at(p) {
		const dx = p[0] - this.position[0];
		const dy = p[1] - this.position[1];
		const dz = p[2] - this.position[2];
		const u = (dx * this.rowDir[0] + dy * this.rowDir[1] + dz * this.rowDir[2]) / this.colSpacing;
		const v = (dx * this.colDir[0] + dy * this.colDir[1] + dz * this.colDir[2]) / this.rowSpacing;
		const w = dx * this.normal[0] + dy * this.normal[1] + dz * this.normal[2];
		let f;
		const F = this.frames;
		if (F === 1) {
			if (Math.abs(w - this.offsets[0]) > 0.5) return 0;
			f = 0;
		} else if (this.uniform) {
			f = (w - this.offsets[0]) / (this.offsets[1] - this.offsets[0]);
		} else {
			if (w < this.offsets[0] || w > this.offsets[F - 1]) return 0;
			let lo = 0;
			while (lo < F - 2 && this.offsets[lo + 1] <= w) lo++;
			f = lo + (w - this.offsets[lo]) / (this.offsets[lo + 1] - this.offsets[lo]);
		}
		if (u < 0 || v < 0 || f < 0 || u > this.columns - 1 || v > this.rows - 1 || f > F - 1) return 0;
		const u0 = Math.min(Math.floor(u), this.columns - 2 < 0 ? 0 : this.columns - 2);
		const v0 = Math.min(Math.floor(v), this.rows - 2 < 0 ? 0 : this.rows - 2);
		const f0 = Math.min(Math.floor(f), F - 2 < 0 ? 0 : F - 2);
		const a = u - u0;
		const b = v - v0;
		const c = f - f0;
		const C = this.columns;
		const R = this.rows;
		const g = (fi, vi, ui) => this.dose[(fi * R + vi) * C + ui] || 0;
		const u1 = Math.min(u0 + 1, C - 1);
		const v1 = Math.min(v0 + 1, R - 1);
		const f1 = Math.min(f0 + 1, F - 1);
		const plane = (fi) =>
			(g(fi, v0, u0) * (1 - a) + g(fi, v0, u1) * a) * (1 - b) + (g(fi, v1, u0) * (1 - a) + g(fi, v1, u1) * a) * b;
		return plane(f0) * (1 - c) + plane(f1) * c;
	}
}

export async function loadDose(id) {
	const grid = new DoseGrid(await objectDataSet(id));
	grid.id = id;
	return grid;
}

export async function loadPlan(id) {
	return api('plan', { id });
}

/*
 * Line segments of the iso-line at level over a w x h grid of values
 * (marching squares), as [x0, y0, x1, y1, ...] in grid coordinates.
 */
export function isoline(values, w, h, level) {
	const out = [];
	const at = (x, y) => values[y * w + x];
	const cut = (a, b) => (level - a) / (b - a);
	for (let y = 0; y < h - 1; y++) {
		for (let x = 0; x < w - 1; x++) {
			const a = at(x, y);
			const b = at(x + 1, y);
			const c = at(x + 1, y + 1);
			const d = at(x, y + 1);
			const code = (a >= level ? 8 : 0) | (b >= level ? 4 : 0) | (c >= level ? 2 : 0) | (d >= level ? 1 : 0);
			if (code === 0 || code === 15) continue;
			const top = [x + cut(a, b), y];
			const right = [x + 1, y + cut(b, c)];
			const bottom = [x + cut(d, c), y + 1];
			const left = [x, y + cut(a, d)];
			const seg = (p, q) => out.push(p[0], p[1], q[0], q[1]);
			switch (code) {
			case 1: case 14: seg(left, bottom); break;
			case 2: case 13: seg(bottom, right); break;
			case 3: case 12: seg(left, right); break;
			case 4: case 11: seg(top, right); break;
			case 6: case 9: seg(top, bottom); break;
			case 7: case 8: seg(left, top); break;
			case 5: seg(left, top); seg(bottom, right); break;
			case 10: seg(top, right); seg(left, bottom); break;
			default: break;
			}
		}
	}
	return out;
}

/*
 * Where a beam's source is, in patient coordinates: IEC 61217 gantry and
 * patient support angles, turned into the patient's coordinates by the
 * patient position (HFS, HFP, FFS, FFP).
 */
export function beamSource(beam, patientPosition) {
	const iso = (beam.isocenter || [0, 0, 0]).map(Number);
	const sad = Number(beam.sad) || 1000;
	const g = ((Number(beam.gantry) || 0) * Math.PI) / 180;
	const c = ((Number(beam.couch) || 0) * Math.PI) / 180;
	// source in the fixed system, then in the patient support's (rotated by the couch)
	const f = [sad * Math.sin(g), 0, sad * Math.cos(g)];
	const s = [f[0] * Math.cos(-c) - f[1] * Math.sin(-c), f[0] * Math.sin(-c) + f[1] * Math.cos(-c), f[2]];
	let p;
	switch (patientPosition) {
	case 'HFP': p = [-s[0], s[2], s[1]]; break;
	case 'FFS': p = [-s[0], -s[2], -s[1]]; break;
	case 'FFP': p = [s[0], s[2], -s[1]]; break;
	default: p = [s[0], -s[2], s[1]]; break; // HFS
	}
	return [iso[0] + p[0], iso[1] + p[1], iso[2] + p[2]];
}
