// mdd web viewer: the page.  Patient search and study tree, the image
// views with structures, dose and beams, the plan's beams table, the DVH,
// documents, and the data management panel (jobs with live progress,
// rules, storages with usage; archive and restore for operators).

import { api, ApiError, base64Bytes, hasCredentials, setUnauthorizedHandler, signIn, signOut } from './api.js';
import { drawDvh, rgb } from './dvh.js';
import { loadDose, loadPlan, loadStructures } from './rt.js';
import { ISODOSE_LEVELS, Viewer } from './viewer.js';
import { loadVolume } from './volume.js';

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
	const e = document.createElement(tag);
	for (const [k, v] of Object.entries(attrs)) {
		if (k === 'class') e.className = v;
		else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
		else if (k === 'dataset') Object.assign(e.dataset, v);
		else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? '' : v);
	}
	for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
	return e;
};
const bytesText = (n) => {
	n = Number(n) || 0;
	const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
	let u = 0;
	while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
	return `${n.toFixed(u ? 1 : 0)} ${units[u]}`;
};
const fmt = (v, d = 1) => (v === null || v === undefined || v === '' ? '' : Number(v).toFixed(d));
const dicomName = (n) => (n || '').replace(/\^+/g, ' ').trim();

const WINDOWS = [
	{ name: 'Soft tissue', center: 40, width: 400 },
	{ name: 'Lung', center: -600, width: 1500 },
	{ name: 'Bone', center: 400, width: 1800 },
	{ name: 'Brain', center: 40, width: 80 },
];

const state = {
	me: null,
	patients: { q: '', offset: 0, limit: 25, total: 0 },
	patient: null,
	seriesUid: null,
	loading: null,
	storages: [],
	dvh: null,
	dvhVisible: new Set(),
	watchedJobs: new Set(),
	status: { slices: 0, total: 0, structures: false, dose: false, plan: false, error: null },
};

const viewer = new Viewer({ axial: $('#axial'), coronal: $('#coronal'), sagittal: $('#sagittal') });
window.mddViewer = viewer;
window.mddStatus = () => ({ ...state.status, series: state.seriesUid, patient: state.patient && state.patient.patient_id });

function message(text, kind = 'info') {
	const m = $('#message');
	m.textContent = text;
	m.className = kind;
}

function failed(e) {
	console.error(e);
	message(e instanceof ApiError ? `${e.message}${e.sqlstate ? ` (${e.sqlstate})` : ''}` : String(e.message || e), 'error');
}

// --------------------------------------------------------------------------
// signing in

setUnauthorizedHandler(() => showLogin(true));

function showLogin(show) {
	$('#login').hidden = !show;
	if (show) $('#login-user').focus();
}

$('#login').addEventListener('submit', async (e) => {
	e.preventDefault();
	signIn($('#login-user').value, $('#login-password').value);
	sessionStorage.removeItem('mdd.signed-out');
	$('#login-password').value = '';
	showLogin(false);
	await start();
});
$('#signout').addEventListener('click', () => {
	signOut();
	sessionStorage.setItem('mdd.signed-out', '1');
	location.reload();
});

async function start() {
	// the browser's credentials for the page serve its calls too, until
	// the user signs out; then the page's own form asks for a role
	if (!hasCredentials() && sessionStorage.getItem('mdd.signed-out')) {
		showLogin(true);
		return;
	}
	try {
		state.me = await api('whoami');
	} catch (e) {
		if (e.status === 401) return;
		failed(e);
		return;
	}
	$('#user').textContent = `${state.me.user}${state.me.operator ? ' (operator)' : ''}`;
	document.body.classList.toggle('operator', !!state.me.operator);
	await Promise.all([searchPatients(), refreshStorages()]);
	pollJobs();
}

// --------------------------------------------------------------------------
// patients and the study tree

