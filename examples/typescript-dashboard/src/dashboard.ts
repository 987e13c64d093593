// A terminal dashboard for the Vantage Sync State service: the state of
// every resource (Apollo Client), then the next changes as they happen,
// over WebSocket (graphql-ws) and over Server-Sent Events (graphql-sse).
//
//   VANTAGE_SYNC_URL=http://127.0.0.1:8080 VANTAGE_SYNC_TOKEN=<token> npm start -- [CHANGES]
//
// It waits for CHANGES changes (default 3, or VANTAGE_SYNC_CHANGES) on
// each transport, then exits 0; after VANTAGE_SYNC_TIMEOUT_SECS (default
// 60) it gives up and exits 1.
//
// With VANTAGE_SYNC_TRUSTED_DOCUMENTS=1 it sends no document, only each
// one's documentId from the manifest `npm run codegen` writes
// (src/generated/trusted/persisted-documents.json): what a server
// started with TRUSTED_DOCUMENTS set to that file asks of it.
import { readFileSync } from 'node:fs';

import { ApolloClient, HttpLink, InMemoryCache } from '@apollo/client';
import type { DocumentNode } from '@apollo/client';
import { PersistedQueryLink } from '@apollo/client/link/persisted-queries';
import { getOperationAST, print } from 'graphql';
import { createClient as createSseClient } from 'graphql-sse';
import { createClient as createWsClient } from 'graphql-ws';
import WebSocket from 'ws';

import type {
  ChangesSubscription,
  ChangesSubscriptionVariables,
  DashboardQuery,
} from './generated/graphql.js';
import { CHANGES, DASHBOARD } from './operations.js';

function setting(name: string): string {
  const value = process.env[name]?.trim();
  if (!value) {
    console.error(
      `set ${name}: VANTAGE_SYNC_URL to the server (http://127.0.0.1:8080), ` +
        'VANTAGE_SYNC_TOKEN to an authenticated or service_role token',
    );
    process.exit(2);
  }
  return value;
}

function count(text: string | undefined, fallback: number, what: string): number {
  if (text === undefined || text === '') return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) {
    console.error(`${what} must be a whole number, not ${JSON.stringify(text)}`);
    process.exit(2);
  }
  return n;
}

/// The GraphQL endpoint: the server's address with /graphql added, or the
/// endpoint itself.
function endpoint(url: string): URL {
  const parsed = new URL(url);
  const path = parsed.pathname.replace(/\/+$/, '');
  parsed.pathname = path.endsWith('/graphql') ? path : `${path}/graphql`;
  return parsed;
}

const httpUrl = endpoint(setting('VANTAGE_SYNC_URL'));
const token = setting('VANTAGE_SYNC_TOKEN');
const wanted = count(process.argv[2] ?? process.env.VANTAGE_SYNC_CHANGES, 3, 'CHANGES');
const timeoutSecs = count(process.env.VANTAGE_SYNC_TIMEOUT_SECS, 60, 'VANTAGE_SYNC_TIMEOUT_SECS');
const trustedDocuments = process.env.VANTAGE_SYNC_TRUSTED_DOCUMENTS === '1';
const wsUrl = new URL(httpUrl);
wsUrl.protocol = httpUrl.protocol === 'https:' ? 'wss:' : 'ws:';

type Transport = 'ws' | 'sse';
const seen: Record<Transport, number> = { ws: 0, sse: 0 };

// Never wait forever: a dashboard run by a test or a script must end.
const timer = setTimeout(() => {
  console.error(
    `timed out after ${timeoutSecs} s: ws ${seen.ws}/${wanted}, sse ${seen.sse}/${wanted} changes`,
  );
  process.exit(1);
}, timeoutSecs * 1000);

// What both clients' `subscribe` take: a sink for each result.
interface Sink {
  next(result: { data?: ChangesSubscription | null; errors?: readonly { message: string }[] }): void;
  error(error: unknown): void;
  complete(): void;
}

/// Subscribes with `subscribe` and prints each change as
/// `<transport> <OPERATION> <resource> <STATUS>` until `wanted` came.
function follow(transport: Transport, subscribe: (sink: Sink) => () => void): Promise<void> {
  if (wanted === 0) return Promise.resolve();
  return new Promise((resolve, reject) => {
    let stop: (() => void) | undefined;
    stop = subscribe({
      next: ({ data, errors }) => {
        if (errors?.length) {
          reject(new Error(`${transport}: ${errors.map((e) => e.message).join('; ')}`));
          return;
        }
        const change = data?.syncStateChanged;
        if (!change || seen[transport] >= wanted) return;
        const status = change.state?.lastSyncStatus ?? '-';
        console.log(`${transport} ${change.operation} ${change.resource} ${status}`);
        seen[transport] += 1;
        if (seen[transport] === wanted) {
          stop?.();
          resolve();
        }
      },
      error: (error) => reject(new Error(`${transport}: ${describe(error)}`)),
      complete: () => {
        if (seen[transport] < wanted) {
          reject(new Error(`${transport}: the server ended the subscription`));
        }
      },
    });
  });
}

