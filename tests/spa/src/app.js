// A small single-page app on another origin than the mailsync API, as an SPA team would
// write it: Apollo Client 4, queries and mutations over HTTP, subscriptions over graphql-ws.
//
// Open it as index.html?api=http://api.example.com&token=<bearer token>&contact=<Contact id>.
// The API must list this page's origin in MAILSYNC_CORS_ORIGINS.
//
// It shows the five things a cache-backed app needs from the API:
//   1. a query (the contact's timeline, and the workspace's settings);
//   2. `fetchMore` on the timeline connection, merged by `relayStylePagination`;
//   3. a mutation whose answer carries the changed object with its id (`workspace`), so the
//      normalized cache updates every query that shows it, with no refetch;
//   4. a subscription whose event (`emailReceived`, with the email's `cursor`) is written
//      into the cached timeline;
//   5. reading again what it shows when events may have been missed: the server says so
//      (`eventsMissed`), and after a reconnect of its own nobody can.
// `window.spa` exposes what happened, for tests/test_spa.py.

import {
  ApolloClient,
  ApolloLink,
  HttpLink,
  InMemoryCache,
  gql,
} from '@apollo/client';
import { GraphQLWsLink } from '@apollo/client/link/subscriptions';
import { getMainDefinition, relayStylePagination } from '@apollo/client/utilities';
import { createClient } from 'graphql-ws';

const params = new URLSearchParams(location.search);
const api = params.get('api');
const token = params.get('token');
const contactId = params.get('contact');

const spa = (window.spa = { errors: [], steps: [] });
function log(message) {
  spa.steps.push(message);
  document.getElementById('log').textContent += `${message}\n`;
}
function fail(error) {
  spa.errors.push(String(error && error.message ? error.message : error));
  log(`error: ${error}`);
}

// Queries and mutations over HTTP; subscriptions over the websocket. Both send the token.
const httpLink = new HttpLink({
  uri: `${api}/graphql`,
  headers: { Authorization: `Bearer ${token}` },
});
const wsLink = new GraphQLWsLink(
  createClient({
    url: `${api.replace(/^http/, 'ws')}/graphql`,
    connectionParams: { Authorization: `Bearer ${token}` },
    on: {
      // 5. Events published while the socket was down are not replayed.
      connected: (socket, payload, wasRetry) => {
        if (wasRetry) readAgain('reconnected');
      },
    },
  }),
);
const link = ApolloLink.split(
  ({ query }) => {
    const definition = getMainDefinition(query);
    return definition.kind === 'OperationDefinition' && definition.operation === 'subscription';
  },
  wsLink,
  httpLink,
);

const client = new ApolloClient({
  link,
  cache: new InMemoryCache({
    typePolicies: {
      // One cached list per contact, whatever page was asked for.
      Contact: { fields: { timeline: relayStylePagination() } },
    },
  }),
});

const TIMELINE = gql`
  query Timeline($contact: ID!, $after: String) {
    viewer { workspace { id name settings { labelSyncedMail } } }
    contact(id: $contact) {
      id
      name
      timeline(first: 2, after: $after) {
        edges { cursor node { id subject sentAt } }
        pageInfo { hasNextPage endCursor }
      }
    }
  }
`;

const LABEL_SYNCED_MAIL = gql`
  mutation LabelSyncedMail($on: Boolean!) {
    updateWorkspaceSettings(input: { labelSyncedMail: $on }) {
      workspace { id settings { labelSyncedMail } }
      userErrors { code message }
    }
  }
`;

const EMAIL_RECEIVED = gql`
  subscription EmailReceived($contact: ID!) {
    emailReceived(contactId: $contact) {
      cursor
      email { id subject sentAt }
    }
  }
`;

const EVENTS_MISSED = gql`
  subscription EventsMissed {
    eventsMissed { detectedAt }
  }
`;

// 5. What the cache holds may be stale: every watched query asks again.
function readAgain(why) {
  log(`reading again: ${why}`);
  client
    .refetchQueries({ include: 'active' })
    .then(() => {
      spa.readAgain = (spa.readAgain || 0) + 1;
    })
    .catch(fail);
}

function render(data) {
  const { workspace } = data.viewer;
  document.getElementById('workspace').textContent =
    `${workspace.name} (label synced mail: ${workspace.settings.labelSyncedMail})`;
  const list = document.getElementById('timeline');
  list.replaceChildren(
    ...data.contact.timeline.edges.map(({ node }) => {
      const item = document.createElement('li');
      item.textContent = `${node.subject} (${node.sentAt})`;
      return item;
    }),
  );
  document.getElementById('more').disabled = !data.contact.timeline.pageInfo.hasNextPage;
  spa.subjects = data.contact.timeline.edges.map(({ node }) => node.subject);
  spa.labelSyncedMail = workspace.settings.labelSyncedMail;
  spa.workspaceName = workspace.name;
}

// 1. The query, watched: every later change to the cache re-renders it.
const timeline = client.watchQuery({ query: TIMELINE, variables: { contact: contactId } });
let rendered;
const firstRender = new Promise((resolve) => (rendered = resolve));
timeline.subscribe({
  next: ({ data, error }) => {
    if (error) fail(error);
    if (data && data.contact) {
      render(data);
      rendered(data);
    }
  },
  error: fail,
});

async function loadMore() {
  const { pageInfo } = client.readQuery({ query: TIMELINE, variables: { contact: contactId } })
    .contact.timeline;
  if (!pageInfo.hasNextPage) return 0;
  const { data } = await timeline.fetchMore({ variables: { after: pageInfo.endCursor } });
  return data.contact.timeline.edges.length;
}
document.getElementById('more').addEventListener('click', () => loadMore().catch(fail));

// 4. New mail for this contact goes to the top of the cached timeline.
function listen() {
  return new Promise((resolve) => {
    client.subscribe({ query: EMAIL_RECEIVED, variables: { contact: contactId } }).subscribe({
      next: ({ data }) => {
        const { email, cursor } = data.emailReceived;
        client.cache.modify({
          id: client.cache.identify({ __typename: 'Contact', id: contactId }),
          fields: {
            timeline(existing, { toReference }) {
              const edge = { __typename: 'EmailEdge', cursor, node: toReference(email) };
              return { ...existing, edges: [edge, ...existing.edges] };
            },
          },
        });
        log(`new email: ${email.subject}`);
        spa.received = email.subject;
      },
      error: fail,
    });
    client.subscribe({ query: EVENTS_MISSED }).subscribe({
      next: ({ data }) => readAgain(`events missed (noticed at ${data.eventsMissed.detectedAt})`),
      error: fail,
    });
    // graphql-ws acknowledges nothing per subscription: the test waits for the server to
    // count the subscriber before it sends mail.
    resolve();
  });
}

async function main() {
  const first = await firstRender;
  log(`query: ${first.contact.timeline.edges.length} emails`);

  // 2. The next page, merged into the same cached list (the watched query shows both pages).
  log(`fetchMore: ${await loadMore()} more emails`);

  // 3. The mutation answers the Workspace with its id: the watched query updates itself.
  const before = spa.labelSyncedMail;
  const { data } = await client.mutate({
    mutation: LABEL_SYNCED_MAIL,
    variables: { on: !before },
  });
  if (data.updateWorkspaceSettings.userErrors.length) {
    throw new Error(JSON.stringify(data.updateWorkspaceSettings.userErrors));
  }
  log(`mutation: label synced mail set to ${!before}; the watched query re-renders from the cache`);

  await listen();
  spa.ready = true;
  log('listening for new mail');
}

main().catch(fail);