async function searchPatients() {
	try {
		const r = await api('patients', { q: state.patients.q, limit: state.patients.limit, offset: state.patients.offset });
		state.patients.total = r.total;
		const list = $('#patients');
		list.replaceChildren(...r.patients.map((p) => el('li', {
			class: state.patient && state.patient.patient_id === p.patient_id ? 'selected' : '',
			dataset: { patientId: p.patient_id },
			onclick: () => openPatient(p.patient_id),
		}, el('b', {}, dicomName(p.patient_name) || '(no name)'), ' ', el('span', { class: 'muted' }, p.patient_id),
		el('div', { class: 'muted small' }, `${p.studies} studies · ${(p.modalities || []).join(' ')} · ${p.last_study_date || ''}`))));
		const last = Math.min(r.total, state.patients.offset + r.patients.length);
		$('#patients-page').textContent = r.total ? `${state.patients.offset + 1}–${last} of ${r.total}` : 'no patient found';
		$('#patients-prev').disabled = state.patients.offset === 0;
		$('#patients-next').disabled = last >= r.total;
	} catch (e) {
		failed(e);
	}
}

let searchTimer = null;
$('#search').addEventListener('input', (e) => {
	clearTimeout(searchTimer);
	searchTimer = setTimeout(() => {
		state.patients.q = e.target.value;
		state.patients.offset = 0;
		searchPatients();
	}, 250);
});
$('#patients-prev').addEventListener('click', () => {
	state.patients.offset = Math.max(0, state.patients.offset - state.patients.limit);
	searchPatients();
});
$('#patients-next').addEventListener('click', () => {
	state.patients.offset += state.patients.limit;
	searchPatients();
});

const IMAGE_MODALITIES = new Set(['CT', 'MR', 'PT', 'NM', 'US', 'CR', 'DX', 'MG', 'OT', 'XA', 'RF']);
const isImageSeries = (s) => IMAGE_MODALITIES.has(s.modality) && !(s.object_list && s.object_list.some((o) => /481/.test(o.sop_class_uid || '')));

async function openPatient(patientId) {
	try {
		state.patient = await api('patient', { patient_id: patientId });
		for (const li of document.querySelectorAll('#patients li')) li.classList.toggle('selected', li.dataset.patientId === patientId);
		renderTree();
	} catch (e) {
		failed(e);
	}
}

function allSeries() {
	return state.patient ? state.patient.studies.flatMap((st) => st.series) : [];
}

function renderTree() {
	const p = state.patient;
	const tree = $('#tree');
	if (!p) {
		tree.replaceChildren();
		return;
	}
	const docRow = (d) => el('li', { class: 'doc' },
		el('span', { class: 'badge' }, 'DOC'), ' ', d.description || d.filename || `document ${d.id}`, ' ',
		el('span', { class: `tier ${d.tier}` }, d.tier), ' ',
		el('button', { class: 'small', dataset: { action: 'open-document', id: d.id }, onclick: () => openDocument(d) }, 'Open'));
	const archiveTargets = state.storages.filter((s) => s.tier === 'archive' && !s.read_only);
	tree.replaceChildren(
		el('h3', {}, dicomName(p.patient_name), ' ', el('span', { class: 'muted' }, p.patient_id)),
		el('div', { class: 'muted small' }, `born ${p.birth_date || '?'} · ${p.sex || ''} · ${p.objects} objects`),
		el('div', { class: 'operator-only archive-to' }, 'archive to ',
			el('select', { id: 'archive-storage' }, archiveTargets.map((s) => el('option', { value: s.name }, s.name))),
			archiveTargets.length ? null : el('span', { class: 'muted small' }, ' (no archive-tier storage)')),
		...p.studies.map((st) => el('div', { class: 'study' },
			el('div', { class: 'study-head' }, el('b', {}, st.study_date || ''), ' ', st.study_description || st.study_instance_uid),
			el('ul', {}, ...st.series.map((s) => el('li', {
				class: `series${s.series_instance_uid === state.seriesUid ? ' selected' : ''}`,
				dataset: { seriesUid: s.series_instance_uid, modality: s.modality },
			},
			el('span', { class: 'badge' }, s.modality || '?'), ' ',
			el('a', { href: '#', onclick: (e) => { e.preventDefault(); openSeries(s); } }, s.series_description || `series ${s.series_number || ''}`),
			' ', el('span', { class: 'muted small' }, `${s.objects} · ${bytesText(s.bytes)}`), ' ',
			...s.tiers.map((t) => el('span', { class: `tier ${t}` }, t)),
			s.related_series.length ? el('div', { class: 'muted small' }, `with ${s.related_series.length} related series`) : null,
			el('div', { class: 'operator-only actions' },
				el('button', { class: 'small', dataset: { action: 'archive', seriesUid: s.series_instance_uid }, onclick: () => moveSeries('archive', s) }, 'Archive'),
				el('button', { class: 'small', dataset: { action: 'restore', seriesUid: s.series_instance_uid }, onclick: () => moveSeries('restore', s) }, 'Restore'))))),
			st.documents.map(docRow))),
		p.documents.length ? el('div', { class: 'study' }, el('div', { class: 'study-head' }, 'Documents'), el('ul', {}, p.documents.map(docRow))) : null,
	);
}

