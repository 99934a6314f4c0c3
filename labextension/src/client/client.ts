/**
 * The browser protocol over one WebSocket (PROTOCOL.md §11): no handshake, CALLs out,
 * responses in, media as `CHUNK_HEADER` + binary frame pairs, a keep-alive every 5 s.
 *
 * The connection opens with the first call. When it drops, the calls in flight reject with
 * `anvil.server.UplinkDisconnectedError` (the host may or may not have run them), and the
 * client reconnects with backoff (0.5 s doubling to 10 s, with jitter). A call made while
 * disconnected waits for the connection for up to `connectTimeout` ms.
 */

import { type Entry, type MediaContent, deserialise, mediaIds, serialise } from "./serialise";
import { AnvilError, type Capability, type LiveObjectSpec } from "./values";

/** Options of a `Client`. */
export interface ClientOptions {
  /** The WebSocket constructor (default: the global one). */
  WebSocket?: typeof WebSocket;
  /** Milliseconds between keep-alive calls (default 5000). */
  keepAliveInterval?: number;
  /** How long a call waits for a connection, in ms (default 15000). */
  connectTimeout?: number;
  /** First and longest reconnection delay, in ms (default 500 and 10000). */
  minBackoff?: number;
  maxBackoff?: number;
}

/** The state of the connection, as `onStateChange` reports it. */
export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** Receives each capability update: the capability object passed into the call, and the update. */
export type CapabilityUpdateHandler = (capability: Capability, update: unknown) => void;

/** Chunk size for outgoing media, as Anvil's browser client uses. */
export const CHUNK_SIZE = 65536;
const DISCONNECTED = "anvil.server.UplinkDisconnectedError";

interface Pending {
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  capabilities: Capability[];
}

interface Incoming {
  msg?: Record<string, unknown>;
  chunks: Map<string, Uint8Array[]>;
  done: Set<string>;
  failure?: AnvilError;
}

/** A connection to one app's `_/ws`. Most pages use the module's `call` instead. */
export class Client {
  private readonly url: string;
  private readonly options: Required<ClientOptions>;
  private socket: WebSocket | null = null;
  private state: ConnectionState = "idle";
  private readonly pending = new Map<string, Pending>();
  private readonly incoming = new Map<string, Incoming>();
  private nextHeader: Record<string, unknown> | null = null;
  private readonly waiters = new Set<{ resolve: () => void; reject: (e: Error) => void }>();
  private readonly capabilityHandlers = new Set<CapabilityUpdateHandler>();
  private readonly stateHandlers = new Set<(state: ConnectionState) => void>();
  private keepAlive: ReturnType<typeof setInterval> | null = null;
  private retry: ReturnType<typeof setTimeout> | null = null;
  private attempts = 0;
  private keepAliveCount = 0;

  constructor(url: string | URL, options: ClientOptions = {}) {
    const ws = options.WebSocket ?? (globalThis as { WebSocket?: typeof WebSocket }).WebSocket;
    if (!ws) {
      throw new Error("no WebSocket implementation: pass options.WebSocket");
    }
    this.url = String(url);
    this.options = {
      WebSocket: ws,
      keepAliveInterval: options.keepAliveInterval ?? 5000,
      connectTimeout: options.connectTimeout ?? 15000,
      minBackoff: options.minBackoff ?? 500,
      maxBackoff: options.maxBackoff ?? 10000,
    };
  }

  /** Call the server function *name* with positional arguments. */
  call(name: string, ...args: unknown[]): Promise<unknown> {
    return this.callWithKwargs(name, args, {});
  }

  /** Call the server function *name* with positional and keyword arguments. */
  callWithKwargs(
    name: string,
    args: unknown[] = [],
    kwargs: Record<string, unknown> = {},
  ): Promise<unknown> {
    if (typeof name !== "string") {
      return Promise.reject(new TypeError("the function name is a string"));
    }
    return this.send({ command: name }, args, kwargs);
  }

  /** Call *method* of the live object *spec* (e.g. a background task's `get_state`). */
  liveObjectCall(
    spec: LiveObjectSpec,
    method: string,
    args: unknown[] = [],
    kwargs: Record<string, unknown> = {},
  ): Promise<unknown> {
    const { backend, id, mac, permissions } = spec;
    return this.send({ liveObjectCall: { backend, id, mac, permissions, method } }, args, kwargs);
  }

  /** Call *handler* with every capability update; returns a function that removes it. */
  onCapabilityUpdate(handler: CapabilityUpdateHandler): () => void {
    this.capabilityHandlers.add(handler);
    return () => this.capabilityHandlers.delete(handler);
  }

  /** Call *handler* whenever the connection's state changes; returns a function that removes it. */
  onStateChange(handler: (state: ConnectionState) => void): () => void {
    this.stateHandlers.add(handler);
    return () => this.stateHandlers.delete(handler);
  }

