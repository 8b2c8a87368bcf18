// mdd web viewer: the three orthogonal views of a volume (axial, coronal,
// sagittal) on canvases, with structure contours in their ROI colours, the
// dose as a colour wash and isodose lines, and the plan's beams.

import { beamSource, isoline } from './rt.js';
import { dot } from './volume.js';

export const ISODOSE_LEVELS = [
	{ pct: 95, color: '#ff7f00' },
	{ pct: 80, color: '#e0e000' },
	{ pct: 50, color: '#00c8ff' },
	{ pct: 20, color: '#3a5cff' },
];
const BEAM_COLORS = ['#ff66cc', '#66ffcc', '#ffcc66', '#cc99ff', '#99ccff', '#ff9966', '#ccff66', '#66ccff'];
const WASH_ALPHA = 0.4;
const WASH_FROM = 0.1; // no wash below this fraction of the reference dose

/* The wash colour of a dose relative to the reference: blue (low) to red (high). */
export function washColor(rel) {
	const t = Math.max(0, Math.min(1, (rel - WASH_FROM) / (1 - WASH_FROM)));
	const hue = 240 * (1 - t); // degrees
	const x = 1 - Math.abs(((hue / 60) % 2) - 1);
	const [r, g, b] = hue < 60 ? [1, x, 0] : hue < 120 ? [x, 1, 0] : hue < 180 ? [0, 1, x] : [0, x, 1];
	return [Math.round(255 * r), Math.round(255 * g), Math.round(255 * b)];
}

const hexRgb = (h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));

class SliceView {
	constructor(viewer, canvas, orientation) {
		this.viewer = viewer;
		this.canvas = canvas;
		this.orientation = orientation;
		this.image = document.createElement('canvas');
		canvas.addEventListener('wheel', (e) => {
			e.preventDefault();
			this.viewer.step(this.orientation, e.deltaY > 0 ? -1 : 1);
		}, { passive: false });
		let drag = null;
		canvas.addEventListener('pointerdown', (e) => {
			drag = { x: e.clientX, y: e.clientY, moved: false, center: viewer.windowCenter, width: viewer.windowWidth };
			canvas.setPointerCapture(e.pointerId);
		});
		canvas.addEventListener('pointermove', (e) => {
			if (!drag) return;
			const dx = e.clientX - drag.x;
			const dy = e.clientY - drag.y;
			if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
			if (drag.moved) viewer.setWindow(drag.center + dy * 2, Math.max(1, drag.width + dx * 4));
		});
		canvas.addEventListener('pointerup', (e) => {
			if (drag && !drag.moved) {
				const rect = canvas.getBoundingClientRect();
				const p = this.canvasToWorld((e.clientX - rect.left) * (canvas.width / rect.width), (e.clientY - rect.top) * (canvas.height / rect.height));
				if (p) viewer.moveTo(p);
			}
			drag = null;
		});
	}

	get vol() {
		return this.viewer.volume;
	}

	/* Size of the view's image in voxels and mm per voxel; the flip of the slice axis. */
	dims() {
		const v = this.vol;
		const flip = v.normal[2] >= 0;
		switch (this.orientation) {
		case 'axial': return { W: v.columns, H: v.rows, du: v.colSpacing, dv: v.rowSpacing, flip };
		case 'coronal': return { W: v.columns, H: v.slices, du: v.colSpacing, dv: v.sliceSpacing, flip };
		default: return { W: v.rows, H: v.slices, du: v.rowSpacing, dv: v.sliceSpacing, flip };
		}
	}

	/* Voxel index (i, j, k) of the view image's pixel (u, v), fractional. */
	imageToIndex(u, v) {
		const { H, flip } = this.dims();
		const pos = this.viewer.cursor;
		const k = flip ? H - 1 - v : v;
		switch (this.orientation) {
		case 'axial': return [u, v, pos[2]];
		case 'coronal': return [u, pos[1], k];
		default: return [pos[0], u, k];
		}
	}

	/* View image pixel (u, v) of a voxel index, and the index along the view's normal. */
	indexToImage([i, j, k]) {
		const { H, flip } = this.dims();
		const kv = flip ? H - 1 - k : k;
		switch (this.orientation) {
		case 'axial': return [i, j, k];
		case 'coronal': return [i, kv, j];
		default: return [j, kv, i];
		}
	}

	layout() {
		const { W, H, du, dv } = this.dims();
		const cw = this.canvas.width;
		const ch = this.canvas.height;
		const s = Math.min(cw / (W * du), ch / (H * dv));
		return { s, ox: (cw - W * du * s) / 2, oy: (ch - H * dv * s) / 2, du, dv, W, H };
	}

