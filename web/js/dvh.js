// mdd web viewer: the cumulative DVH of each ROI (from /api/dvh, that is
// mdd.dvh) as curves on a canvas, in the ROIs' display colours.

const rgb = (c) => `rgb(${(c || [255, 255, 255]).join(',')})`;

/* Draw the visible ROIs' curves: dose (Gy) across, volume (%) up. */
export function drawDvh(canvas, dvh, visible, reference) {
	const ctx = canvas.getContext('2d');
	const W = canvas.width;
	const H = canvas.height;
	const m = { left: 56, right: 16, top: 16, bottom: 44 };
	ctx.fillStyle = '#111';
	ctx.fillRect(0, 0, W, H);
	const rois = dvh.rois.filter((r) => visible.has(r.roi_number) && r.dose_gy && r.dose_gy.length);
	let maxDose = 1;
	for (const r of dvh.rois) if (r.max_gy > maxDose) maxDose = r.max_gy;
	maxDose = Math.ceil((maxDose * 1.05) / 5) * 5;
	const x = (d) => m.left + (d / maxDose) * (W - m.left - m.right);
	const y = (v) => H - m.bottom - (v / 100) * (H - m.top - m.bottom);
	// grid and axes
	ctx.strokeStyle = '#333';
	ctx.fillStyle = '#aaa';
	ctx.font = '12px sans-serif';
	ctx.lineWidth = 1;
	const step = maxDose > 40 ? 10 : maxDose > 10 ? 5 : 1;
	ctx.beginPath();
	for (let d = 0; d <= maxDose + 1e-9; d += step) {
		ctx.moveTo(x(d), y(0));
		ctx.lineTo(x(d), y(100));
		ctx.fillText(`${d}`, x(d) - 6, H - m.bottom + 16);
	}
	for (let v = 0; v <= 100; v += 20) {
		ctx.moveTo(x(0), y(v));
		ctx.lineTo(x(maxDose), y(v));
		ctx.fillText(`${v}`, m.left - 28, y(v) + 4);
	}
	ctx.stroke();
	ctx.fillText('dose (Gy)', W / 2 - 24, H - 8);
	ctx.save();
	ctx.translate(14, H / 2 + 30);
	ctx.rotate(-Math.PI / 2);
	ctx.fillText('volume (%)', 0, 0);
	ctx.restore();
	if (reference > 0) {
		ctx.strokeStyle = '#888';
		ctx.setLineDash([4, 4]);
		ctx.beginPath();
		ctx.moveTo(x(reference), y(0));
		ctx.lineTo(x(reference), y(100));
		ctx.stroke();
		ctx.setLineDash([]);
	}
	ctx.lineWidth = 2;
	for (const r of rois) {
		ctx.strokeStyle = rgb(r.color);
		ctx.beginPath();
		r.dose_gy.forEach((d, n) => {
			if (n === 0) ctx.moveTo(x(d), y(r.volume_pct[n]));
			else ctx.lineTo(x(d), y(r.volume_pct[n]));
		});
		ctx.stroke();
	}
}

export { rgb };
