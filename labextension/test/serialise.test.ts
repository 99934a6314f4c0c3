// The client's serialisation against EVERY wire vector recorded from the real anvil-uplink
// 0.7.0 client (shared/vectors/uplink-0.7.0.json), plus what the vectors do not cover:
// capabilities' narrow, datetimes with offsets, media, errors.
//
// For each vector: reading its wire gives the value the table EXPECTED says (a vector missing
// from the table fails), and writing that value gives the same body and the same entries, in
// an order PROTOCOL.md §4 allows (a portable object's nested entries before its own).
//
// The vectors file: $ANVIL_NB_VECTORS, else ../shared/vectors/ from the repo root (the cwd).
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { resolve } from "node:path";
import { test } from "node:test";

import { deserialise, serialise, type Entry } from "../src/client/serialise";
import {
  AnvilError,
  Capability,
  DateOnly,
  LiveObject,
  PortableClass,
  portable,
  typeNameOf,
  utcOffsetOf,
} from "../src/client/values";

function vectorsFile(): string {
  const candidates = [
    process.env.ANVIL_NB_VECTORS,
    resolve("..", "shared", "vectors", "uplink-0.7.0.json"),
    resolve("..", "..", "shared", "vectors", "uplink-0.7.0.json"),
  ].filter((p): p is string => !!p);
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`wire vectors not found; looked for ${candidates.join(", ")}`);
  return found;
}

interface Vector {
  name: string;
  expr: string;
  wire: { id: string; response: unknown; objects: Entry[] };
}

const DATA = JSON.parse(readFileSync(vectorsFile(), "utf8")) as { vectors: Vector[] };
const MEDIA: Record<string, string> = { m0: "hello" }; // the bytes sent beside the media vector

const utc = (iso: string) => new Date(iso);
const point = (x: unknown, y: unknown) => portable("vec.Point", { x, y });

/** The JavaScript value each vector's expression becomes. */
const EXPECTED: Record<string, () => unknown> = {
  primitives: () => ({ s: "héllo", i: 7, f: 1.5, b: true, n: null, l: [1, "two", 3.0] }),
  "tuple becomes list": () => [1, 2, [3, 4]],
  "long ints": () => [2n ** 31n, -(2n ** 31n) - 1n, 2n ** 64n, 2147483647],
  "non-finite floats": () => [NaN, Infinity, -Infinity],
  date: () => new DateOnly(2024, 2, 29),
  "aware datetime": () => [utc("2024-02-29T07:44:15.123Z"), 330],
  "negative offset datetime": () => [utc("2002-01-01T07:59:59.000Z"), -480],
  "utc datetime": () => [utc("2020-01-01T00:00:00.000Z"), 0],
  "portable instance": () => point(1, 2),
  "nested portable instances": () => ({ p: point(point(0, 0), [point(1, 1)]) }),
  "portable class itself": () => new PortableClass("vec.Point"),
  "custom __serialize__": () => portable("vec.Pair", [new DateOnly(2020, 1, 2), { k: [1] }]),
  "capability without mac": () => new Capability(["doc", 42], null),
  "narrowed capability": () => new Capability(["doc", 42], "abc").narrow(["page", 1]),
  "media descriptor": () => named(new Blob(["hello"], { type: "text/plain" }), "h.txt"),
  "dict keys sorted": () => ({ b: new DateOnly(2020, 1, 1), a: new DateOnly(2021, 1, 1) }),
};

function named(blob: Blob, name: string): Blob {
  if (typeof File === "function") return new File([blob], name, { type: blob.type });
  Object.defineProperty(blob, "name", { value: name, enumerable: true });
  return blob;
}

