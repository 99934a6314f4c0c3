// The client's protocol against a scripted WebSocket (no network): CALL frames, media in
// 65536-byte chunks both ways, remote errors, capability updates, keep-alives, and reconnection.
import assert from "node:assert/strict";
import { test } from "node:test";

import { CHUNK_SIZE, Client } from "../src/client/client";
import { AnvilError, Capability } from "../src/client/values";

/** A WebSocket the test plays the host of. */
class FakeSocket {
  static all: FakeSocket[] = [];
  binaryType = "blob";
  sent: (string | Uint8Array)[] = [];
  closed = false;
  onopen: (() => void) | null = null;
  onclose: (() => void) | null = null;
  onerror: (() => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;

  constructor(readonly url: string) {
    FakeSocket.all.push(this);
  }

  send(data: string | Uint8Array): void {
    this.sent.push(typeof data === "string" ? data : new Uint8Array(data));
  }

  close(): void {
    this.drop();
  }

  accept(): void {
    this.onopen?.();
  }

  drop(): void {
    if (this.closed) return;
    this.closed = true;
    this.onclose?.();
  }

  deliver(data: unknown): void {
    this.onmessage?.({ data: typeof data === "string" || data instanceof ArrayBuffer ? data : JSON.stringify(data) });
  }

  /** The JSON frames sent, parsed. */
  messages(): Record<string, unknown>[] {
    return this.sent.filter((f): f is string => typeof f === "string").map((f) => JSON.parse(f));
  }

  calls(): Record<string, unknown>[] {
    return this.messages().filter((m) => m.type === "CALL" && !String(m.id).startsWith("client-keepalive"));
  }
}

const tick = () => new Promise((r) => setTimeout(r, 0));
const until = async (what: string, ok: () => boolean, ms = 2000) => {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
};

function client(options = {}): { c: Client; socket: () => FakeSocket } {
  FakeSocket.all = [];
  const c = new Client("ws://host/_/ws", {
    WebSocket: FakeSocket as unknown as typeof WebSocket,
    minBackoff: 5,
    maxBackoff: 20,
    connectTimeout: 500,
    ...options,
  });
  return { c, socket: () => FakeSocket.all[FakeSocket.all.length - 1] };
}

async function opened(socket: () => FakeSocket): Promise<FakeSocket> {
  await until("a socket", () => FakeSocket.all.length > 0);
  const s = socket();
  s.accept();
  return s;
}

test("a call is one CALL frame with v, command, args, kwargs and objects", async () => {
  const { c, socket } = client();
  const result = c.callWithKwargs("greet", ["ann", new Date(0)], { loud: true });
  const s = await opened(socket);
  await until("the call", () => s.calls().length === 1);
  const [msg] = s.calls();
  assert.equal(s.url, "ws://host/_/ws");
  assert.deepEqual(Object.keys(msg).sort(), ["args", "command", "id", "kwargs", "objects", "type", "v"]);
  assert.match(String(msg.id), /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.deepEqual([msg.command, msg.args, msg.kwargs, msg.v], ["greet", ["ann", null], { loud: true }, 8]);
  assert.deepEqual((msg.objects as { type: string[] }[])[0].type, ["DateTime"]);
  s.deliver({ id: msg.id, response: { n: null }, objects: [{ type: ["Long"], path: ["response", "n"], value: "99999999999" }] });
  assert.deepEqual(await result, { n: 99999999999n });
  c.close();
});

test("a remote error rejects with an AnvilError carrying type, message and trace", async () => {
  const { c, socket } = client();
  const result = c.call("secret");
  const s = await opened(socket);
  await until("the call", () => s.calls().length === 1);
  s.deliver({ id: s.calls()[0].id, error: { type: "anvil.server.PermissionDenied", message: "no", trace: [["x.py", 3]] }, objects: [] });
  await assert.rejects(result, (e: unknown) => {
    assert.ok(e instanceof AnvilError && e instanceof Error);
    assert.deepEqual([e.type, e.message, e.trace, e.name], ["anvil.server.PermissionDenied", "no", [["x.py", 3]], "anvil.server.PermissionDenied"]);
    return true;
  });
  c.close();
});

test("media goes out in 65536-byte chunks, each header right before its binary frame", async () => {
  const { c, socket } = client();
  const big = new Uint8Array(2 * CHUNK_SIZE + 1000).map((_, i) => i % 251);
  const result = c.call("store", new Blob([big], { type: "application/x-test" }), new Blob([]));
  const s = await opened(socket);
  await until("the frames", () => s.sent.length >= 9);
  const [first, ...rest] = s.sent;
  const msg = JSON.parse(first as string);
  const id = msg.id;
  assert.deepEqual(msg.objects.map((o: { id: string }) => o.id), [`${id}_0`, `${id}_1`]);
  const pairs = [];
  for (let i = 0; i < rest.length; i += 2) {
    assert.equal(typeof rest[i], "string");
    assert.ok(rest[i + 1] instanceof Uint8Array);
    pairs.push([JSON.parse(rest[i] as string), (rest[i + 1] as Uint8Array).length]);
  }
  assert.deepEqual(pairs, [
    [{ type: "CHUNK_HEADER", requestId: id, mediaId: `${id}_0`, chunkIndex: 0, lastChunk: false }, CHUNK_SIZE],
    [{ type: "CHUNK_HEADER", requestId: id, mediaId: `${id}_0`, chunkIndex: 1, lastChunk: false }, CHUNK_SIZE],
    [{ type: "CHUNK_HEADER", requestId: id, mediaId: `${id}_0`, chunkIndex: 2, lastChunk: true }, 1000],
    [{ type: "CHUNK_HEADER", requestId: id, mediaId: `${id}_1`, chunkIndex: 0, lastChunk: true }, 0],
  ]);
  const sentBytes = Buffer.concat((rest.filter((f) => typeof f !== "string") as Uint8Array[]).slice(0, 3));
  assert.ok(sentBytes.equals(Buffer.from(big)));
  // the reply's media arrives after it, in any chunk size; the call waits for all of it
  s.deliver({ id, response: null, objects: [{ type: ["DataMedia"], path: ["response"], id: "r0", "mime-type": "text/plain", name: "x.txt" }] });
  s.deliver({ type: "CHUNK_HEADER", requestId: id, mediaId: "r0", chunkIndex: 0, lastChunk: false });
  s.deliver(new TextEncoder().encode("hel").buffer);
  let settled = false;
  void result.then(() => (settled = true));
  await tick();
  assert.equal(settled, false, "the response waits for its media");
  s.deliver({ type: "CHUNK_HEADER", requestId: id, mediaId: "r0", chunkIndex: 1, lastChunk: true });
  s.deliver(new TextEncoder().encode("lo").buffer);
  const blob = (await result) as Blob & { name?: string };
  assert.deepEqual([await blob.text(), blob.type, blob.name], ["hello", "text/plain", "x.txt"]);
  c.close();
});

test("a MEDIA_ERROR rejects the call with its cause", async () => {
  const { c, socket } = client();
  const result = c.call("m");
  const s = await opened(socket);
  await until("the call", () => s.calls().length === 1);
  const id = s.calls()[0].id;
  s.deliver({ id, response: null, objects: [{ type: ["DataMedia"], path: ["response"], id: "r0", "mime-type": "a/b", name: null }] });
  s.deliver({ type: "MEDIA_ERROR", requestId: id, mediaIds: ["r0"], cause: { type: "anvil.server.TimeoutError", message: "slow" } });
  await assert.rejects(result, { type: "anvil.server.TimeoutError", message: "slow" });
  c.close();
});

test("capability updates reach the capability passed in and onCapabilityUpdate", async () => {
  const { c, socket } = client();
  const cap = new Capability(["files", 42], "mac").narrow(["x"]);
  const other = new Capability(["other"], "m2");
  const seen: unknown[] = [];
  cap.onUpdate((u) => seen.push(["cap", u]));
  other.onUpdate((u) => seen.push(["other", u]));
  c.onCapabilityUpdate((capability, u) => seen.push(["all", capability === cap, u]));
  const result = c.call("work", cap, other);
  const s = await opened(socket);
  await until("the call", () => s.calls().length === 1);
  // keys as Python's json.dumps writes them (with spaces): matched after re-encoding
  s.deliver({ id: s.calls()[0].id, response: 1, objects: [], capUpdates: { '["files", 42, "x"]': { done: 1 }, '["nope"]': 2 } });
  await result;
  assert.deepEqual(seen, [["cap", { done: 1 }], ["all", true, { done: 1 }]]);
  c.close();
});

test("keep-alives every interval; their replies are ignored", async () => {
  const { c, socket } = client({ keepAliveInterval: 10 });
  const result = c.call("f");
  const s = await opened(socket);
  await until("two keep-alives", () => s.messages().filter((m) => m.command === "anvil.private.echo").length >= 2);
  const pings = s.messages().filter((m) => m.command === "anvil.private.echo");
  assert.deepEqual(pings.slice(0, 2).map((m) => [m.id, m.args]), [["client-keepalive-0", ["keep-alive"]], ["client-keepalive-1", ["keep-alive"]]]);
  s.deliver({ id: "client-keepalive-0", response: "keep-alive", objects: [] });
  s.deliver({ id: s.calls()[0].id, response: "ok", objects: [] });
  assert.equal(await result, "ok");
  c.close();
});

test("a lost connection rejects calls in flight and reconnects with backoff", async () => {
  const { c, socket } = client();
  const states: string[] = [];
  c.onStateChange((state) => states.push(state));
  const inFlight = c.call("slow");
  const first = await opened(socket);
  await until("the call", () => first.calls().length === 1);
  first.drop();
  await assert.rejects(inFlight, { type: "anvil.server.UplinkDisconnectedError" });
  // a refused reconnection, then one that opens: a call made meanwhile waits for it
  await until("a second socket", () => FakeSocket.all.length === 2);
  const later = c.call("again");
  socket().drop();
  await until("a third socket", () => FakeSocket.all.length === 3);
  const third = socket();
  third.accept();
  await until("the waiting call", () => third.calls().length === 1);
  third.deliver({ id: third.calls()[0].id, response: "back", objects: [] });
  assert.equal(await later, "back");
  assert.deepEqual(states, ["connecting", "open", "reconnecting", "open"]);
  c.close();
  await assert.rejects(c.call("x"), { type: "anvil.server.UplinkDisconnectedError" });
});

test("a call that cannot connect within connectTimeout rejects", async () => {
  const { c } = client({ connectTimeout: 30 });
  await assert.rejects(c.call("f"), { type: "anvil.server.UplinkDisconnectedError" });
  c.close();
});

test("a live object's method is a liveObjectCall", async () => {
  const { c, socket } = client();
  const result = c.call("task");
  const s = await opened(socket);
  await until("the call", () => s.calls().length === 1);
  const spec = { backend: "anvil.private.BackgroundTask", id: '"t1"', permissions: [], mac: "m", itemCache: {}, methods: ["get_state"] };
  s.deliver({ id: s.calls()[0].id, response: null, objects: [{ type: ["LiveObject"], path: ["response"], ...spec }] });
  const task = (await result) as { get_state: () => Promise<unknown> };
  const state = task.get_state();
  await until("the live call", () => s.calls().length === 2);
  const msg = s.calls()[1];
  assert.deepEqual(msg.liveObjectCall, { backend: spec.backend, id: spec.id, mac: "m", permissions: [], method: "get_state" });
  assert.equal(msg.command, undefined);
  s.deliver({ id: msg.id, response: { n: 3 }, objects: [] });
  assert.deepEqual(await state, { n: 3 });
  c.close();
});