/* An image series opens in the views; an RT series opens the images it was made on. */
async function openSeries(s) {
	if (isImageSeries(s)) return viewSeries(s.series_instance_uid, null);
	const base = allSeries().find((x) => isImageSeries(x) && x.related_series.includes(s.series_instance_uid));
	if (!base) {
		message(`no image series of this patient goes with ${s.modality} series ${s.series_description || ''}`, 'error');
		return;
	}
	const first = s.object_list && s.object_list[0];
	return viewSeries(base.series_instance_uid, first ? { modality: s.modality, id: first.id } : null);
}

async function viewSeries(uid, prefer) {
	if (state.loading) state.loading.abort();
	const controller = new AbortController();
	state.loading = controller;
	state.seriesUid = uid;
	state.status = { slices: 0, total: 0, structures: false, dose: false, plan: false, error: null };
	state.dvh = null;
	renderTree();
	showTab('images');
	message('loading the images …');
	try {
		let first = true;
		const vol = await loadVolume(uid, (v) => {
			if (controller.signal.aborted) return;
			if (first) {
				viewer.setVolume(v);
				first = false;
			}
			state.status.total = v.slices;
			state.status.slices = v.loaded.reduce((a, b) => a + b, 0);
			$('#progress').textContent = `${state.status.slices}/${v.slices} slices`;
			viewer.redraw();
		}, controller.signal);
		if (controller.signal.aborted) return;
		if (first) viewer.setVolume(vol);
		message(`${vol.info.modality} ${vol.info.series_description || ''}: ${vol.slices} slices`);
		await loadRt(vol.info.rt, prefer, controller.signal);
	} catch (e) {
		state.status.error = String(e.message || e);
		failed(e);
	}
}

/* The structure set, plan and dose that go with the images (the ones asked for first). */
async function loadRt(rt, prefer, signal) {
	const pick = (list, modality) => (prefer && prefer.modality === modality && list.find((x) => x.id === prefer.id)) || list[0];
	const ss = pick(rt.structure_sets, 'RTSTRUCT');
	const plan = pick(rt.plans, 'RTPLAN');
	const dose = pick(rt.doses, 'RTDOSE');
	const jobs = [];
	if (ss) jobs.push(loadStructures(ss.id).then((s) => {
		if (signal.aborted) return;
		viewer.setStructures(s);
		state.status.structures = true;
		renderStructures();
	}));
	if (plan) jobs.push(loadPlan(plan.id).then((p) => {
		if (signal.aborted) return;
		viewer.setPlan(p);
		state.status.plan = true;
		renderBeams();
		renderDoseControls();
	}));
	if (dose) jobs.push(loadDose(dose.id).then((d) => {
		if (signal.aborted) return;
		viewer.setDose(d);
		state.status.dose = true;
		renderDoseControls();
	}));
	renderStructures();
	renderBeams();
	renderDoseControls();
	const results = await Promise.allSettled(jobs);
	const bad = results.find((r) => r.status === 'rejected');
	if (bad) failed(bad.reason);
	state.dvhFor = ss && dose ? { dose_id: dose.id, structure_set_id: ss.id } : null;
	if ($('#tab-dvh').classList.contains('active')) showDvh();
}