/** Deep equality that knows the client's value types (media bytes compared too). */
async function assertSame(actual: unknown, expected: unknown, where = "value"): Promise<void> {
  assert.equal(typeNameOf(actual), typeNameOf(expected), `${where}: portable type`);
  if (expected instanceof Date) {
    assert.ok(actual instanceof Date, `${where}: a Date`);
    assert.equal(actual instanceof DateOnly, expected instanceof DateOnly, `${where}: DateOnly`);
    assert.equal(actual.getTime(), expected.getTime(), `${where}: time`);
  } else if (expected instanceof Blob) {
    assert.ok(actual instanceof Blob, `${where}: a Blob`);
    assert.equal(actual.type, expected.type);
    assert.equal((actual as { name?: string }).name, (expected as { name?: string }).name);
    assert.equal(await actual.text(), await expected.text());
  } else if (expected instanceof Capability) {
    assert.ok(actual instanceof Capability, `${where}: a Capability`);
    assert.deepEqual([actual.baseScope, actual.mac, actual.narrowed], [expected.baseScope, expected.mac, expected.narrowed]);
  } else if (expected instanceof PortableClass) {
    assert.ok(actual instanceof PortableClass);
    assert.equal(actual.typeName, expected.typeName);
  } else if (Array.isArray(expected)) {
    assert.ok(Array.isArray(actual), `${where}: an array`);
    assert.equal(actual.length, expected.length, `${where}: length`);
    for (let i = 0; i < expected.length; i++) await assertSame(actual[i], expected[i], `${where}[${i}]`);
  } else if (expected !== null && typeof expected === "object") {
    assert.ok(actual !== null && typeof actual === "object", `${where}: an object`);
    assert.deepEqual(Object.keys(actual as object), Object.keys(expected), `${where}: keys`);
    for (const k of Object.keys(expected)) {
      await assertSame((actual as Record<string, unknown>)[k], (expected as Record<string, unknown>)[k], `${where}.${k}`);
    }
  } else {
    assert.ok(Object.is(actual, expected), `${where}: ${String(actual)} is not ${String(expected)}`);
  }
}

const canonical = (v: unknown): string =>
  JSON.stringify(v, (_k, x) =>
    x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort()) : x,
  );

/** Same entries as a multiset, and children before parents. */
function assertSameEntries(actual: Entry[], expected: Entry[]): void {
  assert.deepEqual(actual.map(canonical).sort(), expected.map(canonical).sort());
  actual.forEach((entry, i) => {
    if (entry.type[0] !== "ValueType") return;
    actual.forEach((other, j) => {
      const inside = other.path.length > entry.path.length && entry.path.every((k, n) => other.path[n] === k);
      if (inside) assert.ok(j < i, `${canonical(other)} must come before ${canonical(entry)}`);
    });
  });
}

function read(vector: Vector): unknown {
  const msg = JSON.parse(JSON.stringify(vector.wire)); // a freshly parsed message
  const media = new Map(Object.entries(MEDIA).map(([id, text]) => [id, new Blob([text])]));
  return deserialise(msg, media).response;
}

test("every vector has an expected value", () => {
  const missing = DATA.vectors.map((v) => v.name).filter((n) => !(n in EXPECTED));
  assert.deepEqual(missing, [], "vectors this test does not know yet");
  assert.ok(DATA.vectors.length >= 16);
});

for (const vector of DATA.vectors) {
  test(`vector: ${vector.name}`, async () => {
    const expected = EXPECTED[vector.name]?.();
    assert.notEqual(expected, undefined, "no expected value");
    const value = read(vector);
    if (vector.name.endsWith("datetime")) {
      const [date, offset] = expected as [Date, number];
      await assertSame(value, date);
      assert.equal(utcOffsetOf(value as Date), offset, "the offset it arrived with");
    } else {
      await assertSame(value, expected);
    }
    // write what was read: the same body and entries as the real client
    const again = serialise({ response: value }, "m");
    assert.deepEqual(JSON.parse(JSON.stringify(again.json.response)), vector.wire.response);
    assertSameEntries(again.objects, vector.wire.objects);
    // and write the value built here (not one that was read): the same entries too
    if (!vector.name.endsWith("datetime")) {
      const built = serialise({ response: expected }, "m");
      assert.deepEqual(JSON.parse(JSON.stringify(built.json.response)), vector.wire.response);
      assertSameEntries(built.objects, vector.wire.objects);
    }
  });
}

