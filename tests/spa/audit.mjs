// graphql-http's GraphQL-over-HTTP audit suite against a running server.
// Usage: node audit.mjs http://127.0.0.1:8000/graphql
// Prints one JSON line per audit: {"id", "name", "status", "reason"}.
import { auditServer } from 'graphql-http';

const url = process.argv[2];
if (!url) {
  console.error('usage: node audit.mjs <graphql url>');
  process.exit(2);
}
const results = await auditServer({ url });
for (const result of results) {
  const { id, name, status } = result;
  const reason = 'reason' in result ? result.reason : undefined;
  console.log(JSON.stringify({ id, name, status, reason }));
}
