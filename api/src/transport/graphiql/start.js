// GraphiQL on this server's /graphql. The token comes as the status board
// takes it: from `#token=…` in the address (then moved to this tab's
// session storage and out of the address bar), or from the session the
// board signed in. It is offered as the Authorization header; GraphiQL
// does not persist headers unless asked to. An Authorization header left
// at "Bearer " is not sent, so the schema loads before one is filled in
// (introspection needs no token). Without a token, the first query says
// how to get one.
'use strict';
const TOKEN_KEY = 'vantage-sync-token';
const fromAddress = /^#token=(.+)$/.exec(location.hash);
if (fromAddress) {
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(fromAddress[1]));
  history.replaceState(null, '', location.pathname + location.search);
}
const token = sessionStorage.getItem(TOKEN_KEY) || '';
const send = GraphiQL.createFetcher({ url: '/graphql' });
function fetcher(params, options) {
  const headers = Object.assign({}, options && options.headers);
  for (const name of Object.keys(headers)) {
    if (name.toLowerCase() === 'authorization' && !/^Bearer\s+\S/i.test(headers[name])) delete headers[name];
  }
  return send(params, Object.assign({}, options, { headers }));
}
const query = '{\n  syncStates {\n    resource\n    lastSyncStatus\n    health\n  }\n}\n';
const withoutToken =
  '# Queries need a token. Make one with\n' +
  '#   vantage-sync token --role authenticated\n' +
  '# (service_role to write), then paste it\n' +
  '# after "Bearer " under Headers below.\n' +
  '# Or sign in on the status board (/) in\n' +
  '# this tab, or open /graphiql#token=<token>\n';
ReactDOM.createRoot(document.getElementById('graphiql')).render(
  React.createElement(GraphiQL, {
    fetcher,
    defaultHeaders: JSON.stringify({ Authorization: `Bearer ${token}` }, null, 2),
    defaultQuery: token ? query : withoutToken + query,
    defaultEditorToolsVisibility: token ? false : 'headers',
  }),
);
