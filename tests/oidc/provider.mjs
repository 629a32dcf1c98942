// A real OpenID Connect provider for idmesh's tests: panva's oidc-provider (certified), configured for
// the OAuth 2.0 Device Authorization Grant (RFC 8628) with its development login/consent forms, served
// over HTTPS on loopback. Nothing here imitates a provider: every OAuth/OIDC answer is oidc-provider's own.
//
// The harness adds three things around it, each marked "harness" below:
//   * an `interval` member in the device authorization response (oidc-provider sends none, so a client
//     would otherwise wait RFC 8628's default 5 s between polls);
//   * optional RFC 8628 §3.5 `slow_down` (oidc-provider never issues it): a poll that comes sooner than
//     the interval after the previous poll of the same device code, while the code is still pending,
//     gets `slow_down` instead of `authorization_pending`, and that code's interval grows by 5 s;
//   * key rotation: POST /-/admin/rotate-keys (bearer admin token) makes the provider sign with a new
//     RSA key; the JWKS then lists the new key first (and keeps the old ones unless `retire` is true).
//     oidc-provider fixes its keys at construction, so this builds a new Provider with the new JWKS and
//     swaps it in; every Provider of the process uses one in-memory store (sessions, device codes,
//     grants), so flows under way survive a rotation.
//
// Usage: node provider.mjs --config harness.json --cert server.crt --key server.key [--port 0]
//        [--exit-on-stdin-close]
// Prints exactly one line on stdout, `ready <issuer>`, once it listens; logs go to stderr.
//
// harness.json: {
//   "clients": [ oidc-provider client metadata, ... ],
//   "accounts": { "<login>": { "email": "...", "email_verified": true }, ... },
//   "deviceFlow": { "ttl": 600, "interval": 1, "slowDown": true, "slowDownIncrement": 5,
//                   "perClient": { "<client_id>": { "ttl": 3, "interval": 1 } } },
//   "adminToken": "..."
// }

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';
// oidc-provider's own in-memory adapter, but one store for every Provider this process builds (the
// default gives each Provider a store of its own, which a key rotation would then lose). Not a public
// entry point of the package: pinned with it in package-lock.json, and test_provider's rotation test
// fails if it moves.
import { createMemoryAdapter } from 'oidc-provider/lib/adapters/memory_adapter.js';

const DEVICE_CODE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const ADMIN_ROTATE_PATH = '/-/admin/rotate-keys';
// A poll arriving this much before the interval is up still counts as on time (timer and clock jitter).
const POLL_TOLERANCE_MS = 50;
// oidc-provider's default clockTolerance; the memory store keeps an expired record this long, so that a
// late poll of an expired device code gets expired_token rather than invalid_grant.
const CLOCK_TOLERANCE_S = 15;

const { values: args } = parseArgs({
  options: {
    config: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    port: { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
    'exit-on-stdin-close': { type: 'boolean', default: false },
  },
});

for (const name of ['config', 'cert', 'key']) {
  if (!args[name]) {
    console.error(`provider.mjs: --${name} is required`);
    process.exit(2);
  }
}

const harness = JSON.parse(fs.readFileSync(args.config, 'utf8'));
const accounts = harness.accounts ?? {};
const deviceFlow = {
  ttl: 600, interval: 5, slowDown: false, slowDownIncrement: 5, perClient: {}, ...harness.deviceFlow,
};
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];
const sharedStore = createMemoryAdapter(CLOCK_TOLERANCE_S);

function deviceSetting(clientId, name) {
  return deviceFlow.perClient?.[clientId]?.[name] ?? deviceFlow[name];
}

function newSigningKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const pub = { kty: jwk.kty, n: jwk.n, e: jwk.e };
  jwk.kid = crypto.hash('sha256', JSON.stringify(pub), 'base64url').slice(0, 16);
  jwk.use = 'sig';
  jwk.alg = 'RS256';
  return jwk;
}

async function findAccount(ctx, id) {
  const person = Object.hasOwn(accounts, id) ? accounts[id] : undefined;
  if (person === undefined) {
    return undefined;
  }
  return {
    accountId: id,
    async claims(use, scope) {
      return { sub: id, email: person.email ?? id, email_verified: Boolean(person.email_verified) };
    },
  };
}

// harness: per device code, when it was last polled and the interval in force (grows on slow_down).
const polls = new Map();

