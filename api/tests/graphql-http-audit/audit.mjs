// Runs graphql-http's auditServer, the GraphQL over HTTP specification's
// own audit, against the server at $VANTAGE_SYNC_URL (its /graphql),
// every request carrying $VANTAGE_SYNC_TOKEN, and prints one JSON object
// per audit: its id, name, status (ok, warn, error) and reason.
import { auditServer } from 'graphql-http';

const url = process.env.VANTAGE_SYNC_URL;
const token = process.env.VANTAGE_SYNC_TOKEN;
if (!url || !token) {
  console.error('set VANTAGE_SYNC_URL (the server\'s /graphql) and VANTAGE_SYNC_TOKEN');
  process.exit(2);
}

// The audit's requests carry no credentials; the server answers none
// without a token, so each one gets this caller's.
const fetchFn = (input, init = {}) => {
  const headers = new Headers(init.headers);
  headers.set('authorization', `Bearer ${token}`);
  return fetch(input, { ...init, headers });
};

const results = await auditServer({ url, fetchFn });
for (const result of results) {
  const line = { id: result.id, name: result.name, status: result.status };
  if (result.status !== 'ok') {
    line.reason = result.reason;
    const response = result.response;
    if (response) {
      line.response = {
        status: response.status,
        contentType: response.headers.get('content-type'),
        body: await response.text().catch(() => null),
      };
    }
  }
  console.log(JSON.stringify(line));
}
