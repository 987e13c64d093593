import type { CodegenConfig } from '@graphql-codegen/cli';

// Types for the schema and for each operation in src/, from the schema file
// the server generates (`vantage-sync schema`), so the dashboard's queries
// are checked against the API they will run on.
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
  },
};

export default config;
