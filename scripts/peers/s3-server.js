'use strict';
// mdd's S3 test peer: s3rver (a fake S3 server keeping objects as files)
// with the request checks of a real S3 that mdd relies on and that s3rver
// 3.7.1 does not make itself:
//
//  - no anonymous access (AccessDenied, 403);
//  - AWS Signature Version 4 of the Authorization header, computed again
//    here with the secret key (s3rver only looks up the access key id and
//    accepts any V4 signature): SignatureDoesNotMatch (403);
//  - the credential scope: region and service (AuthorizationHeaderMalformed);
//  - the request time, within 15 minutes (RequestTimeTooSkewed, 403);
//  - x-amz-content-sha256, required and signed, checked against the body
//    (XAmzContentSHA256Mismatch, 400);
//  - Content-MD5 checked against the body of a PUT (BadDigest, 400); with
//    MDD_S3_REQUIRE_CONTENT_MD5=1 a PUT without it is refused (InvalidRequest).
//
// A PUT whose body fails a check stores nothing.  s3rver 3.7.1 answers a
// PUT before its file is completely written (it resolves when its md5
// transform ends, not when the write stream has flushed), so a GET right
// after could read a short object; the store's putObject is replaced here
// by one that answers only once the bytes are written and fsync()ed, as a
// real S3 only confirms what it will serve.  The signature code
// follows AWS's specification and checks itself at start-up against the
// worked example of the S3 documentation ("GET Object").
//
// Environment: MDD_S3RVER_DIR (where node_modules/s3rver is), MDD_S3_DIR
// (objects), MDD_S3_PORT, MDD_S3_ACCESS_KEY_ID, MDD_S3_SECRET_ACCESS_KEY,
// MDD_S3_REGION (us-east-1), MDD_S3_BUCKETS (space-separated, created at
// start), MDD_S3_REQUIRE_CONTENT_MD5.  Virtual-host style requests name the
// bucket in the host: <bucket>.s3.localhost:<port>.  Logs one line per
// request on standard output, never a credential.

const crypto = require('crypto');
const path = require('path');
const { PassThrough } = require('stream');

const s3rverDir = path.join(process.env.MDD_S3RVER_DIR || '.', 'node_modules', 's3rver');
const S3rver = require(s3rverDir);
const AWSAccount = require(path.join(s3rverDir, 'lib', 'models', 'account'));
const S3Error = require(path.join(s3rverDir, 'lib', 'models', 'error'));

const region = process.env.MDD_S3_REGION || 'us-east-1';
const requireMd5 = process.env.MDD_S3_REQUIRE_CONTENT_MD5 === '1';
const MAX_SKEW_MS = 15 * 60 * 1000;

function sha256hex(data) {
  return crypto.createHash('sha256').update(data).digest('hex');
}

function hmac(key, data) {
  return crypto.createHmac('sha256', key).update(data).digest();
}

function uriEncode(s) {
  return encodeURIComponent(s).replace(/[!'()*]/g, c => '%' + c.charCodeAt(0).toString(16).toUpperCase());
}

// The V4 signature of a request: method, raw path and query as sent,
// headers (lower-case names), the signed header names, the payload hash.
function signature(secret, req) {
  const uri = req.path
    .split('/')
    .map(seg => uriEncode(decodeURIComponent(seg)))
    .join('/');
  const query = (req.query || '')
    .split('&')
    .filter(Boolean)
    .map(p => {
      const i = p.indexOf('=');
      const k = decodeURIComponent(i < 0 ? p : p.slice(0, i));
      const v = i < 0 ? '' : decodeURIComponent(p.slice(i + 1));
      return [uriEncode(k), uriEncode(v)];
    })
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0))
    .map(([k, v]) => `${k}=${v}`)
    .join('&');
  const canonicalHeaders = req.signedHeaders
    .map(h => `${h}:${String(req.headers[h] === undefined ? '' : req.headers[h]).trim().replace(/\s+/g, ' ')}\n`)
    .join('');
  const canonicalRequest = [
    req.method,
    uri,
    query,
    canonicalHeaders,
    req.signedHeaders.join(';'),
    req.payloadHash,
  ].join('\n');
  const scope = `${req.date}/${req.region}/${req.service}/aws4_request`;
  const stringToSign = ['AWS4-HMAC-SHA256', req.amzDate, scope, sha256hex(canonicalRequest)].join('\n');
  const kDate = hmac('AWS4' + secret, req.date);
  const kRegion = hmac(kDate, req.region);
  const kService = hmac(kRegion, req.service);
  const kSigning = hmac(kService, 'aws4_request');
  return hmac(kSigning, stringToSign).toString('hex');
}