	imageToCanvas(u, v, L = this.layout()) {
		return [L.ox + (u + 0.5) * L.du * L.s, L.oy + (v + 0.5) * L.dv * L.s];
	}

	/* Canvas position of a point in patient coordinates, and its distance (voxels) from the view's plane. */
	worldToCanvas(p) {
		const [u, v, depth] = this.indexToImage(this.vol.index(p));
		const here = this.orientation === 'axial' ? this.viewer.cursor[2] : this.orientation === 'coronal' ? this.viewer.cursor[1] : this.viewer.cursor[0];
		const [x, y] = this.imageToCanvas(u, v);
		return { x, y, off: depth - here };
	}

	canvasToWorld(x, y) {
		const L = this.layout();
		const u = (x - L.ox) / (L.du * L.s) - 0.5;
		const v = (y - L.oy) / (L.dv * L.s) - 0.5;
		if (u < -0.5 || v < -0.5 || u > L.W - 0.5 || v > L.H - 0.5) return null;
		const [i, j, k] = this.imageToIndex(u, v);
		return this.vol.world(i, j, k);
	}

	/* Dose (Gy) at each pixel of the view image. */
	dosePlane(W, H) {
		const dose = this.viewer.dose;
		const out = new Float32Array(W * H);
		if (!dose) return out;
		const v = this.vol;
		// the plane is flat: world = a + u * e1 + v * e2 for the view's image
		const p00 = v.world(...this.imageToIndex(0, 0));
		const p10 = W > 1 ? v.world(...this.imageToIndex(1, 0)) : p00;
		const p01 = H > 1 ? v.world(...this.imageToIndex(0, 1)) : p00;
		const e1 = [0, 1, 2].map((a) => p10[a] - p00[a]);
		const e2 = [0, 1, 2].map((a) => p01[a] - p00[a]);
		const axial = this.orientation === 'axial';
		const p = [0, 0, 0];
		for (let y = 0; y < H; y++) {
			// non-uniform slice spacing: along the slice axis, ask the volume
			const row = axial ? null : v.world(...this.imageToIndex(0, y));
			for (let x = 0; x < W; x++) {
				for (let a = 0; a < 3; a++) p[a] = axial ? p00[a] + x * e1[a] + y * e2[a] : row[a] + x * e1[a];
				out[y * W + x] = dose.at(p);
			}
		}
		return out;
	}

	render() {
		const vol = this.vol;
		const ctx = this.canvas.getContext('2d');
		ctx.fillStyle = '#000';
		ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
		if (!vol || !vol.slices) return;
		const viewer = this.viewer;
		const L = this.layout();
		const { W, H } = L;
		const img = new ImageData(W, H);
		const lo = viewer.windowCenter - viewer.windowWidth / 2;
		const scale = 255 / viewer.windowWidth;
		// voxel of image pixel (u, v): base + u * su + v * sv in the volume's data
		const C = vol.columns;
		const RC = vol.rows * C;
		const c = viewer.cursor.map(Math.round);
		const { flip } = this.dims();
		let base;
		let su;
		let sv;
		if (this.orientation === 'axial') [base, su, sv] = [c[2] * RC, 1, C];
		else if (this.orientation === 'coronal') [base, su, sv] = [c[1] * C, 1, RC];
		else [base, su, sv] = [c[0], C, RC];
		if (this.orientation !== 'axial' && flip) {
			base += (H - 1) * RC;
			sv = -RC;
		}
		for (let y = 0; y < H; y++) {
			const k = this.orientation === 'axial' ? c[2] : flip ? H - 1 - y : y;
			const loaded = vol.loaded[k] === 1;
			for (let x = 0; x < W; x++) {
				let g = 0;
				if (loaded) {
					g = (vol.data[base + x * su + y * sv] - lo) * scale;
					g = g < 0 ? 0 : g > 255 ? 255 : g;
				}
				const o = 4 * (y * W + x);
				img.data[o] = img.data[o + 1] = img.data[o + 2] = g;
				img.data[o + 3] = 255;
			}
		}
		const reference = viewer.referenceDose();
		let plane = null;
		if (viewer.dose && reference > 0 && (viewer.show.dose || viewer.show.isodose)) plane = this.dosePlane(W, H);
		if (plane && viewer.show.dose) {
			for (let x = 0; x < W * H; x++) {
				const rel = plane[x] / reference;
				if (rel < WASH_FROM) continue;
				const [r, g, b] = washColor(rel);
				const o = 4 * x;
				img.data[o] = img.data[o] * (1 - WASH_ALPHA) + r * WASH_ALPHA;
				img.data[o + 1] = img.data[o + 1] * (1 - WASH_ALPHA) + g * WASH_ALPHA;
				img.data[o + 2] = img.data[o + 2] * (1 - WASH_ALPHA) + b * WASH_ALPHA;
			}
		}
		this.image.width = W;
		this.image.height = H;
		this.image.getContext('2d').putImageData(img, 0, 0);
		ctx.imageSmoothingEnabled = true;
		ctx.drawImage(this.image, L.ox, L.oy, W * L.du * L.s, H * L.dv * L.s);

		ctx.save();
		ctx.beginPath();
		ctx.rect(L.ox, L.oy, W * L.du * L.s, H * L.dv * L.s);
		ctx.clip();
		if (plane && viewer.show.isodose) this.drawIsodoses(ctx, plane, reference, L);
		if (viewer.structures && viewer.show.structures) this.drawStructures(ctx, L);
		if (viewer.plan && viewer.show.beams) this.drawBeams(ctx, L);
		if (viewer.show.crosshair) this.drawCrosshair(ctx, L);
		ctx.restore();
		this.drawLabels(ctx);
	}

