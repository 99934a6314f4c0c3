/**
 * Values to the wire form `{json, objects[]}` and back (PROTOCOL.md §4), as anvil_nb's
 * `anvil_nb/core/serialise.py` does in Python. No I/O: media bytes are read by the caller.
 *
 * Writing: every value JSON cannot carry is `null` in the body and described by an entry
 * `{type: [...], path: [...], ...}`. Entries come in the order a receiver applies them: keys
 * sorted, children before parents (a portable object's nested entries before its own).
 * Reading: entries are applied in list order, at their paths, in a freshly parsed message.
 */

import {
  AnvilError,
  Capability,
  DateOnly,
  LazyMedia,
  LiveObject,
  type LiveInvoker,
  type LiveObjectSpec,
  PortableClass,
  PortableValue,
  formatDateTime,
  isContainer,
  parseDateTime,
  portable,
  serializationError,
  typeNameOf,
} from "./values";

/** One `objects` entry. */
export interface Entry {
  type: string[];
  path: (string | number)[];
  [field: string]: unknown;
}

/** A Blob to send beside the message, under `id`. */
export interface OutgoingMedia {
  id: string;
  blob: Blob;
}

/** What `serialise` makes. */
export interface Encoded {
  /** The body: the values with `null` where an entry describes them. */
  json: Record<string, unknown>;
  objects: Entry[];
  media: OutgoingMedia[];
  /** The capabilities in the values (their updates come back with the response). */
  capabilities: Capability[];
}

const INT_LIMIT = 2147483647n; // Anvil's clients send ints beyond ±2**31-1 as Long

/** `msg['args'][0]['x']`, as the Python side names a path. */
export function formatPath(path: readonly (string | number)[]): string {
  return "msg" + path.map((k) => (typeof k === "number" ? `[${k}]` : `['${k}']`)).join("");
}

class Writer {
  readonly objects: Entry[] = [];
  readonly media: OutgoingMedia[] = [];
  readonly capabilities: Capability[] = [];
  private readonly open = new Set<object>();

  constructor(private readonly mediaPrefix: string) {}