// --------------------------------------------------------------------------
// the views' controls

for (const w of WINDOWS) {
	$('#windows').append(el('button', { class: 'small', dataset: { window: w.name }, onclick: () => viewer.setWindow(w.center, w.width) }, w.name));
}
$('#windows').append(el('button', { class: 'small', onclick: () => viewer.volume && viewer.setWindow(viewer.volume.windowCenter, viewer.volume.windowWidth) }, 'Series'));
for (const box of document.querySelectorAll('#layers input[type=checkbox]')) {
	box.addEventListener('change', () => {
		viewer.show[box.name] = box.checked;
		viewer.redraw();
	});
}

function renderStructures() {
	const list = $('#structures');
	const s = viewer.structures;
	if (!s) {
		list.replaceChildren(el('li', { class: 'muted' }, 'no structure set'));
		return;
	}
	list.replaceChildren(...s.rois.map((roi) => el('li', {},
		el('label', {}, el('input', { type: 'checkbox', checked: roi.visible, dataset: { roi: roi.number },
			onchange: (e) => { roi.visible = e.target.checked; viewer.redraw(); } }),
		el('span', { class: 'swatch', style: `background:${rgb(roi.color)}` }), ' ', roi.name,
		' ', el('span', { class: 'muted small' }, roi.type)))));
}

function renderDoseControls() {
	const box = $('#dose-info');
	const d = viewer.dose;
	const p = viewer.plan;
	if (!d) {
		box.replaceChildren(el('span', { class: 'muted' }, 'no dose'));
		return;
	}
	const ref = viewer.referenceDose();
	box.replaceChildren(
		el('div', {}, `max ${fmt(d.max, 2)} Gy`, p && p.prescription_gy ? ` · prescription ${fmt(p.prescription_gy, 1)} Gy` : ''),
		el('div', {}, 'levels relative to ',
			el('select', { id: 'reference', onchange: (e) => { viewer.reference.mode = e.target.value; renderDoseControls(); viewer.redraw(); } },
				el('option', { value: 'prescription', selected: viewer.reference.mode === 'prescription' }, 'the prescription'),
				el('option', { value: 'max', selected: viewer.reference.mode === 'max' }, 'the maximum dose'))),
		el('ul', { class: 'legend' }, ISODOSE_LEVELS.map((l) => el('li', {},
			el('span', { class: 'swatch', style: `background:${l.color}` }), ` ${l.pct}% = ${fmt((l.pct / 100) * ref, 1)} Gy`))));
}

function renderBeams() {
	const body = $('#beams tbody');
	const p = viewer.plan;
	$('#plan-title').textContent = p ? `${p.label || ''} ${p.name ? `(${p.name})` : ''}${p.fractions ? ` · ${p.fractions} fractions` : ''}` : 'no plan';
	body.replaceChildren(...(p ? p.beams : []).map((b) => el('tr', {},
		el('td', {}, b.name || b.number), el('td', {}, b.radiation || ''), el('td', {}, b.energy === null || b.energy === undefined ? '' : `${b.energy}`),
		el('td', {}, b.gantry_end !== null && b.gantry_end !== undefined && Number(b.gantry_end) !== Number(b.gantry) ? `${fmt(b.gantry)}→${fmt(b.gantry_end)}` : fmt(b.gantry)),
		el('td', {}, fmt(b.collimator)), el('td', {}, fmt(b.couch)), el('td', {}, fmt(b.mu, 1)))));
}

// --------------------------------------------------------------------------
// tabs, the DVH, documents

function showTab(name) {
	for (const t of document.querySelectorAll('.tab')) t.classList.toggle('active', t.id === `tab-${name}`);
	for (const b of document.querySelectorAll('nav.tabs button')) b.classList.toggle('active', b.dataset.tab === name);
	if (name === 'dvh') showDvh();
	if (name === 'data') { pollJobs(); refreshStorages(); refreshRules(); }
}
for (const b of document.querySelectorAll('nav.tabs button')) b.addEventListener('click', () => showTab(b.dataset.tab));

