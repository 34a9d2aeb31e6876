// panva's oidc-provider with the device flow, for tests/test_oidc_provider.py.
//
//   node server.mjs [PORT]        (or PORT=... in the environment; 0 or none: any free port)
//
// Listens on 127.0.0.1 with issuer http://127.0.0.1:PORT and prints the port as the
// only line on stdout; oidc-provider's notices go to stderr. Lifetimes, in seconds:
// DEVICE_CODE_TTL (600), ACCESS_TOKEN_TTL (300), REFRESH_TOKEN_TTL (3600).
//
// A person approves through the provider's own pages: /device, then its development
// login and consent forms (features.devInteractions), where any login name is accepted;
// the test drives those pages as a browser would.
//
// One route is the test's own: POST /test/clock?advance=SECONDS moves the provider's
// clock forward, so codes and tokens expire without the test waiting for them.

import { generateKeyPairSync } from 'node:crypto';
import { createServer } from 'node:http';

import Provider from 'oidc-provider';

// stdout is the port, for whoever started us; the provider's advice is not.
console.info = console.error;

// oidc-provider reads the time through Date.now() (its epochTime helper, the in-memory
// store's expiry), so shifting it ages every code, token and session alike.
let clockOffsetMs = 0;
const realNow = Date.now;
Date.now = () => realNow() + clockOffsetMs;

function testRoute(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname !== '/test/clock') return false;
  const advance = Number(url.searchParams.get('advance'));
  if (req.method !== 'POST' || !Number.isFinite(advance) || advance < 0) {
    res.writeHead(400).end('POST /test/clock?advance=SECONDS\n');
  } else {
    clockOffsetMs += advance * 1000;
    res.writeHead(204).end();
  }
  return true;
}

function seconds(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) {
    throw new TypeError(`${name} must be a positive whole number of seconds, not ${raw}`);
  }
  return value;
}

const ttl = {
  deviceCode: seconds('DEVICE_CODE_TTL', 600),
  accessToken: seconds('ACCESS_TOKEN_TTL', 300),
  refreshToken: seconds('REFRESH_TOKEN_TTL', 3600),
};
const requestedPort = Number(process.argv[2] ?? process.env.PORT ?? 0);

// The name claim labels the device's screen; any login becomes "<Login> Example".
function displayName(login) {
  return `${login.charAt(0).toUpperCase()}${login.slice(1)} Example`;
}

// A fresh signing key per run, rather than the library's published development keys.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });

const configuration = {
  clients: [{
    client_id: 'device-agent',
    client_name: 'device-agent',
    // A device cannot keep a secret (RFC 8628 §5.6): a public client.
    token_endpoint_auth_method: 'none',
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
    response_types: [],
    redirect_uris: [],
  }],
  features: {
    deviceFlow: { enabled: true },
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  // offline_access takes prompt=consent at the authorization endpoint, but the device
  // authorization endpoint has no prompt parameter: there it is granted whenever the
  // client may use the refresh_token grant. The defaults then issue a refresh token for
  // it (issueRefreshToken) and, this being a public client, rotate it on every use
  // (rotateRefreshToken).
  scopes: ['openid', 'offline_access'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
  },
  async findAccount(ctx, sub) {
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          name: displayName(sub),
          preferred_username: sub,
          email: `${sub}@example.test`,
          email_verified: true,
        };
      },
    };
  },
  ttl: {
    DeviceCode: ttl.deviceCode,
    AccessToken: ttl.accessToken,
    RefreshToken: ttl.refreshToken,
    IdToken: ttl.accessToken,
    Interaction: 600,
    Session: 3600,
    Grant: ttl.refreshToken,
  },
  cookies: { keys: ['device-agent interop test, not a secret'] },
  jwks: { keys: [{ ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256' }] },
};

const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(requestedPort, '127.0.0.1', resolve);
});
const { port } = server.address();
const provider = new Provider(`http://127.0.0.1:${port}`, configuration);
const app = provider.callback();
server.on('request', (req, res) => testRoute(req, res) || app(req, res));
process.stdout.write(`${port}\n`);
