// GraphiQL on this server's /graphql. A token the status board holds for
// this tab (session storage) is offered as the Authorization header;
// GraphiQL does not persist headers unless asked to. An Authorization
// header left at "Bearer " is not sent, so the schema loads before one is
// filled in (introspection needs no token).
'use strict';
const token = sessionStorage.getItem('vantage-sync-token') || '';
const send = GraphiQL.createFetcher({ url: '/graphql' });
function fetcher(params, options) {
  const headers = Object.assign({}, options && options.headers);
  for (const name of Object.keys(headers)) {
    if (name.toLowerCase() === 'authorization' && !/^Bearer\s+\S/i.test(headers[name])) delete headers[name];
  }
  return send(params, Object.assign({}, options, { headers }));
}
ReactDOM.createRoot(document.getElementById('graphiql')).render(
  React.createElement(GraphiQL, {
    fetcher,
    defaultHeaders: JSON.stringify({ Authorization: `Bearer ${token}` }, null, 2),
    defaultQuery: '{\n  syncStates {\n    resource\n    lastSyncStatus\n    health\n  }\n}\n',
  }),
);