  value(v: unknown, path: (string | number)[]): unknown {
    switch (typeof v) {
      case "string":
      case "boolean":
        return v;
      case "undefined":
        return null;
      case "number":
        if (Number.isFinite(v)) {
          return v;
        }
        this.objects.push({ type: ["Float"], path, value: Number.isNaN(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity" });
        return null;
      case "bigint":
        if (v >= -INT_LIMIT && v <= INT_LIMIT) {
          return Number(v);
        }
        this.objects.push({ type: ["Long"], path, value: v.toString() });
        return null;
      case "object":
        return v === null ? null : this.object(v, path);
      default:
        throw serializationError(`Cannot serialize a ${typeof v} at ${formatPath(path)}`);
    }
  }

  private object(v: object, path: (string | number)[]): unknown {
    const special = this.special(v, path);
    if (special !== undefined) {
      return null;
    }
    if (!isContainer(v) && !(v instanceof PortableValue)) {
      const name = (v as { constructor?: { name?: string } }).constructor?.name ?? "Object";
      throw serializationError(`Cannot serialize a ${name} object at ${formatPath(path)}`);
    }
    if (this.open.has(v)) {
      throw serializationError(`Cannot serialize a value that contains itself at ${formatPath(path)}`);
    }
    this.open.add(v);
    try {
      const body = v instanceof PortableValue ? this.value(v.data, path) : this.container(v, path);
      const typeName = typeNameOf(v);
      if (typeName !== undefined) {
        this.objects.push({ type: ["ValueType"], path, typeName });
      }
      return body;
    } finally {
      this.open.delete(v);
    }
  }

  private container(v: object, path: (string | number)[]): unknown {
    if (Array.isArray(v)) {
      return v.map((item, i) => this.value(item, [...path, i]));
    }
    const record = v as Record<string, unknown>;
    const keys = Object.keys(record);
    const out: Record<string, unknown> = {};
    for (const key of keys) {
      out[key] = null; // the body keeps the object's own order
    }
    for (const key of [...keys].sort()) {
      out[key] = this.value(record[key], [...path, key]);
    }
    return out;
  }

  /** Entries for values that are not containers; `undefined` if *v* is not one of them. */
  private special(v: object, path: (string | number)[]): true | undefined {
    if (v instanceof DateOnly) {
      this.objects.push({ type: ["Date"], path, value: v.toWire() });
    } else if (v instanceof Date) {
      this.objects.push({ type: ["DateTime"], path, value: formatDateTime(v) });
    } else if (v instanceof Capability) {
      const entry: Entry = { type: ["Capability"], path, scope: [...v.baseScope], mac: v.mac };
      if (v.narrowed.length) {
        entry.narrow = [...v.narrowed];
      }
      this.objects.push(entry);
      this.capabilities.push(v);
    } else if (typeof Blob !== "undefined" && v instanceof Blob) {
      const id = `${this.mediaPrefix}${this.media.length}`;
      const name = (v as Blob & { name?: unknown }).name;
      const entry: Entry = { type: ["DataMedia"], path, "mime-type": v.type || "application/octet-stream", name: typeof name === "string" ? name : null, id };
      this.objects.push(entry);
      this.media.push({ id, blob: v });
    } else if (v instanceof LiveObject) {
      this.objects.push({ ...v.spec, type: ["LiveObject"], path });
    } else if (v instanceof LazyMedia) {
      this.objects.push({ ...v.spec, type: ["LazyMedia"], path });
    } else if (v instanceof PortableClass) {
      this.objects.push({ type: ["ClassType"], path, typeName: v.typeName });
    } else {
      return undefined;
    }
    return true;
  }
}

/**
 * Serialise the values of a message: *values* maps top-level keys (`args`, `kwargs`) to
 * values. Media ids are *mediaPrefix* followed by a counter.
 *
 * @throws AnvilError of type `anvil.server.SerializationError`, naming the path.
 */
export function serialise(values: Record<string, unknown>, mediaPrefix = "m"): Encoded {
  const writer = new Writer(mediaPrefix);
  const json: Record<string, unknown> = {};
  for (const key of Object.keys(values)) {
    json[key] = writer.value(values[key], [key]);
  }
  return { json, objects: writer.objects, media: writer.media, capabilities: writer.capabilities };
}

/** Received media content, by entry id. */
export type MediaContent = Map<string, Blob>;

/** The media ids a message's entries refer to (what must arrive before it can be read). */
export function mediaIds(msg: { objects?: unknown }): string[] {
  const objects = Array.isArray(msg.objects) ? msg.objects : [];
  return objects
    .filter((e) => e && Array.isArray(e.type) && e.type[0] === "DataMedia" && typeof e.id === "string")
    .map((e) => e.id as string);
}

class Reader {
  private readonly methods = new Map<string, string[]>(); // per backend, in this message

  constructor(
    private readonly media: MediaContent,
    private readonly invoker: LiveInvoker | null,
  ) {}

  build(entry: Entry, current: unknown): unknown {
    const kind = entry.type.find((t) => KNOWN.has(t));
    switch (kind) {
      case "Long":
        return BigInt(String(entry.value));
      case "Float":
        return floatOf(entry.value);
      case "Date":
        return DateOnly.fromString(String(entry.value)) ?? bad(entry, "a date");
      case "DateTime":
        return entry.value === null ? null : (parseDateTime(String(entry.value)) ?? bad(entry, "a datetime"));
      case "DataMedia":
        return this.blob(entry);
      case "Capability":
        return new Capability(asList(entry.scope, entry), (entry.mac as string | null) ?? null, entry.narrow ? asList(entry.narrow, entry) : []);
      case "ValueType":
        return portable(String(entry.typeName), current);
      case "ClassType":
        return new PortableClass(String(entry.typeName));
      case "LiveObject":
        return this.liveObject(entry);
      case "LazyMedia":
        return new LazyMedia(withoutPlace(entry));
      default:
        throw serializationError(`No way to read an object of type ${JSON.stringify(entry.type)}`);
    }
  }

  private blob(entry: Entry): Blob {
    const content = this.media.get(String(entry.id)) ?? bad(entry, "media that arrived");
    const type = (entry["mime-type"] as string | null) ?? "";
    const name = entry.name;
    if (typeof name === "string") {
      if (typeof File === "function") {
        return new File([content], name, { type });
      }
      const blob = new Blob([content], { type });
      Object.defineProperty(blob, "name", { value: name, enumerable: true });
      return blob;
    }
    return content.type === type ? content : new Blob([content], { type });
  }

  private liveObject(entry: Entry): LiveObject {
    const spec = withoutPlace(entry) as LiveObjectSpec;
    if (Array.isArray(spec.methods)) {
      this.methods.set(spec.backend, spec.methods);
    } else if (this.methods.has(spec.backend)) {
      spec.methods = this.methods.get(spec.backend); // omitted: as the previous one's
    }
    return new LiveObject(spec, this.invoker);
  }
}

const KNOWN = new Set([
  "Long", "Float", "Date", "DateTime", "DataMedia", "Capability", "ValueType", "ClassType",
  "LiveObject", "LazyMedia",
]);

/**
 * Rebuild, in place, the values of a freshly parsed message *msg* from its `objects` entries.
 * *media* holds the content of its `DataMedia` entries; *invoker* runs live-object methods.
 *
 * @throws AnvilError of type `anvil.server.SerializationError` for a malformed entry.
 */
export function deserialise(
  msg: Record<string, unknown>,
  media: MediaContent = new Map(),
  invoker: LiveInvoker | null = null,
): Record<string, unknown> {
  const objects = msg.objects;
  if (objects === undefined || objects === null) {
    return msg;
  }
  if (!Array.isArray(objects)) {
    throw serializationError("objects is not a list");
  }
  const reader = new Reader(media, invoker);
  for (const entry of objects as Entry[]) {
    if (!entry || !Array.isArray(entry.type) || !Array.isArray(entry.path) || !entry.path.length) {
      throw serializationError(`Malformed object entry ${JSON.stringify(entry)}`);
    }
    const parent = walk(msg, entry.path.slice(0, -1), entry);
    const last = entry.path[entry.path.length - 1];
    (parent as Record<string | number, unknown>)[last] = reader.build(
      entry,
      (parent as Record<string | number, unknown>)[last],
    );
  }
  return msg;
}

function walk(root: unknown, path: (string | number)[], entry: Entry): object {
  let node = root;
  for (const key of path) {
    if (node === null || typeof node !== "object") {
      break;
    }
    node = (node as Record<string | number, unknown>)[key];
  }
  if (node === null || typeof node !== "object") {
    bad(entry, "a path that leads into the message");
  }
  return node as object;
}

function floatOf(value: unknown): number {
  if (value === "NaN") return NaN;
  if (value === "Infinity" || value === "inf") return Infinity;
  if (value === "-Infinity" || value === "-inf") return -Infinity;
  const n = Number(value);
  if (Number.isNaN(n)) {
    throw serializationError(`Malformed Float ${JSON.stringify(value)}`);
  }
  return n;
}

function asList(value: unknown, entry: Entry): unknown[] {
  return Array.isArray(value) ? value : bad(entry, "a list");
}

function withoutPlace(entry: Entry): Record<string, unknown> {
  const { type: _type, path: _path, ...rest } = entry;
  return rest;
}

function bad(entry: Entry, wanted: string): never {
  throw new AnvilError(
    "anvil.server.SerializationError",
    `Malformed ${entry.type[0]} entry at ${formatPath(entry.path)}: expected ${wanted}`,
  );
}
