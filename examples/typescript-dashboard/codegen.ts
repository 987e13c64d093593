import type { CodegenConfig } from '@graphql-codegen/cli';
import { addTypenameSelectionDocumentTransform } from '@graphql-codegen/client-preset';

// From the schema file the server generates (`vantage-sync schema`):
// - types for each operation in src/, so the dashboard's queries are
//   checked against the API they will run on;
// - the manifest of trusted documents (src/generated/trusted/
//   persisted-documents.json, hash → document), which a server started
//   with TRUSTED_DOCUMENTS=<that file> holds every caller but
//   service_role to. Its documents carry __typename, as Apollo Client's
//   cache wants them.
const config: CodegenConfig = {
  schema: '../../schema.graphql',
  documents: ['src/**/*.ts', '!src/generated/**'],
  generates: {
    'src/generated/graphql.ts': {
      plugins: ['typescript-operations'],
      config: {
        // RFC 3339 strings and free-form JSON, as the API sends them.
        scalars: { DateTime: 'string', JSON: 'unknown' },
        enumsAsTypes: true,
        useTypeImports: true,
      },
    },
    'src/generated/trusted/': {
      preset: 'client',
      presetConfig: {
        persistedDocuments: { hashAlgorithm: 'sha256' },
        fragmentMasking: false,
      },
      documentTransforms: [addTypenameSelectionDocumentTransform],
      config: {
        // Imports with .js, as Node's ES modules (and tsc's nodenext) need.
        emitLegacyCommonJSImports: false,
        scalars: { DateTime: 'string', JSON: 'unknown' },
        enumsAsTypes: true,
        useTypeImports: true,
      },
    },
  },
};

export default config;