  /** The connection's state. */
  get connectionState(): ConnectionState {
    return this.state;
  }

  /** Close the connection for good: calls in flight and later calls reject. */
  close(): void {
    this.setState("closed");
    this.clearTimers();
    const socket = this.socket;
    this.socket = null;
    socket?.close();
    this.failAll("The connection was closed by the page");
  }

  private async send(
    target: Record<string, unknown>,
    args: unknown[],
    kwargs: Record<string, unknown>,
  ): Promise<unknown> {
    const id = uuid();
    const encoded = serialise({ args, kwargs }, `${id}_`);
    const bytes = await Promise.all(encoded.media.map(async (m) => new Uint8Array(await m.blob.arrayBuffer())));
    await this.connected();
    const socket = this.socket;
    if (!socket) {
      throw new AnvilError(DISCONNECTED, "The connection to the server was lost");
    }
    const result = new Promise<unknown>((resolve, reject) => {
      this.pending.set(id, { resolve, reject, capabilities: encoded.capabilities });
    });
    const msg = { type: "CALL", id, v: 8, ...target, ...encoded.json, objects: encoded.objects };
    // one synchronous run: each header and its binary frame are adjacent, as they must be
    socket.send(JSON.stringify(msg));
    encoded.media.forEach((m, i) => this.sendMedia(socket, id, m.id, bytes[i]));
    return result;
  }

  private sendMedia(socket: WebSocket, requestId: string, mediaId: string, bytes: Uint8Array): void {
    let index = 0;
    for (let start = 0; start === 0 || start < bytes.length; start += CHUNK_SIZE) {
      const lastChunk = start + CHUNK_SIZE >= bytes.length;
      socket.send(JSON.stringify({ type: "CHUNK_HEADER", requestId, mediaId, chunkIndex: index++, lastChunk }));
      socket.send(bytes.subarray(start, start + CHUNK_SIZE));
    }
  }

