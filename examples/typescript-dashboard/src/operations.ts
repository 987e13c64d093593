// The dashboard's operations. `npm run codegen` reads them from here (the
// `gql` tags) and writes their result and variable types to
// src/generated/graphql.ts, checked against ../../schema.graphql.
import { gql } from '@apollo/client';

export const DASHBOARD = gql`
  query Dashboard {
    syncStates {
      resource
      lastSyncStatus
      health
      recordsSynced
      lastSyncTime
    }
  }
`;

// One document for both transports. `resources` is a variable rather than
// text in the document, so subscribers with other filters still send the
// same document (the server renders each change once per group of
// identical subscriptions).
export const CHANGES = gql`
  subscription Changes($resources: [String!]) {
    syncStateChanged(resources: $resources) {
      operation
      resource
      cursor
      state {
        lastSyncStatus
        health
        recordsSynced
      }
    }
  }
`;
