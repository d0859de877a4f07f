// Drives the real sockjs-client (npm) from Node against a SockJS server, for
// tests/sockjs/test_sockjs_client.py. Prints one JSON object per line:
//   {"event": "open", "transport": NAME}
//   {"event": "message", "data": TEXT}
//   {"event": "close", "code": N, "reason": TEXT}
// Usage: node client.js URL TRANSPORT MESSAGES_JSON [close]
// Sends every message of MESSAGES_JSON after open; closes itself once as many
// messages came back, unless the last argument is "wait" (then it waits for
// the server to close). Exits 0 on close, 2 on a timeout.
'use strict';

const SockJS = require('sockjs-client');

const [url, transport, messagesJson, mode] = process.argv.slice(2);
const messages = JSON.parse(messagesJson || '[]');
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

const sock = new SockJS(url, null, { transports: [transport], timeout: 15000 });
let received = 0;

sock.onopen = () => {
  out({ event: 'open', transport: sock.transport });
  for (const m of messages) {
    sock.send(m);
  }
  if (messages.length === 0 && mode !== 'wait') {
    sock.close();
  }
};

sock.onmessage = (e) => {
  out({ event: 'message', data: e.data });
  received += 1;
  if (received === messages.length && mode !== 'wait') {
    sock.close(1000, 'done');
  }
};

sock.onclose = (e) => {
  out({ event: 'close', code: e.code, reason: e.reason });
  process.exit(0);
};

setTimeout(() => {
  out({ event: 'timeout' });
  process.exit(2);
}, 30000);