	drawIsodoses(ctx, plane, reference, L) {
		ctx.lineWidth = 1.5;
		for (const level of this.viewer.isodoseLevels()) {
			const segs = isoline(plane, L.W, L.H, (level.pct / 100) * reference);
			if (!segs.length) continue;
			ctx.strokeStyle = level.color;
			ctx.beginPath();
			for (let s = 0; s < segs.length; s += 4) {
				const [x0, y0] = this.imageToCanvas(segs[s], segs[s + 1], L);
				const [x1, y1] = this.imageToCanvas(segs[s + 2], segs[s + 3], L);
				ctx.moveTo(x0, y0);
				ctx.lineTo(x1, y1);
			}
			ctx.stroke();
		}
	}

	drawStructures(ctx, L) {
		const viewer = this.viewer;
		ctx.lineWidth = 2;
		for (const roi of viewer.structures.rois) {
			if (!roi.visible) continue;
			ctx.strokeStyle = `rgb(${roi.color.join(',')})`;
			ctx.beginPath();
			if (this.orientation === 'axial') {
				const k = Math.round(viewer.cursor[2]);
				for (const c of roi.bySlice.get(k) || []) {
					const pts = c.index;
					for (let n = 0; n < pts.length; n += 2) {
						const [x, y] = this.imageToCanvas(pts[n], pts[n + 1], L);
						if (n === 0) ctx.moveTo(x, y);
						else ctx.lineTo(x, y);
					}
					ctx.closePath();
				}
			} else {
				// the ROI's cross-section of this plane, slice by slice, outlined
				const coronal = this.orientation === 'coronal';
				const fixed = coronal ? viewer.cursor[1] : viewer.cursor[0];
				const { W, H } = L;
				const mask = new Uint8Array(W * H);
				for (const [k, contours] of roi.bySlice) {
					const crossings = [];
					for (const c of contours) {
						const pts = c.index;
						const n = pts.length / 2;
						for (let a = 0; a < n; a++) {
							const b = (a + 1) % n;
							// coronal: crossings of the row j = fixed, at column i; sagittal: of column i = fixed, at row j
							const pa = coronal ? pts[2 * a + 1] : pts[2 * a];
							const pb = coronal ? pts[2 * b + 1] : pts[2 * b];
							const qa = coronal ? pts[2 * a] : pts[2 * a + 1];
							const qb = coronal ? pts[2 * b] : pts[2 * b + 1];
							if ((pa <= fixed && pb > fixed) || (pb <= fixed && pa > fixed)) crossings.push(qa + ((fixed - pa) * (qb - qa)) / (pb - pa));
						}
					}
					crossings.sort((x, y) => x - y);
					const [, v] = this.indexToImage([0, 0, k]);
					for (let c = 0; c + 1 < crossings.length; c += 2) {
						for (let u = Math.max(0, Math.ceil(crossings[c])); u <= Math.min(W - 1, Math.floor(crossings[c + 1])); u++) mask[v * W + u] = 1;
					}
				}
				const inside = (u, v) => u >= 0 && v >= 0 && u < W && v < H && mask[v * W + u] === 1;
				const hx = (L.du * L.s) / 2;
				const hy = (L.dv * L.s) / 2;
				for (let v = 0; v < H; v++) {
					for (let u = 0; u < W; u++) {
						if (!mask[v * W + u]) continue;
						const [x, y] = this.imageToCanvas(u, v, L);
						if (!inside(u - 1, v)) { ctx.moveTo(x - hx, y - hy); ctx.lineTo(x - hx, y + hy); }
						if (!inside(u + 1, v)) { ctx.moveTo(x + hx, y - hy); ctx.lineTo(x + hx, y + hy); }
						if (!inside(u, v - 1)) { ctx.moveTo(x - hx, y - hy); ctx.lineTo(x + hx, y - hy); }
						if (!inside(u, v + 1)) { ctx.moveTo(x - hx, y + hy); ctx.lineTo(x + hx, y + hy); }
					}
				}
			}
			ctx.stroke();
		}
	}

