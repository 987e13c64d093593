// Apollo Client's automatic persisted queries against the service: the
// dashboard query, sent twice over POST and twice with GET for hashed
// queries. The first request of each sends only the document's SHA-256,
// the server does not know it yet (PERSISTED_QUERY_NOT_FOUND), and the
// link sends it again with the document; from then on the hash alone is
// enough. Prints one JSON line per transport: each request as sent
// (method, and whether it carried the document) and whether both answers
// were the same.
//
//   VANTAGE_SYNC_URL=http://127.0.0.1:8080 VANTAGE_SYNC_TOKEN=<token> npm run persisted
import { createHash } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';

import { ApolloClient, HttpLink, InMemoryCache } from '@apollo/client';
import { PersistedQueryLink } from '@apollo/client/link/persisted-queries';

import type { DashboardQuery } from './generated/graphql.js';
import { DASHBOARD } from './operations.js';

const url = process.env.VANTAGE_SYNC_URL?.trim();
const token = process.env.VANTAGE_SYNC_TOKEN?.trim();
if (!url || !token) {
  console.error('set VANTAGE_SYNC_URL to the server and VANTAGE_SYNC_TOKEN to a token');
  process.exit(2);
}
const uri = new URL(url);
if (!uri.pathname.replace(/\/+$/, '').endsWith('/graphql')) {
  uri.pathname = `${uri.pathname.replace(/\/+$/, '')}/graphql`;
}

const sha256 = (text: string) => createHash('sha256').update(text).digest('hex');

interface Sent {
  method: string;
  document: boolean;
}

for (const useGETForHashedQueries of [false, true]) {
  const sent: Sent[] = [];
  // Records what each request carried, then sends it.
  const recording: typeof fetch = async (input, init) => {
    const method = init?.method ?? 'GET';
    const target = new URL(String(input));
    const document =
      method === 'GET'
        ? target.searchParams.has('query')
        : typeof init?.body === 'string' && 'query' in JSON.parse(init.body);
    sent.push({ method, document });
    return fetch(input, init);
  };
  const client = new ApolloClient({
    link: new PersistedQueryLink({ sha256, useGETForHashedQueries }).concat(
      new HttpLink({
        uri: uri.toString(),
        fetch: recording,
        headers: { authorization: `Bearer ${token}` },
      }),
    ),
    cache: new InMemoryCache(),
  });
  const first = await client.query<DashboardQuery>({ query: DASHBOARD, fetchPolicy: 'network-only' });
  const second = await client.query<DashboardQuery>({ query: DASHBOARD, fetchPolicy: 'network-only' });
  console.log(
    JSON.stringify({
      transport: useGETForHashedQueries ? 'get' : 'post',
      sent,
      same: isDeepStrictEqual(first.data, second.data),
      rows: first.data?.syncStates.length ?? 0,
    }),
  );
}