function slowDownMiddleware() {
  return async function slowDown(ctx, next) {
    await next();
    if (!deviceFlow.slowDown || ctx.oidc?.route !== 'token' || ctx.status !== 400
        || ctx.body?.error !== 'authorization_pending') {
      return;
    }
    const deviceCode = ctx.oidc.params?.device_code;
    if (typeof deviceCode !== 'string') {
      return;
    }
    const now = Date.now();
    const seen = polls.get(deviceCode);
    if (seen === undefined) {
      forgetOldPolls();
      const interval = deviceSetting(ctx.oidc.client?.clientId, 'interval');
      polls.set(deviceCode, { last: now, interval, expires: now + 3600_000 });
      return;
    }
    const early = now - seen.last < seen.interval * 1000 - POLL_TOLERANCE_MS;
    seen.last = now;
    if (early) {
      seen.interval += deviceFlow.slowDownIncrement;
      ctx.body = {
        error: 'slow_down',
        error_description: `polled sooner than the interval; poll every ${seen.interval} s from now on`,
      };
    }
  };
}

function forgetOldPolls() {
  const now = Date.now();
  for (const [code, seen] of polls) {
    if (seen.expires < now) polls.delete(code);
  }
}

function makeProvider(issuer, jwks) {
  const provider = new Provider(issuer, {
    clients: harness.clients,
    jwks,
    adapter: sharedStore,
    clockTolerance: CLOCK_TOLERANCE_S,
    findAccount,
    cookies: { keys: cookieKeys },
    scopes: ['openid', 'email'],
    claims: { openid: ['sub'], email: ['email', 'email_verified'] },
    // By default an ID token carries only `sub` when an access token is issued alongside it; the relying
    // party wants email and email_verified in the ID token itself.
    conformIdTokenClaims: false,
    features: {
      deviceFlow: { enabled: true },
      devInteractions: { enabled: true },
    },
    ttl: {
      DeviceCode(ctx, code, client) {
        return deviceSetting(client.clientId, 'ttl');
      },
    },
  });
  provider.use(slowDownMiddleware());
  provider.on('device_authorization.success', (ctx, body) => {
    // harness: tell the device how often to poll (the body object is the response being sent).
    body.interval = deviceSetting(ctx.oidc.client.clientId, 'interval');
  });
  provider.on('server_error', (ctx, err) => {
    console.error('server_error', ctx.path, err);
  });
  return provider;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

let jwks = { keys: [newSigningKey()] };
let current;
let handler;

function install(issuer) {
  current = makeProvider(issuer, jwks);
  handler = current.callback();
}

async function rotateKeys(req, res) {
  const expected = `Bearer ${harness.adminToken}`;
  const given = req.headers.authorization ?? '';
  if (!harness.adminToken || given.length !== expected.length
      || !crypto.timingSafeEqual(Buffer.from(given), Buffer.from(expected))) {
    sendJson(res, 401, { error: 'unauthorized' });
    return;
  }
  const text = await readBody(req);
  const options = text ? JSON.parse(text) : {};
  const key = newSigningKey();
  jwks = { keys: [key, ...(options.retire ? [] : jwks.keys)] };
  install(current.issuer);
  console.error(`rotated signing key: now ${key.kid}; published ${jwks.keys.map((k) => k.kid).join(', ')}`);
  sendJson(res, 200, { kid: key.kid, published: jwks.keys.map((k) => k.kid) });
}

const server = https.createServer({
  cert: fs.readFileSync(args.cert),
  key: fs.readFileSync(args.key),
}, (req, res) => {
  if (req.url === ADMIN_ROTATE_PATH && req.method === 'POST') {
    rotateKeys(req, res).catch((err) => {
      console.error('rotate-keys failed', err);
      sendJson(res, 500, { error: String(err) });
    });
    return;
  }
  handler(req, res);
});

server.listen(Number(args.port), args.host, () => {
  const { port } = server.address();
  const issuer = `https://${args.host}:${port}`;
  install(issuer);
  process.stdout.write(`ready ${issuer}\n`);
});

server.on('error', (err) => {
  console.error('provider.mjs: cannot listen:', err.message);
  process.exit(1);
});

if (args['exit-on-stdin-close']) {
  // The test session holds our stdin: when it goes away (even killed -9), so do we.
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

process.on('SIGTERM', () => {
  server.close();
  process.exit(0);
});