async function showDvh() {
	const box = $('#dvh-rois');
	if (!state.dvhFor) {
		box.replaceChildren(el('p', { class: 'muted' }, 'open an image series with a structure set and a dose'));
		drawDvh($('#dvh'), { rois: [] }, new Set(), 0);
		return;
	}
	try {
		if (!state.dvh || state.dvh.dose_id !== state.dvhFor.dose_id) {
			box.replaceChildren(el('p', { class: 'muted' }, 'computing …'));
			state.dvh = await api('dvh', state.dvhFor);
			state.dvhVisible = new Set(state.dvh.rois.map((r) => r.roi_number));
		}
		const redraw = () => drawDvh($('#dvh'), state.dvh, state.dvhVisible, viewer.referenceDose());
		box.replaceChildren(el('table', {},
			el('thead', {}, el('tr', {}, ['', 'ROI', 'volume (cc)', 'min', 'mean', 'max', 'D95', 'D2', 'V20 (%)'].map((h) => el('th', {}, h)))),
			el('tbody', {}, state.dvh.rois.map((r) => el('tr', {},
				el('td', {}, el('input', { type: 'checkbox', checked: state.dvhVisible.has(r.roi_number),
					onchange: (e) => { if (e.target.checked) state.dvhVisible.add(r.roi_number); else state.dvhVisible.delete(r.roi_number); redraw(); } })),
				el('td', {}, el('span', { class: 'swatch', style: `background:${rgb(r.color)}` }), ' ', r.roi_name),
				el('td', {}, fmt(r.volume_cc, 1)), el('td', {}, fmt(r.min_gy, 2)), el('td', {}, fmt(r.mean_gy, 2)),
				el('td', {}, fmt(r.max_gy, 2)), el('td', {}, fmt(r.d95_gy, 2)), el('td', {}, fmt(r.d2_gy, 2)), el('td', {}, fmt(r.v20_pct, 1)))))));
		redraw();
	} catch (e) {
		box.replaceChildren();
		failed(e);
	}
}

const INLINE_TYPES = new Set(['application/pdf', 'text/plain', 'image/png', 'image/jpeg', 'image/gif', 'image/webp']);

async function openDocument(d) {
	showTab('document');
	const frame = $('#document-frame');
	$('#document-title').textContent = d.description || d.filename || `document ${d.id}`;
	try {
		const obj = await api('object', { id: d.id });
		// only types that cannot run script in the page's origin are shown
		// inside it (a blob: URL has the page's origin); others are downloads
		const type = (obj.content_type || '').toLowerCase().split(';')[0].trim();
		const inline = INLINE_TYPES.has(type);
		const blob = new Blob([base64Bytes(obj.data)], { type: inline ? type : 'application/octet-stream' });
		if (frame.dataset.url) URL.revokeObjectURL(frame.dataset.url);
		const url = URL.createObjectURL(blob);
		frame.dataset.url = url;
		frame.dataset.objectId = d.id;
		frame.dataset.size = blob.size;
		frame.src = inline ? url : 'about:blank';
		if (!inline) message(`${type || 'this type'} is not shown in the page: use "download"`);
		$('#document-download').href = url;
		$('#document-download').download = obj.filename || `document-${d.id}`;
	} catch (e) {
		failed(e);
	}
}

// --------------------------------------------------------------------------
// data management: jobs, rules, storages, archive and restore

async function moveSeries(kind, s) {
	const params = { series_instance_uid: s.series_instance_uid, include_related: true };
	if (kind === 'archive') {
		const target = $('#archive-storage');
		if (target && target.value) params.storage = target.value;
	}
	try {
		const r = await api(kind, params, true);
		state.watchedJobs.add(r.job);
		message(`${kind} job ${r.job}: ${r.objects} objects (the series and what travels with it)`);
		document.body.dataset.lastJob = r.job;
		pollJobs();
	} catch (e) {
		failed(e);
	}
}

