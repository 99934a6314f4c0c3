/**
 * anvil_nb's browser client: call a notebook's server functions from a web page.
 *
 * ```js
 * import { call } from "./client.js";   // a page at {app root}_/...; or "/_/client.js"
 * const greeting = await call("greet", "world");
 * ```
 *
 * The module talks to the `_/ws` beside it (`new URL("./ws", import.meta.url)`): the app it
 * was served from, in the browser's cookie session for that app. See docs/browser.md.
 */

import { Client, type CapabilityUpdateHandler, type ConnectionState } from "./client";

export { Client, CHUNK_SIZE } from "./client";
export type { CapabilityUpdateHandler, ClientOptions, ConnectionState } from "./client";
export { deserialise, serialise } from "./serialise";
export {
  AnvilError,
  Capability,
  DateOnly,
  LazyMedia,
  LiveObject,
  PortableClass,
  PortableValue,
  portable,
  typeNameOf,
  utcOffsetOf,
} from "./values";

let shared: Client | null = null;

/** The WebSocket URL of the app this module was served from: `{app root}_/ws`, ws or wss. */
export function defaultUrl(): string {
  const url = new URL("./ws", import.meta.url);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

/** The module's own client (made, not yet connected, on first use). */
export function defaultClient(): Client {
  shared ??= new Client(defaultUrl());
  return shared;
}

/** Call the server function *name*; resolves to its return value, rejects with an `AnvilError`. */
export function call(name: string, ...args: unknown[]): Promise<unknown> {
  return defaultClient().callWithKwargs(name, args, {});
}

/** Call *name* with positional and keyword arguments. */
export function callWithKwargs(
  name: string,
  args: unknown[] = [],
  kwargs: Record<string, unknown> = {},
): Promise<unknown> {
  return defaultClient().callWithKwargs(name, args, kwargs);
}

/** Receive every capability update: `(capability, update) => ...`. Returns an unsubscribe. */
export function onCapabilityUpdate(handler: CapabilityUpdateHandler): () => void {
  return defaultClient().onCapabilityUpdate(handler);
}

/** Follow the connection's state (`connecting`, `open`, `reconnecting`, ...). */
export function onStateChange(handler: (state: ConnectionState) => void): () => void {
  return defaultClient().onStateChange(handler);
}
