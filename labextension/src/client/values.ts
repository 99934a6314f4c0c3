/**
 * The JavaScript faces of the values that plain JSON cannot carry (PROTOCOL.md §4).
 *
 * | wire entry   | JavaScript                                                          |
 * | ------------ | ------------------------------------------------------------------- |
 * | `DateTime`   | `Date` (the received offset and microseconds are remembered)        |
 * | `Date`       | `DateOnly`, a `Date` at local midnight of that calendar day         |
 * | `Long`       | `bigint` (a `bigint` within ±2147483647 is sent as a plain number)  |
 * | `Float`      | `NaN`, `Infinity`, `-Infinity`                                      |
 * | `DataMedia`  | `Blob` (`File` when the media has a name)                           |
 * | `Capability` | `Capability`                                                        |
 * | `ValueType`  | the portable object's data, tagged with its type name (`typeNameOf`) |
 * | `ClassType`  | `PortableClass`                                                     |
 * | `LiveObject` | `LiveObject` (its methods are calls to the host)                    |
 * | `LazyMedia`  | `LazyMedia` (kept as received, passed back as received)             |
 */

/** The error every failed call rejects with: `type` is the remote class name. */
export class AnvilError extends Error {
  /** The remote class name, e.g. `anvil.server.PermissionDenied` or `ValueError`. */
  readonly type: string;
  /** `[[filename, line], ...]`, innermost first, when the host sent one. */
  readonly trace: unknown[];

  constructor(type: string, message: string, trace: unknown[] = []) {
    super(message);
    this.type = type;
    this.name = type;
    this.trace = trace;
  }
}

/** A value the client cannot put on the wire (a function, a `Map`, a cycle, ...). */
export function serializationError(message: string): AnvilError {
  return new AnvilError("anvil.server.SerializationError", message);
}

/**
 * A calendar date without a time (the wire's `Date`, Python's `datetime.date`).
 *
 * It is a `Date` at local midnight of that day, so `getFullYear()`, `getMonth()` and
 * `getDate()` give the day; it is sent back as the same day.
 */
export class DateOnly extends Date {
  /** `new DateOnly(2024, 2, 29)`: *month* counts from 1, as on the wire. */
  constructor(year: number, month: number, day: number) {
    super(year, month - 1, day);
    this.setFullYear(year); // years 0..99 are not 1900..1999
  }

  /** `DateOnly.parse("2024-02-29")`; `null` for anything else. */
  static fromString(text: string): DateOnly | null {
    const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(text);
    return m ? new DateOnly(Number(m[1]), Number(m[2]), Number(m[3])) : null;
  }

  /** The day of a `Date`, in local time. */
  static fromDate(date: Date): DateOnly {
    return new DateOnly(date.getFullYear(), date.getMonth() + 1, date.getDate());
  }

  /** `"2024-02-29"`. */
  toWire(): string {
    return `${pad(this.getFullYear(), 4)}-${pad(this.getMonth() + 1)}-${pad(this.getDate())}`;
  }
}

/**
 * A capability: an unforgeable, narrowable right the host minted (PROTOCOL.md §6).
 *
 * Pass it back as an argument to prove the right. `narrow(suffix)` makes a narrower one that
 * keeps the original scope and MAC (the host checks the MAC against the original scope), as
 * Anvil's own client does. Updates a server function sends with `cap.send_update(...)` reach
 * the capability *object* that was passed into that call: see `onUpdate`.
 */
export class Capability {
  /** The scope the host signed. */
  readonly baseScope: readonly unknown[];
  /** The host's MAC over `baseScope` (opaque). */
  readonly mac: string | null;
  /** What `narrow()` appended. */
  readonly narrowed: readonly unknown[];
  private readonly handlers = new Set<(update: unknown) => void>();

  constructor(scope: unknown[], mac: string | null = null, narrowed: unknown[] = []) {
    if (!Array.isArray(scope) || !Array.isArray(narrowed)) {
      throw new TypeError("a capability's scope is a list");
    }
    this.baseScope = Object.freeze([...scope]);
    this.mac = mac;
    this.narrowed = Object.freeze([...narrowed]);
  }