// the worked example of the S3 documentation, "Example: GET Object"
function selfTest() {
  const got = signature('wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY', {
    method: 'GET',
    path: '/test.txt',
    query: '',
    headers: {
      host: 'examplebucket.s3.amazonaws.com',
      range: 'bytes=0-9',
      'x-amz-content-sha256': 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
      'x-amz-date': '20130524T000000Z',
    },
    signedHeaders: ['host', 'range', 'x-amz-content-sha256', 'x-amz-date'],
    payloadHash: 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
    date: '20130524',
    amzDate: '20130524T000000Z',
    region: 'us-east-1',
    service: 's3',
  });
  const want = 'f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41';
  if (got !== want) {
    throw new Error(`signature self-test failed: ${got} instead of ${want}`);
  }
}

function s3error(code, message, status) {
  const e = new S3Error(code, message);
  if (status) {
    e.status = status;
    e.expose = status < 500;
  }
  return e;
}

// Koa middleware: the checks of the header comment, before s3rver sees
// the request.  The body of a PUT is read here, checked, then handed on.
function strictChecks(keys) {
  return async function strict(ctx, next) {
    const h = ctx.req.headers;
    const auth = h.authorization;
    if (auth === undefined) {
      throw s3error('AccessDenied', 'Access Denied', 403); // no anonymous access
    }
    const m = /^AWS4-HMAC-SHA256 Credential=([^/,\s]+)\/(\d{8})\/([^/,\s]+)\/([^/,\s]+)\/aws4_request,\s*SignedHeaders=([a-z0-9;-]+),\s*Signature=([0-9a-f]{64})$/.exec(
      auth,
    );
    if (!m) {
      throw s3error('AuthorizationHeaderMalformed', 'The authorization header is malformed.');
    }
    const [, keyId, date, reqRegion, service, signed, given] = m;
    const secret = keys.get(keyId);
    if (secret === undefined) {
      throw s3error('InvalidAccessKeyId', 'The AWS Access Key Id you provided does not exist in our records.');
    }
    if (reqRegion !== region || service !== 's3') {
      throw s3error(
        'AuthorizationHeaderMalformed',
        `The authorization header is malformed; the region '${reqRegion}' or service '${service}' is wrong; expecting '${region}' and 's3'.`,
      );
    }
    const amzDate = h['x-amz-date'] || '';
    const t = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/.exec(amzDate);
    if (!t || amzDate.slice(0, 8) !== date) {
      throw s3error('AccessDenied', 'AWS authentication requires a valid x-amz-date matching the credential scope.', 403);
    }
    const when = Date.UTC(+t[1], +t[2] - 1, +t[3], +t[4], +t[5], +t[6]);
    if (Math.abs(Date.now() - when) > MAX_SKEW_MS) {
      throw s3error('RequestTimeTooSkewed', 'The difference between the request time and the current time is too large.');
    }
    const signedHeaders = signed.split(';');
    const payloadHash = h['x-amz-content-sha256'];
    if (payloadHash === undefined) {
      throw s3error('InvalidRequest', 'Missing required header for this request: x-amz-content-sha256', 400);
    }
    for (const needed of ['host', 'x-amz-date', 'x-amz-content-sha256']) {
      if (!signedHeaders.includes(needed)) {
        throw s3error('AccessDenied', `Header ${needed} must be signed.`, 403);
      }
    }
    const [rawPath, rawQuery] = ctx.req.url.split('?');
    const expected = signature(secret, {
      method: ctx.req.method,
      path: rawPath,
      query: rawQuery || '',
      headers: h,
      signedHeaders,
      payloadHash,
      date,
      amzDate,
      region: reqRegion,
      service,
    });
    if (!crypto.timingSafeEqual(Buffer.from(expected), Buffer.from(given))) {
      throw s3error(
        'SignatureDoesNotMatch',
        'The request signature we calculated does not match the signature you provided. Check your key and signing method.',
      );
    }

    if (ctx.req.method === 'PUT' && !rawQuery) {
      if (requireMd5 && h['content-md5'] === undefined) {
        throw s3error('InvalidRequest', 'Missing required header for this request: Content-MD5', 400);
      }
      const chunks = [];
      for await (const chunk of ctx.req) chunks.push(chunk);
      const body = Buffer.concat(chunks);
      if (h['content-md5'] !== undefined) {
        const md5 = crypto.createHash('md5').update(body).digest('base64');
        if (!/^[A-Za-z0-9+/]{22}==$/.test(h['content-md5'])) {
          throw s3error('InvalidDigest', 'The Content-MD5 you specified was invalid.');
        }
        if (md5 !== h['content-md5']) {
          throw s3error('BadDigest', 'The Content-MD5 you specified did not match what we received.');
        }
      }
      if (payloadHash !== 'UNSIGNED-PAYLOAD' && sha256hex(body) !== payloadHash) {
        throw s3error(
          'XAmzContentSHA256Mismatch',
          "The provided 'x-amz-content-sha256' header does not match what was computed.",
          400,
        );
      }
      // hand the checked bytes on to s3rver as if they were the request
      const replay = new PassThrough();
      for (const k of ['headers', 'rawHeaders', 'method', 'url', 'httpVersion', 'httpVersionMajor',
                       'httpVersionMinor', 'socket', 'connection']) {
        replay[k] = ctx.req[k];
      }
      replay.end(body);
      ctx.req = replay;
      ctx.request.req = replay;
    }
    return next();
  };
}