  /** Resolves once the socket is open (opening it if nobody has yet). */
  private connected(): Promise<void> {
    if (this.state === "open") {
      return Promise.resolve();
    }
    if (this.state === "closed") {
      return Promise.reject(new AnvilError(DISCONNECTED, "The connection was closed by the page"));
    }
    if (this.state === "idle") {
      this.open();
    }
    return new Promise<void>((resolve, reject) => {
      const waiter = { resolve: () => done(resolve), reject: (e: Error) => done(() => reject(e)) };
      const timer = setTimeout(
        () => waiter.reject(new AnvilError(DISCONNECTED, `Could not connect to ${this.url}`)),
        this.options.connectTimeout,
      );
      const done = (then: () => void) => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
        then();
      };
      this.waiters.add(waiter);
    });
  }

  private open(): void {
    this.setState(this.attempts ? "reconnecting" : "connecting");
    const socket = new this.options.WebSocket(this.url);
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      this.attempts = 0;
      this.setState("open");
      this.keepAlive = setInterval(() => this.ping(), this.options.keepAliveInterval);
      unref(this.keepAlive);
      for (const waiter of [...this.waiters]) waiter.resolve();
    };
    socket.onmessage = (event: MessageEvent) => {
      if (this.socket === socket) this.receive(event.data);
    };
    socket.onclose = () => {
      if (this.socket === socket) this.lost();
    };
    socket.onerror = () => {
      // a close event always follows
    };
  }

  private lost(): void {
    this.socket = null;
    this.clearTimers();
    this.nextHeader = null;
    this.incoming.clear();
    this.failAll("The connection to the server was lost");
    if (this.state === "closed") return;
    this.setState("reconnecting");
    const base = Math.min(this.options.maxBackoff, this.options.minBackoff * 2 ** this.attempts);
    this.attempts += 1;
    this.retry = setTimeout(() => {
      this.retry = null;
      if (this.state !== "closed") this.open();
    }, base * (0.75 + Math.random() * 0.5));
    unref(this.retry);
  }

  private failAll(message: string): void {
    const calls = [...this.pending.values()];
    this.pending.clear();
    for (const call of calls) call.reject(new AnvilError(DISCONNECTED, message));
    if (this.state === "closed") {
      for (const waiter of [...this.waiters]) waiter.reject(new AnvilError(DISCONNECTED, message));
    }
  }

  private clearTimers(): void {
    if (this.keepAlive !== null) clearInterval(this.keepAlive);
    if (this.retry !== null) clearTimeout(this.retry);
    this.keepAlive = this.retry = null;
  }

  private setState(state: ConnectionState): void {
    if (this.state === state) return;
    this.state = state;
    for (const handler of [...this.stateHandlers]) handler(state);
  }

  private ping(): void {
    const id = `client-keepalive-${this.keepAliveCount++}`;
    const msg = { type: "CALL", id, v: 8, command: "anvil.private.echo", args: ["keep-alive"], kwargs: {}, objects: [] };
    this.socket?.send(JSON.stringify(msg));
  }

  private receive(data: unknown): void {
    if (typeof data !== "string") {
      this.chunk(new Uint8Array(data as ArrayBuffer));
      return;
    }
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(data);
    } catch {
      console.error("anvil_nb: a frame that is not JSON", data.slice(0, 200));
      return;
    }
    if (msg.type === "CHUNK_HEADER") {
      this.nextHeader = msg;
    } else if (msg.type === "MEDIA_ERROR") {
      const cause = (msg.cause ?? {}) as { type?: string; message?: string };
      this.media(String(msg.requestId)).failure = new AnvilError(cause.type ?? "anvil.server.InternalError", cause.message ?? "Error during media transfer");
      this.maybeFinish(String(msg.requestId));
    } else if (typeof msg.output === "string") {
      console.log("Anvil server output:", msg.output);
    } else if ("id" in msg && ("response" in msg || "error" in msg)) {
      const id = String(msg.id);
      if (!this.pending.has(id)) return; // keep-alives and calls that gave up
      this.media(id).msg = msg;
      this.maybeFinish(id);
    } else if ("error" in msg && !("id" in msg)) {
      console.error("anvil_nb: the server reports", msg.error);
    }
  }

  private media(requestId: string): Incoming {
    let entry = this.incoming.get(requestId);
    if (!entry) {
      entry = { chunks: new Map(), done: new Set() };
      this.incoming.set(requestId, entry);
    }
    return entry;
  }

  private chunk(bytes: Uint8Array): void {
    const header = this.nextHeader;
    this.nextHeader = null;
    if (!header) {
      console.error("anvil_nb: a binary frame without a CHUNK_HEADER");
      return;
    }
    const requestId = String(header.requestId);
    const mediaId = String(header.mediaId);
    const entry = this.media(requestId);
    const chunks = entry.chunks.get(mediaId) ?? [];
    chunks.push(bytes);
    entry.chunks.set(mediaId, chunks);
    if (header.lastChunk) {
      entry.done.add(mediaId);
      this.maybeFinish(requestId);
    }
  }

  private maybeFinish(id: string): void {
    const entry = this.incoming.get(id);
    const call = this.pending.get(id);
    if (!entry?.msg || !call) {
      if (!call && entry?.failure) this.incoming.delete(id);
      return;
    }
    const msg = entry.msg;
    if (!entry.failure && !mediaIds(msg).every((m) => entry.done.has(m))) {
      return; // its media are still on the way
    }
    this.incoming.delete(id);
    this.pending.delete(id);
    if (entry.failure) {
      call.reject(entry.failure);
      return;
    }
    if (msg.error !== undefined) {
      call.reject(remoteError(msg.error));
      return;
    }
    try {
      const content: MediaContent = new Map();
      for (const [mediaId, chunks] of entry.chunks) content.set(mediaId, new Blob(chunks as BlobPart[]));
      const body = { response: msg.response, vt_global: msg.vt_global, objects: msg.objects as Entry[] };
      const values = deserialise(body, content, (spec, method, args, kwargs) =>
        this.liveObjectCall(spec, method, args, kwargs),
      );
      this.deliverUpdates(call.capabilities, msg.capUpdates);
      call.resolve(values.response);
    } catch (error) {
      call.reject(error as Error);
    }
  }

  private deliverUpdates(capabilities: Capability[], updates: unknown): void {
    if (!updates || typeof updates !== "object" || !capabilities.length) return;
    for (const [key, update] of Object.entries(updates as Record<string, unknown>)) {
      const normal = canonical(key);
      const matching = capabilities.filter((c, i) => c.key === normal && capabilities.indexOf(c) === i);
      for (const capability of matching) capability.deliver(update);
      if (matching.length) {
        for (const handler of [...this.capabilityHandlers]) handler(matching[0], update);
      }
    }
  }
}

/** A remote error object as the `AnvilError` a call rejects with. */
function remoteError(error: unknown): AnvilError {
  if (error && typeof error === "object") {
    const e = error as { type?: unknown; message?: unknown; trace?: unknown };
    return new AnvilError(
      typeof e.type === "string" ? e.type : "anvil.server.AnvilWrappedError",
      typeof e.message === "string" ? e.message : String(e.message ?? ""),
      Array.isArray(e.trace) ? e.trace : [],
    );
  }
  return new AnvilError("anvil.server.AnvilWrappedError", String(error));
}

function canonical(key: string): string | null {
  try {
    return JSON.stringify(JSON.parse(key));
  } catch {
    return null;
  }
}

/** A random UUID, also where `crypto.randomUUID` is missing (pages not in a secure context). */
function uuid(): string {
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Timers must not keep Node alive (the unit tests); browsers have no `unref`. */
function unref(timer: unknown): void {
  (timer as { unref?: () => void }).unref?.();
}