  /** The full scope: the signed scope followed by everything narrowed. */
  get scope(): unknown[] {
    return [...this.baseScope, ...this.narrowed];
  }

  /** A capability for `scope + suffix`, with the same signed scope and MAC. */
  narrow(suffix: unknown[]): Capability {
    if (!Array.isArray(suffix)) {
      throw new TypeError("narrow() takes a list");
    }
    return new Capability([...this.baseScope], this.mac, [...this.narrowed, ...suffix]);
  }

  /** Call *handler* with each update a server function sends for this capability (after a call
   * this object was passed into returns). Returns a function that removes the handler. */
  onUpdate(handler: (update: unknown) => void): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  /** @internal Deliver an update to this object's handlers. */
  deliver(update: unknown): void {
    for (const handler of [...this.handlers]) {
      handler(update);
    }
  }

  /** The `capUpdates` key of this capability (its full scope as canonical JSON). */
  get key(): string {
    return JSON.stringify(this.scope);
  }
}

/** A portable class itself (the wire's `ClassType`). */
export class PortableClass {
  constructor(readonly typeName: string) {
    Object.freeze(this);
  }
}

/** The spec of a live object, as the host sent it. */
export interface LiveObjectSpec {
  backend: string;
  id: string;
  mac?: string | null;
  permissions?: unknown;
  methods?: string[];
  itemCache?: Record<string, unknown>;
  iterItems?: unknown;
  [other: string]: unknown;
}

/** Runs a method of a live object on the host (what `Client.liveObjectCall` does). */
export type LiveInvoker = (
  spec: LiveObjectSpec,
  method: string,
  args: unknown[],
  kwargs: Record<string, unknown>,
) => Promise<unknown>;

/**
 * A live object held by the host, e.g. a background task. Each name in `methods` is a method
 * returning a Promise (`await task.get_state()`); `call(method, ...args)` calls any of them.
 */
export class LiveObject {
  readonly spec: LiveObjectSpec;
  readonly methods: readonly string[];
  [method: string]: unknown;

  constructor(spec: LiveObjectSpec, invoker: LiveInvoker | null) {
    this.spec = spec;
    this.methods = Object.freeze([...(spec.methods ?? [])]);
    Object.defineProperty(this, "invoker", { value: invoker, enumerable: false });
    for (const name of this.methods) {
      if (!(name in this)) {
        Object.defineProperty(this, name, {
          value: (...args: unknown[]) => this.call(name, ...args),
          enumerable: false,
        });
      }
    }
  }

  /** The backend, e.g. `anvil.private.BackgroundTask`. */
  get backend(): string {
    return this.spec.backend;
  }

  /** Call *method* with positional arguments. */
  call(method: string, ...args: unknown[]): Promise<unknown> {
    return this.callWithKwargs(method, args, {});
  }

  /** Call *method* with positional and keyword arguments. */
  callWithKwargs(
    method: string,
    args: unknown[] = [],
    kwargs: Record<string, unknown> = {},
  ): Promise<unknown> {
    const invoker = (this as unknown as { invoker: LiveInvoker | null }).invoker;
    if (!invoker) {
      return Promise.reject(new AnvilError("anvil.server.InternalError", "no connection"));
    }
    return invoker(this.spec, method, args, kwargs);
  }
}

/** Media the host keeps and serves by reference (the wire's `LazyMedia`); passed back as is. */
export class LazyMedia {
  constructor(readonly spec: Record<string, unknown>) {}

  get contentType(): string | null {
    return (this.spec["mime-type"] as string | undefined) ?? null;
  }

  get name(): string | null {
    return (this.spec.name as string | undefined) ?? null;
  }
}

/** A portable value whose data is not an object or array (rare: a custom `__serialize__`). */
export class PortableValue {
  constructor(
    readonly typeName: string,
    readonly data: unknown,
  ) {}
}

const typeNames = new WeakMap<object, string>();

/**
 * A portable class instance to send: *data* is what the class's `__deserialize__` (or its
 * `__dict__`) receives, e.g. `portable("vec.Point", {x: 1, y: 2})`. An object or array is
 * tagged and returned as it is; anything else is wrapped in a `PortableValue`.
 */