test("a capability narrowed keeps its scope and MAC and appends to narrow", () => {
  const cap = new Capability(["files", 42], "mac1");
  const narrower = cap.narrow(["read"]).narrow([7]);
  assert.deepEqual(narrower.scope, ["files", 42, "read", 7]);
  assert.deepEqual(cap.scope, ["files", 42], "narrow() makes a new capability");
  const { objects, capabilities } = serialise({ args: [narrower, cap], kwargs: {} });
  assert.deepEqual(objects, [
    { type: ["Capability"], path: ["args", 0], scope: ["files", 42], mac: "mac1", narrow: ["read", 7] },
    { type: ["Capability"], path: ["args", 1], scope: ["files", 42], mac: "mac1" },
  ]);
  assert.deepEqual(capabilities, [narrower, cap]);
  assert.equal(narrower.key, '["files",42,"read",7]');
  assert.throws(() => cap.narrow("x" as unknown as unknown[]), TypeError);
});

test("a received capability reads back with its scope, MAC and narrow", () => {
  const msg = { response: { c: null }, objects: [{ type: ["Capability"], path: ["response", "c"], scope: ["_", "x"], mac: "m" }] };
  const cap = deserialise(msg).response as { c: Capability };
  assert.ok(cap.c instanceof Capability);
  assert.deepEqual([cap.c.scope, cap.c.mac], [["_", "x"], "m"]);
});

test("datetimes carry their offset; a new Date goes in the browser's local offset", () => {
  const received = deserialise({
    response: null,
    objects: [{ type: ["DateTime"], value: "2024-07-01 23:30:00.000250-0330", path: ["response"] }],
  }).response as Date;
  assert.equal(received.toISOString(), "2024-07-02T03:00:00.000Z");
  assert.equal(utcOffsetOf(received), -210);
  assert.equal(serialise({ r: received }).objects[0].value, "2024-07-01 23:30:00.000250-0330");
  received.setTime(received.getTime() + 1); // changed: the received offset and micros no longer apply
  const local = new Date(2024, 0, 15, 9, 5, 7, 89);
  for (const date of [received, local]) {
    const value = serialise({ r: date }).objects[0].value as string;
    const offset = -date.getTimezoneOffset();
    const sign = offset < 0 ? "-" : "+";
    const hhmm = `${String(Math.floor(Math.abs(offset) / 60)).padStart(2, "0")}${String(Math.abs(offset) % 60).padStart(2, "0")}`;
    assert.match(value, /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}[+-]\d{4}$/);
    assert.ok(value.endsWith(sign + hhmm), `${value} is in the local offset ${sign}${hhmm}`);
    const back = deserialise({ response: null, objects: [{ type: ["DateTime"], value, path: ["response"] }] }).response as Date;
    assert.equal(back.getTime(), date.getTime());
  }
  assert.equal(serialise({ r: local }).objects[0].value, `2024-01-15 09:05:07.089000${serialise({ r: local }).objects[0].value.slice(-5)}`);
  // naive: read as local time
  const naive = deserialise({ response: null, objects: [{ type: ["DateTime"], value: "2024-01-15 09:05:07.089000", path: ["response"] }] }).response as Date;
  assert.equal(naive.getTime(), local.getTime());
  assert.equal(utcOffsetOf(naive), null);
  assert.throws(() => serialise({ r: new Date(NaN) }), AnvilError);
});

