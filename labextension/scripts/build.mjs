// Builds the browser client, src/client/index.ts, into ONE ES module,
// ../anvil_nb/static/client.js (what {app root}_/client.js serves), with esbuild.
//
//   node scripts/build.mjs                  the client (npm run build; pip install runs it)
//   node scripts/build.mjs --tests OUTDIR   only the tests: test/*.test.ts as OUTDIR/*.test.mjs
//
// esbuild strips the types and does not check them.
import { readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const outfile = resolve(here, "..", "anvil_nb", "static", "client.js");

const at = process.argv.indexOf("--tests");
if (at < 0) {
  await build({
    entryPoints: [join(here, "src", "client", "index.ts")],
    outfile,
    bundle: true,
    format: "esm",
    target: "es2020",
    minify: true,
    legalComments: "none",
    banner: { js: "// anvil_nb browser client: built from labextension/src/client (docs/browser.md)" },
    logLevel: "warning",
  });
} else {
  const outdir = resolve(process.argv[at + 1] ?? join(here, "build", "test"));
  const tests = readdirSync(join(here, "test")).filter((f) => f.endsWith(".test.ts"));
  await build({
    entryPoints: tests.map((f) => join(here, "test", f)),
    outdir,
    outExtension: { ".js": ".mjs" },
    bundle: true,
    format: "esm",
    platform: "node",
    target: "node20",
    logLevel: "warning",
  });
}