	drawBeams(ctx, L) {
		const plan = this.viewer.plan;
		ctx.lineWidth = 2;
		ctx.font = '12px sans-serif';
		const lines = [];
		plan.beams.forEach((beam, n) => {
			if (!beam.isocenter) return;
			const src = beamSource(beam, plan.patient_position || this.vol.info.patient_position);
			const a = this.worldToCanvas(src);
			const b = this.worldToCanvas(beam.isocenter.map(Number));
			const len = Math.hypot(b.x - a.x, b.y - a.y);
			lines.push({ beam, a, b, len, ux: (b.x - a.x) / len, uy: (b.y - a.y) / len, color: BEAM_COLORS[n % BEAM_COLORS.length] });
		});
		// dashed for 15 cm past the isocentre, under every beam's way in
		ctx.setLineDash([8, 5]);
		for (const l of lines) {
			if (l.len < 1) continue;
			ctx.strokeStyle = l.color;
			ctx.beginPath();
			ctx.moveTo(l.b.x, l.b.y);
			ctx.lineTo(l.b.x + l.ux * 150 * L.s, l.b.y + l.uy * 150 * L.s);
			ctx.stroke();
		}
		ctx.setLineDash([]);
		// solid from the source to the isocentre, labelled where it enters the view
		for (const l of lines) {
			ctx.strokeStyle = l.color;
			ctx.fillStyle = l.color;
			ctx.beginPath();
			if (l.len < 1) {
				// along the view's normal: a ring at the isocentre
				ctx.arc(l.b.x, l.b.y, 6, 0, 2 * Math.PI);
				ctx.stroke();
				continue;
			}
			ctx.moveTo(l.a.x, l.a.y);
			ctx.lineTo(l.b.x, l.b.y);
			ctx.stroke();
			const t = this.entry(l.a, l.ux, l.uy, L);
			ctx.fillText(l.beam.name || `${l.beam.number}`, t.x, t.y);
		}
		if (lines.length) {
			const b = lines[0].b;
			ctx.strokeStyle = '#ffffff';
			ctx.beginPath();
			ctx.moveTo(b.x - 6, b.y);
			ctx.lineTo(b.x + 6, b.y);
			ctx.moveTo(b.x, b.y - 6);
			ctx.lineTo(b.x, b.y + 6);
			ctx.stroke();
		}
	}

	/* A point just inside the view's image on the line from a along (ux, uy). */
	entry(a, ux, uy, L) {
		const x0 = L.ox + 4;
		const y0 = L.oy + 14;
		const x1 = L.ox + L.W * L.du * L.s - 40;
		const y1 = L.oy + L.H * L.dv * L.s - 4;
		let t = 0;
		for (const [p, d, lo, hi] of [[a.x, ux, x0, x1], [a.y, uy, y0, y1]]) {
			if (p < lo && d > 0) t = Math.max(t, (lo - p) / d);
			if (p > hi && d < 0) t = Math.max(t, (hi - p) / d);
		}
		return { x: Math.min(Math.max(a.x + ux * t, x0), x1), y: Math.min(Math.max(a.y + uy * t, y0), y1) };
	}

	drawCrosshair(ctx, L) {
		const c = this.viewer.cursor;
		const [u, v] = this.indexToImage(c);
		const [x, y] = this.imageToCanvas(u, v, L);
		ctx.strokeStyle = 'rgba(0, 255, 255, 0.35)';
		ctx.lineWidth = 1;
		ctx.beginPath();
		ctx.moveTo(x, L.oy);
		ctx.lineTo(x, L.oy + L.H * L.dv * L.s);
		ctx.moveTo(L.ox, y);
		ctx.lineTo(L.ox + L.W * L.du * L.s, y);
		ctx.stroke();
	}

	drawLabels(ctx) {
		const v = this.vol;
		const c = this.viewer.cursor;
		const p = v.world(c[0], c[1], c[2]);
		const axis = { axial: 2, coronal: 1, sagittal: 0 }[this.orientation];
		const name = ['x', 'y', 'z'][axis];
		ctx.fillStyle = '#ddd';
		ctx.font = '12px sans-serif';
		ctx.fillText(`${this.orientation}  ${name} = ${p[axis].toFixed(1)} mm`, 6, 14);
		ctx.fillText(`W ${Math.round(this.viewer.windowWidth)} L ${Math.round(this.viewer.windowCenter)}`, 6, this.canvas.height - 6);
	}
}