test("date-only values are DateOnly, a Date at local midnight", () => {
  const d = new DateOnly(2024, 2, 29);
  assert.ok(d instanceof Date);
  assert.deepEqual([d.getFullYear(), d.getMonth(), d.getDate(), d.getHours()], [2024, 1, 29, 0]);
  assert.equal(d.toWire(), "2024-02-29");
  assert.equal(DateOnly.fromDate(new Date(2001, 11, 31, 23, 59)).toWire(), "2001-12-31");
  assert.equal(new DateOnly(5, 1, 1).toWire(), "0005-01-01");
});

test("media: a Blob becomes a DataMedia entry with an id per message", () => {
  const file = named(new Blob([new Uint8Array([1, 2, 3])], { type: "image/png" }), "a.png");
  const { objects, media } = serialise({ args: [file, new Blob([])], kwargs: {} }, "req_");
  assert.deepEqual(objects, [
    { type: ["DataMedia"], path: ["args", 0], "mime-type": "image/png", name: "a.png", id: "req_0" },
    { type: ["DataMedia"], path: ["args", 1], "mime-type": "application/octet-stream", name: null, id: "req_1" },
  ]);
  assert.deepEqual(media.map((m) => m.id), ["req_0", "req_1"]);
});

test("numbers: bigints within 32 bits are plain, others Long; non-finite floats are Float", () => {
  const { json, objects } = serialise({ r: [5n, 2n ** 40n, 2 ** 40, -0.5, -Infinity] });
  assert.deepEqual(json.r, [5, null, 2 ** 40, -0.5, null]);
  assert.deepEqual(objects, [
    { type: ["Long"], path: ["r", 1], value: "1099511627776" },
    { type: ["Float"], path: ["r", 4], value: "-Infinity" },
  ]);
});

test("values JavaScript has and the wire does not are refused, naming the path", () => {
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  const cases: [unknown, RegExp][] = [
    [new Map([[1, "a"]]), /Map object at msg\['args'\]\[0\]/],
    [() => 1, /function at msg\['args'\]\[0\]/],
    [{ a: [Symbol("s")] }, /symbol at msg\['args'\]\[0\]\['a'\]\[0\]/],
    [cyclic, /contains itself at msg\['args'\]\[0\]\['self'\]/],
    [new (class Thing {})(), /Thing object/],
  ];
  for (const [value, message] of cases) {
    assert.throws(
      () => serialise({ args: [value], kwargs: {} }),
      (e: unknown) => e instanceof AnvilError && e.type === "anvil.server.SerializationError" && message.test(e.message),
    );
  }
  // shared (not cyclic) references are copied, as every crossing copies
  const shared = { n: 1 };
  assert.deepEqual(serialise({ r: [shared, shared] }).json.r, [{ n: 1 }, { n: 1 }]);
});

test("live objects: methods as calls; methods omitted for a later object of the same backend", async () => {
  const calls: unknown[] = [];
  const spec = { backend: "anvil.private.BackgroundTask", id: '"t1"', permissions: [], mac: "x", itemCache: {} };
  const msg = {
    response: [null, null],
    objects: [
      { type: ["LiveObject"], path: ["response", 0], ...spec, methods: ["get_state", "get_return_value"] },
      { type: ["LiveObject"], path: ["response", 1], ...spec, id: '"t2"' },
    ],
  };
  const [a, b] = deserialise(msg, new Map(), async (s, method, args) => {
    calls.push([s.id, method, args]);
    return { progress: 1 };
  }).response as LiveObject[];
  assert.ok(a instanceof LiveObject && b instanceof LiveObject);
  assert.deepEqual(b.methods, ["get_state", "get_return_value"]);
  assert.deepEqual(await (b.get_state as () => Promise<unknown>)(), { progress: 1 });
  await a.call("get_return_value", 1);
  assert.deepEqual(calls, [['"t2"', "get_state", []], ['"t1"', "get_return_value", [1]]]);
  // passed back as received
  const entry = serialise({ r: a }).objects[0];
  assert.deepEqual(entry, { ...spec, methods: ["get_state", "get_return_value"], type: ["LiveObject"], path: ["r"] });
});
