// mdd web viewer: talking to the archive.  /api/<name> (mdd.web_api as the
// signed-in role) and DICOMweb under /dicomweb, with HTTP Basic credentials
// kept for the browser tab only (sessionStorage).

const KEY = 'mdd.credentials';

export class ApiError extends Error {
	constructor(status, body) {
		super(body && body.error ? body.error : `HTTP ${status}`);
		this.status = status;
		this.sqlstate = body && body.sqlstate;
	}
}

let onUnauthorized = () => {};

/* Called with no argument when the server asks for credentials. */
export function setUnauthorizedHandler(fn) {
	onUnauthorized = fn;
}

export function signIn(user, password) {
	const bytes = new TextEncoder().encode(`${user}:${password}`);
	sessionStorage.setItem(KEY, btoa(String.fromCharCode(...bytes)));
}

export function hasCredentials() {
	return sessionStorage.getItem(KEY) !== null;
}

export function signOut() {
	sessionStorage.removeItem(KEY);
}

function headers(extra) {
	const h = new Headers(extra || {});
	const c = sessionStorage.getItem(KEY);
	if (c) h.set('Authorization', `Basic ${c}`);
	return h;
}

async function request(url, init) {
	const response = await fetch(url, { credentials: 'same-origin', ...init });
	if (response.status === 401) onUnauthorized();
	return response;
}

/* GET /api/<name>?params, or POST with a JSON body when post is true. */
export async function api(name, params = {}, post = false) {
	let url = `/api/${encodeURIComponent(name)}`;
	const init = { headers: headers({ Accept: 'application/json' }) };
	if (post) {
		init.method = 'POST';
		init.headers.set('Content-Type', 'application/json');
		init.body = JSON.stringify(params);
	} else {
		const q = new URLSearchParams();
		for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null) q.set(k, v);
		const s = q.toString();
		if (s) url += `?${s}`;
	}
	const response = await request(url, init);
	let body = null;
	try {
		body = await response.json();
	} catch (e) {
		body = null;
	}
	if (!response.ok) throw new ApiError(response.status, body);
	return body;
}

/* Bytes of base64 text (as /api/object returns them). */
export function base64Bytes(text) {
	const s = atob(text);
	const out = new Uint8Array(s.length);
	for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
	return out;
}

/*
 * The parts of a multipart/related answer (WADO-RS), as Uint8Arrays; an
 * answer that is not multipart is one part.
 */
export function multipartParts(contentType, buffer) {
	const bytes = new Uint8Array(buffer);
	const m = /boundary="?([^";]+)"?/i.exec(contentType || '');
	if (!/^multipart\//i.test(contentType || '') || !m) return [bytes];
	const delimiter = new TextEncoder().encode(`--${m[1]}`);
	const find = (from) => {
		outer: for (let i = from; i <= bytes.length - delimiter.length; i++) {
			for (let j = 0; j < delimiter.length; j++) if (bytes[i + j] !== delimiter[j]) continue outer;
			return i;
		}
		return -1;
	};
	const parts = [];
	let at = find(0);
	while (at >= 0) {
		let start = at + delimiter.length;
		if (bytes[start] === 0x2d && bytes[start + 1] === 0x2d) break; // closing delimiter
		// skip the part's headers: up to the first empty line
		let body = -1;
		for (let i = start; i < bytes.length - 3; i++) {
			if (bytes[i] === 13 && bytes[i + 1] === 10 && bytes[i + 2] === 13 && bytes[i + 3] === 10) {
				body = i + 4;
				break;
			}
		}
		if (body < 0) break;
		const next = find(body);
		if (next < 0) break;
		let end = next;
		if (bytes[end - 2] === 13 && bytes[end - 1] === 10) end -= 2; // CRLF before the delimiter
		parts.push(bytes.subarray(body, end));
		at = next;
	}
	return parts;
}

/* A WADO-RS retrieval: the parts of the answer. */
export async function wado(path, type) {
	const response = await request(`/dicomweb${path}`, {
		headers: headers({ Accept: `multipart/related; type="${type}"` }),
	});
	if (!response.ok) {
		let body = null;
		try {
			body = await response.json();
		} catch (e) {
			body = null;
		}
		throw new ApiError(response.status, body);
	}
	return multipartParts(response.headers.get('Content-Type'), await response.arrayBuffer());
}