/* The three views and what they show. */
export class Viewer {
	constructor(canvases) {
		this.views = {};
		for (const [name, canvas] of Object.entries(canvases)) this.views[name] = new SliceView(this, canvas, name);
		this.volume = null;
		this.structures = null;
		this.dose = null;
		this.plan = null;
		this.cursor = [0, 0, 0];
		this.windowCenter = 40;
		this.windowWidth = 400;
		this.show = { structures: true, dose: true, isodose: true, beams: true, crosshair: true };
		this.reference = { mode: 'prescription', gy: null };
		this.pending = false;
		this.listeners = [];
	}

	onChange(fn) {
		this.listeners.push(fn);
	}

	setVolume(volume) {
		this.volume = volume;
		this.structures = null;
		this.dose = null;
		this.plan = null;
		this.windowCenter = volume.windowCenter;
		this.windowWidth = volume.windowWidth;
		this.cursor = [(volume.columns - 1) / 2, (volume.rows - 1) / 2, Math.floor(volume.slices / 2)].map(Math.round);
		this.moved = false;
		this.redraw();
	}

	/* Contours grouped by the slice they lie on, in voxel index space. */
	setStructures(structures) {
		const vol = this.volume;
		for (const roi of structures.rois) {
			roi.bySlice = new Map();
			for (const c of roi.contours) {
				const n = c.points.length / 3;
				const p0 = [c.points[0], c.points[1], c.points[2]];
				const k = Math.round(vol.index(p0)[2]);
				if (k < 0 || k >= vol.slices || Math.abs(dot(p0, vol.normal) - vol.w[k]) > vol.sliceSpacing / 2 + 0.01) continue;
				const index = new Float64Array(2 * n);
				for (let m = 0; m < n; m++) {
					const [i, j] = vol.index([c.points[3 * m], c.points[3 * m + 1], c.points[3 * m + 2]]);
					index[2 * m] = i;
					index[2 * m + 1] = j;
				}
				c.index = index;
				if (!roi.bySlice.has(k)) roi.bySlice.set(k, []);
				roi.bySlice.get(k).push(c);
			}
		}
		this.structures = structures;
		this.redraw();
	}

	setDose(dose) {
		this.dose = dose;
		this.redraw();
	}

	setPlan(plan) {
		this.plan = plan;
		// the views start at the isocentre, unless the user has moved them
		const iso = plan.beams.length && plan.beams[0].isocenter;
		if (iso && !this.moved) this.moveTo(iso.map(Number), false);
		this.redraw();
	}

	/* The dose the percentages refer to: the plan's prescription, else the maximum. */
	referenceDose() {
		if (this.reference.gy > 0) return this.reference.gy;
		if (this.reference.mode === 'prescription' && this.plan && this.plan.prescription_gy > 0) return Number(this.plan.prescription_gy);
		return this.dose ? this.dose.max : 0;
	}

	isodoseLevels() {
		return ISODOSE_LEVELS;
	}

	setWindow(center, width) {
		this.windowCenter = center;
		this.windowWidth = width;
		this.redraw();
	}

	step(orientation, delta) {
		const v = this.volume;
		if (!v) return;
		const axis = { axial: 2, coronal: 1, sagittal: 0 }[orientation];
		const max = [v.columns, v.rows, v.slices][axis] - 1;
		let d = delta;
		// up means superior (axial), anterior (coronal) and left (sagittal)
		if (axis === 1) d = -d;
		this.cursor[axis] = Math.max(0, Math.min(max, this.cursor[axis] + d));
		this.moved = true;
		this.redraw();
	}

	/* Put the three views through a point (patient coordinates). */
	moveTo(p, byUser = true) {
		const v = this.volume;
		if (byUser) this.moved = true;
		const idx = v.index(p);
		const max = [v.columns - 1, v.rows - 1, v.slices - 1];
		this.cursor = idx.map((x, a) => Math.max(0, Math.min(max[a], Math.round(x))));
		this.redraw();
	}

	redraw() {
		if (this.pending) return;
		this.pending = true;
		requestAnimationFrame(() => {
			this.pending = false;
			this.renderNow();
		});
	}

	renderNow() {
		for (const view of Object.values(this.views)) view.render();
		for (const fn of this.listeners) fn(this);
	}
}

export { hexRgb };