export function portable<T>(typeName: string, data: T): T | PortableValue {
  if (typeof typeName !== "string" || !typeName) {
    throw new TypeError("a portable class needs its type name");
  }
  if (data !== null && typeof data === "object" && isContainer(data)) {
    typeNames.set(data as object, typeName);
    return data;
  }
  const wrapped = new PortableValue(typeName, data);
  typeNames.set(wrapped, typeName);
  return wrapped;
}

/** The portable class name of a received (or `portable()`) value; `undefined` otherwise. */
export function typeNameOf(value: unknown): string | undefined {
  if (value === null || typeof value !== "object") {
    return undefined;
  }
  return typeNames.get(value as object);
}

/** A plain object (`{...}`) or an array: what is walked key by key. */
export function isContainer(value: object): boolean {
  if (Array.isArray(value)) {
    return true;
  }
  const proto = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

/** What a received `DateTime` said beyond what a `Date` holds. */
interface DateTimeDetail {
  time: number; // the Date's time when it was received: a changed Date forgets the rest
  offset: number | null; // minutes east of UTC; null: naive
  micros: number; // 0..999, below the millisecond
}

const dateTimeDetails = new WeakMap<Date, DateTimeDetail>();

/**
 * Parse a wire `DateTime` (`"2024-01-31 12:30:05.123456+0100"`, fixed layout; without an
 * offset it is naive and read as local time). Returns `null` if it does not fit.
 */
export function parseDateTime(text: string): Date | null {
  const m =
    /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{6}))?(?:([+-])(\d{2}):?(\d{2}))?$/.exec(
      text,
    );
  if (!m) {
    return null;
  }
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map(Number);
  const micro = m[7] ? Number(m[7]) : 0;
  const ms = Math.floor(micro / 1000);
  let date: Date;
  let offset: number | null = null;
  if (m[8]) {
    offset = (m[8] === "-" ? -1 : 1) * (Number(m[9]) * 60 + Number(m[10]));
    const utc = new Date(0);
    utc.setUTCFullYear(y, mo - 1, d);
    utc.setUTCHours(h, mi, s, ms);
    date = new Date(utc.getTime() - offset * 60_000);
  } else {
    date = new Date(2000, 0, 1);
    date.setFullYear(y, mo - 1, d);
    date.setHours(h, mi, s, ms);
  }
  dateTimeDetails.set(date, { time: date.getTime(), offset, micros: micro % 1000 });
  return date;
}

/**
 * The wire `DateTime` of a `Date`: in the offset it was received with (with its microseconds)
 * if it is unchanged since, otherwise in the browser's own offset, as Anvil's client does.
 */
export function formatDateTime(date: Date): string {
  const time = date.getTime();
  if (Number.isNaN(time)) {
    throw serializationError("Cannot serialize an invalid Date");
  }
  const detail = dateTimeDetails.get(date);
  const fresh = detail !== undefined && detail.time === time;
  const offset = fresh && detail.offset !== null ? detail.offset : -date.getTimezoneOffset();
  const micros = fresh ? detail.micros : 0;
  const shifted = new Date(time + offset * 60_000);
  const sign = offset < 0 ? "-" : "+";
  const abs = Math.abs(offset);
  return (
    `${pad(shifted.getUTCFullYear(), 4)}-${pad(shifted.getUTCMonth() + 1)}-${pad(shifted.getUTCDate())} ` +
    `${pad(shifted.getUTCHours())}:${pad(shifted.getUTCMinutes())}:${pad(shifted.getUTCSeconds())}.` +
    `${pad(shifted.getUTCMilliseconds() * 1000 + micros, 6)}${sign}${pad(Math.floor(abs / 60))}${pad(abs % 60)}`
  );
}

/** The UTC offset (minutes east) a received `DateTime` carried; `null` if naive or not one. */
export function utcOffsetOf(date: Date): number | null {
  const detail = dateTimeDetails.get(date);
  return detail !== undefined && detail.time === date.getTime() ? detail.offset : null;
}

function pad(n: number, width = 2): string {
  return String(n).padStart(width, "0");
}