/// The documentId (`sha256:<hex>`) of each operation in the trusted
/// documents' manifest, by operation name.
function manifestIds(): Map<string, string> {
  const file = new URL('./generated/trusted/persisted-documents.json', import.meta.url);
  const manifest = JSON.parse(readFileSync(file, 'utf8')) as Record<string, string>;
  const ids = new Map<string, string>();
  for (const [id, document] of Object.entries(manifest)) {
    const name = /^(?:query|mutation|subscription)\s+(\w+)/.exec(document)?.[1];
    if (name) ids.set(name, id);
  }
  return ids;
}

/// The manifest's documentId of `document`'s operation; the program
/// stops if it has none (run `npm run codegen`).
function documentId(ids: Map<string, string>, document: DocumentNode): string {
  const name = getOperationAST(document)?.name?.value ?? '';
  const id = ids.get(name);
  if (!id) {
    console.error(`no trusted document for operation ${name}: run npm run codegen`);
    process.exit(2);
  }
  return id;
}

function describe(error: unknown): string {
  if (error instanceof Error) {
    // fetch says only "fetch failed"; the reason (ECONNREFUSED, ...) is its cause.
    const cause = error.cause instanceof Error ? `: ${error.cause.message}` : '';
    return `${error.message}${cause}`;
  }
  // graphql-ws reports a closed socket as its CloseEvent.
  if (typeof error === 'object' && error !== null && 'code' in error) {
    const { code, reason } = error as { code: number; reason?: string };
    return `connection closed (${code}${reason ? `: ${reason}` : ''})`;
  }
  return String(error);
}

async function main(): Promise<void> {
  const authorization = `Bearer ${token}`;

  const ids = trustedDocuments ? manifestIds() : undefined;

  // The dashboard: one row per resource. With trusted documents, Apollo
  // Client's persisted-query link sends the manifest's hash instead of
  // the document.
  const http = new HttpLink({ uri: httpUrl.href, headers: { authorization } });
  const apollo = new ApolloClient({
    link: ids
      ? new PersistedQueryLink({
          generateHash: (document) => documentId(ids, document).replace(/^sha256:/, ''),
        }).concat(http)
      : http,
    cache: new InMemoryCache(),
  });
  const { data } = await apollo.query<DashboardQuery>({
    query: DASHBOARD,
    fetchPolicy: 'network-only',
  });
  for (const row of data?.syncStates ?? []) {
    console.log(
      `row ${row.resource} ${row.lastSyncStatus} ${row.health} ` +
        `synced=${row.recordsSynced} last=${row.lastSyncTime ?? 'never'}`,
    );
  }
  apollo.stop();

  // The live feed, over both transports, from the next change on. Their
  // own retries are off: this program reports a lost connection and
  // ends (see docs/live-feed.md for a client that resumes by cursor).
  const variables: ChangesSubscriptionVariables = { resources: null };
  // The document, or (trusted documents) its documentId alone: both
  // clients send the payload's fields as they are.
  const changes = ids
    ? { query: '', documentId: documentId(ids, CHANGES), variables }
    : { query: print(CHANGES), variables };
  const ws = createWsClient({
    url: wsUrl.href,
    // Node 20 has no WebSocket of its own.
    webSocketImpl: WebSocket,
    connectionParams: { Authorization: authorization },
    retryAttempts: 0,
  });
  const sse = createSseClient({
    url: httpUrl.href,
    headers: { Authorization: authorization },
    retryAttempts: 0,
  });
  try {
    await Promise.all([
      follow('ws', (sink) => ws.subscribe<ChangesSubscription>(changes, sink)),
      follow('sse', (sink) => sse.subscribe<ChangesSubscription>(changes, sink)),
    ]);
  } finally {
    await ws.dispose();
    sse.dispose();
  }
  console.log(`done ws=${seen.ws} sse=${seen.sse}`);
}

main().then(
  () => {
    clearTimeout(timer);
    process.exit(0);
  },
  (error: unknown) => {
    console.error(`error: ${describe(error)}`);
    process.exit(1);
  },
);