// the whole content of an S3Object (a Buffer or a readable stream)
async function contentBytes(content) {
  if (Buffer.isBuffer(content)) return content;
  const chunks = [];
  for await (const chunk of content) chunks.push(chunk);
  return Buffer.concat(chunks);
}

// putObject that resolves only after the object's file is durable
function durablePut(store) {
  const fsp = require('fs').promises;
  store.putObject = async function putObject(object) {
    const file = this.getResourcePath(object.bucket, object.key, 'object');
    const bytes = await contentBytes(object.content);
    const md5 = crypto.createHash('md5').update(bytes).digest('hex');
    await fsp.mkdir(path.dirname(file), { recursive: true });
    const partial = `${file}.partial-${process.pid}`;
    const handle = await fsp.open(partial, 'w');
    try {
      await handle.writeFile(bytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fsp.rename(partial, file);
    await this.putMetadata(object.bucket, object.key, object.metadata, md5);
    return { size: bytes.length, md5 };
  };
}

async function main() {
  selfTest();
  if (process.argv.includes('--self-test')) {
    console.log('signature self-test passed');
    return;
  }
  const keyId = process.env.MDD_S3_ACCESS_KEY_ID;
  const secret = process.env.MDD_S3_SECRET_ACCESS_KEY;
  if (!keyId || !secret || !process.env.MDD_S3_DIR || !process.env.MDD_S3_PORT) {
    throw new Error('MDD_S3_DIR, MDD_S3_PORT, MDD_S3_ACCESS_KEY_ID and MDD_S3_SECRET_ACCESS_KEY must be set');
  }
  // only mdd's key pair: s3rver's built-in S3RVER/S3RVER is revoked
  AWSAccount.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
  AWSAccount.DUMMY_ACCOUNT.createKeyPair(keyId, secret);
  const keys = new Map([[keyId, secret]]);

  const buckets = (process.env.MDD_S3_BUCKETS || 'mdd').split(/\s+/).filter(Boolean);
  const server = new S3rver({
    address: '127.0.0.1',
    port: Number(process.env.MDD_S3_PORT),
    directory: process.env.MDD_S3_DIR,
    serviceEndpoint: 'localhost',
    vhostBuckets: true,
    silent: false,
    configureBuckets: buckets.map(name => ({ name, configs: [] })),
  });
  durablePut(server.store);
  // after s3rver's request logger, before everything else it does
  server.middleware.splice(1, 0, strictChecks(keys));
  const { address, port } = await server.run();
  if (process.env.MDD_S3_PIDFILE) {
    require('fs').writeFileSync(process.env.MDD_S3_PIDFILE, `${process.pid}\n`);
  }
  console.log(`mdd s3 peer listening on ${address}:${port}, region ${region}, buckets ${buckets.join(' ')}`);
  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch(err => {
  console.error(err && err.message ? err.message : err);
  process.exit(1);
});