let jobsTimer = null;
async function pollJobs() {
	clearTimeout(jobsTimer);
	let active = 0;
	try {
		const r = await api('jobs', { limit: 30 });
		active = r.active;
		$('#jobs tbody').replaceChildren(...r.jobs.map((j) => el('tr', { dataset: { job: j.id, state: j.state }, class: state.watchedJobs.has(j.id) ? 'watched' : '' },
			el('td', {}, j.id), el('td', {}, j.kind), el('td', { class: `state ${j.state}` }, j.state), el('td', {}, j.storage || ''),
			el('td', {}, j.created_by), el('td', {}, (j.created_at || '').replace('T', ' ').slice(0, 19)),
			el('td', {}, el('div', { class: 'bar' }, el('div', { style: `width:${j.progress}%` })), ` ${j.done + j.failed}/${j.total}`),
			el('td', {}, bytesText(j.bytes)), el('td', { class: 'error' }, j.error || ''),
			el('td', { class: 'operator-only' }, ['queued', 'running'].includes(j.state)
				? el('button', { class: 'small', onclick: () => api('cancel', { job: j.id }, true).then(pollJobs, failed) }, 'Cancel') : null))));
		$('#jobs-active').textContent = active ? `${active} active` : 'none active';
		// a watched job that ended: the tiers in the tree have changed
		const ended = r.jobs.filter((j) => state.watchedJobs.has(j.id) && ['done', 'failed', 'cancelled'].includes(j.state));
		for (const j of ended) {
			state.watchedJobs.delete(j.id);
			message(`${j.kind} job ${j.id} ${j.state}: ${j.done} of ${j.total} objects${j.error ? ` (${j.error})` : ''}`, j.state === 'done' ? 'info' : 'error');
		}
		if (ended.length) {
			if (state.patient) openPatient(state.patient.patient_id);
			refreshStorages();
		}
	} catch (e) {
		if (e.status !== 401) failed(e);
	}
	const visible = $('#tab-data').classList.contains('active');
	jobsTimer = setTimeout(pollJobs, active || state.watchedJobs.size ? 1000 : visible ? 3000 : 15000);
}

async function refreshStorages() {
	try {
		const r = await api('storages');
		state.storages = r.storages;
		const max = Math.max(1, ...r.storages.map((s) => Number(s.bytes)));
		$('#storages tbody').replaceChildren(...r.storages.map((s) => el('tr', { dataset: { storage: s.name } },
			el('td', {}, s.name), el('td', {}, s.kind), el('td', {}, s.tier), el('td', {}, s.read_only ? 'read-only' : s.receives_new_objects ? 'new objects' : ''),
			el('td', {}, s.objects), el('td', {}, el('div', { class: 'bar' }, el('div', { style: `width:${(100 * s.bytes) / max}%` })), ` ${bytesText(s.bytes)}`))));
		const sel = $('#archive-storage');
		if (sel && !sel.options.length) renderTree();
	} catch (e) {
		if (e.status !== 401) failed(e);
	}
}

async function refreshRules() {
	try {
		const r = await api('rules');
		$('#rules tbody').replaceChildren(...r.rules.map((x) => el('tr', {},
			el('td', {}, x.name), el('td', {}, x.action), el('td', {}, x.storage || x.node || ''), el('td', {}, x.schedule || 'manual'),
			el('td', {}, x.window_start ? `${x.window_start.slice(0, 5)}–${(x.window_end || '').slice(0, 5)}` : 'any time'),
			el('td', {}, x.last_state || ''), el('td', {}, (x.next_run || '').replace('T', ' ').slice(0, 16)),
			el('td', {}, `${x.objects} · ${bytesText(x.bytes)}`), el('td', { class: 'error' }, x.last_error || ''),
			el('td', { class: 'predicate' }, x.predicate))));
	} catch (e) {
		if (e.status !== 401) failed(e);
	}
}

// sizes of the view canvases follow their boxes
const resize = () => {
	for (const c of document.querySelectorAll('canvas.view')) {
		const r = c.getBoundingClientRect();
		c.width = Math.max(64, Math.floor(r.width));
		c.height = Math.max(64, Math.floor(r.height));
	}
	viewer.redraw();
};
new ResizeObserver(resize).observe($('#views'));
resize();

start();
