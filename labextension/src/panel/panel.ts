/**
 * The "Server Functions" sidebar panel: the apps (keys, registry, running tasks), a form that
 * calls a function as an untrusted browser would, and the live call feed.
 *
 * Rendering is batched: the model marks sections dirty and they render at most every
 * RENDER_INTERVAL ms, each only when what it shows changed (so a button under the pointer is
 * not replaced by an identical one mid-click). Clicks are handled once, on the panel, by the
 * `data-action` of the element clicked.
 */
import { Clipboard } from "@jupyterlab/apputils";
import { Widget } from "@lumino/widgets";
import { type CallRow, nameKind, PanelModel, type Peer, type Section, type TaskInfo } from "./model.js";
import { clientUrl } from "./request.js";

/** Milliseconds between two renders, at most. */
const RENDER_INTERVAL = 100;
/** Milliseconds between two task polls while the panel is visible. */
const TASK_POLL = 1000;
/** Finished tasks shown per app, under the running ones. */
const FINISHED_TASKS = 3;

type Child = Node | string | null | undefined | false;

/** `h("td", {class: "x"}, "text", node)`: an element; attributes that are null are left out. */
function h(tag: string, attrs: Record<string, string | null | undefined> = {}, ...children: Child[]) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) el.setAttribute(k, v);
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

function json(value: unknown): string {
  return JSON.stringify(value, (_k, v) => (typeof v === "bigint" ? v.toString() : v), 2) ?? "undefined";
}

function clock(seconds: number): string {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function elapsed(task: TaskInfo): string {
  if (!task.started) return "—";
  const end = task.ended ?? Date.now() / 1000;
  return `${Math.max(0, end - task.started).toFixed(1)} s`;
}

export class ServerFunctionsPanel extends Widget {
  readonly model = new PanelModel();
  private dirty = new Set<Section>();
  private renderTimer: ReturnType<typeof setTimeout> | null = null;
  private pollTimer: ReturnType<typeof setInterval> | null = null;
  private shownKeys = new Set<string>();
  private openCall: string | null = null;
  private signatures = new Map<string, string>();
  private statusEl = h("span", { class: "anvil-nb-lab-status" });
  private errorEl = h("div", { class: "anvil-nb-lab-error", role: "alert" });
  private appsEl = h("div", { class: "anvil-nb-lab-apps" });
  private feedEl = h("tbody");
  private form = {
    app: h("select", { "aria-label": "App" }) as HTMLSelectElement,
    fn: h("select", { "aria-label": "Function" }) as HTMLSelectElement,
    args: h("textarea", { "aria-label": "Arguments (JSON)", rows: "2", spellcheck: "false" }) as HTMLTextAreaElement,
    result: h("pre", { class: "anvil-nb-lab-try-result", "aria-live": "polite" }),
  };

  constructor() {
    super();
    this.id = "anvil-nb-panel";
    this.addClass("anvil-nb-panel");
    this.title.caption = "Server Functions";
    this.form.args.value = "[]";
    this.buildSkeleton();
    this.node.addEventListener("click", (e) => this.onClick(e));
    this.form.app.addEventListener("change", () => this.fillFunctions());
    this.model.onChange = (section) => this.markDirty(section);
    this.model.start();
  }

  dispose(): void {
    if (this.isDisposed) return;
    this.model.dispose();
    this.stopPolling();
    if (this.renderTimer) clearTimeout(this.renderTimer);
    super.dispose();
  }

  protected onAfterShow(): void {
    this.startPolling();
    void this.model.refreshApps();
  }

  protected onAfterAttach(): void {
    if (this.isVisible) this.startPolling();
  }

  protected onBeforeHide(): void {
    this.stopPolling();
  }

  protected onBeforeDetach(): void {
    this.stopPolling();
  }

  private startPolling(): void {
    if (this.pollTimer !== null) return;
    void this.model.pollTasks();
    this.pollTimer = setInterval(() => void this.model.pollTasks(), TASK_POLL);
  }

  private stopPolling(): void {
    if (this.pollTimer !== null) clearInterval(this.pollTimer);
    this.pollTimer = null;
  }

  private buildSkeleton(): void {
    const call = h("button", { class: "jp-mod-styled jp-mod-accept", "data-action": "try", type: "button" }, "Call");
    this.node.append(
      h("header", { class: "anvil-nb-lab-header" }, h("h2", {}, "Server Functions"), this.statusEl),
      this.errorEl,
      this.appsEl,
      h(
        "section",
        { class: "anvil-nb-lab-try", "aria-label": "Try a call" },
        h("h3", {}, "Try a call"),
        h("p", { class: "anvil-nb-lab-hint" }, "As an untrusted browser, through the app's client.js. Arguments: a JSON list, or an object for keyword arguments."),
        h("div", { class: "anvil-nb-lab-try-row" }, this.form.app, this.form.fn),
        this.form.args,
        call,
        this.form.result,
      ),
      h(
        "section",
        { class: "anvil-nb-lab-feed", "aria-label": "Calls" },
        h("h3", {}, "Calls"),
        h(
          "table",
          { class: "anvil-nb-lab-calls" },
          h("thead", {}, h("tr", {}, ...["time", "app", "function", "caller", "trusted", "ms", "outcome"].map((t) => h("th", {}, t)))),
          this.feedEl,
        ),
      ),
    );
  }

  private markDirty(section: Section): void {
    this.dirty.add(section);
    if (this.renderTimer === null) {
      this.renderTimer = setTimeout(() => {
        this.renderTimer = null;
        this.render();
      }, RENDER_INTERVAL);
    }
  }

  /** Replace *el*'s children with *make()* unless the signature of what it shows is unchanged. */
  private renderIf(key: string, signature: unknown, el: Element, make: () => Child[]): void {
    const sig = json(signature);
    if (this.signatures.get(key) === sig) return;
    this.signatures.set(key, sig);
    el.replaceChildren(...(make().filter(Boolean) as (Node | string)[]));
  }

  private render(): void {
    const dirty = this.dirty;
    this.dirty = new Set();
    const m = this.model;
    if (dirty.has("status") || dirty.has("apps")) {
      this.statusEl.textContent = m.status === "live" ? "● live" : `○ ${m.status}`;
      this.statusEl.dataset.status = m.status;
      this.errorEl.textContent = m.error;
    }
    if (dirty.has("apps") || dirty.has("tasks")) this.renderApps();
    if (dirty.has("apps")) this.fillApps();
    if (dirty.has("feed")) this.renderFeed();
  }

  // -- apps -----------------------------------------------------------------------------------
  private renderApps(): void {
    const m = this.model;
    if (m.apps.length === 0) {
      this.renderIf("apps", "none", this.appsEl, () => [
        h("p", { class: "anvil-nb-lab-hint" }, "No apps yet: run %load_ext anvil_nb in a notebook."),
      ]);
      return;
    }
    // Each app is its own element, so a task poll re-renders only the tasks that changed.
    const existing = new Map([...this.appsEl.querySelectorAll<HTMLElement>(":scope > .anvil-nb-lab-app")].map((e) => [e.dataset.app!, e]));
    const els = m.apps.map((a) => existing.get(a.app) ?? h("section", { class: "anvil-nb-lab-app", "data-app": a.app }));
    if (els.some((e, i) => this.appsEl.children[i] !== e) || this.appsEl.children.length !== els.length) {
      this.appsEl.replaceChildren(...els);
      this.signatures.delete("apps");
    }
    m.apps.forEach((a, i) => {
      const el = els[i];
      if (el.children.length === 0) {
        el.append(h("div", { class: "anvil-nb-lab-app-info" }), h("ul", { class: "anvil-nb-lab-registry" }), h("ul", { class: "anvil-nb-lab-tasks" }));
      }
      const [info, registry, tasks] = [...el.children];
      const shown = this.shownKeys.has(a.app);
      this.renderIf(`info:${a.app}`, [a, shown], info, () => this.appInfo(a.app, a.url, a.uplink_url, a.client_key, a.server_key, shown));
      const state = m.states.get(a.app);
      this.renderIf(`registry:${a.app}`, state ?? null, registry, () => this.registry(state?.registrations ?? {}, state?.peers ?? []));
      const list = m.tasks.get(a.app) ?? [];
      const running = list.filter((t) => t.status === "running");
      const shownTasks = [...running, ...list.filter((t) => t.status !== "running").slice(0, FINISHED_TASKS)];
      const sig = shownTasks.map((t) => [t.id, t.status, t.state, t.ended]);
      this.renderIf(`tasks:${a.app}`, sig, tasks, () => this.taskRows(a.app, shownTasks));
    });
  }

  private appInfo(app: string, url: string, uplink: string, clientKey: string, serverKey: string, shown: boolean): Child[] {
    const copy = (what: string, value: string) =>
      h("button", { class: "anvil-nb-lab-icon-button", "data-action": "copy", "data-value": value, title: `Copy the ${what}`, "aria-label": `Copy the ${what} of ${app}` }, "copy");
    return [
      h("h3", { class: "anvil-nb-lab-app-name" }, app, " ", h("a", { href: url, target: "_blank", class: "anvil-nb-lab-hint" }, url)),
      h(
        "dl",
        { class: "anvil-nb-lab-keys" },
        h("dt", {}, "uplink"),
        h("dd", {}, h("code", {}, uplink), copy("uplink URL", uplink)),
        h("dt", {}, "client key"),
        h("dd", {}, h("code", { class: "anvil-nb-lab-client-key" }, clientKey), copy("client key", clientKey)),
        h("dt", {}, "server key"),
        h(
          "dd",
          {},
          h("code", { class: "anvil-nb-lab-server-key" }, shown ? serverKey : "•".repeat(12)),
          h("button", { class: "anvil-nb-lab-icon-button", "data-action": "toggle-key", "data-app": app, "aria-label": `${shown ? "Hide" : "Show"} the server key of ${app}` }, shown ? "hide" : "show"),
          copy("server key", serverKey),
        ),
      ),
    ];
  }

  private registry(registrations: Record<string, string[]>, peers: Peer[]): Child[] {
    const kinds = new Map(peers.map((p) => [p.name, p.label ? `${p.kind}: ${p.label}` : p.kind]));
    const names = Object.keys(registrations).sort();
    if (names.length === 0) return [h("li", { class: "anvil-nb-lab-hint" }, "nothing registered")];
    return names.map((name) => {
      const kind = nameKind(name);
      const providers = registrations[name].map((p) => `${p} (${kinds.get(p) ?? "gone"})`).join(", ");
      return h(
        "li",
        { class: "anvil-nb-lab-fn", "data-name": name, "data-kind": kind },
        kind !== "function" && h("span", { class: `anvil-nb-lab-badge anvil-nb-lab-badge-${kind}` }, kind === "http" ? "HTTP" : "task"),
        h("code", {}, name),
        h("span", { class: "anvil-nb-lab-providers" }, providers),
      );
    });
  }

  private taskRows(app: string, tasks: TaskInfo[]): Child[] {
    return tasks.map((t) =>
      h(
        "li",
        { class: "anvil-nb-lab-task", "data-task-id": t.id, "data-status": t.status },
        h("span", { class: "anvil-nb-lab-badge anvil-nb-lab-badge-task" }, "task"),
        h("code", {}, t.name),
        h("span", { class: "anvil-nb-lab-task-status" }, t.status),
        h("span", { class: "anvil-nb-lab-hint" }, elapsed(t)),
        t.state !== null && t.state !== undefined && h("code", { class: "anvil-nb-lab-task-state" }, json(t.state).replace(/\s+/g, " ")),
        t.status === "running" &&
          h("button", { class: "jp-mod-styled jp-mod-warn anvil-nb-lab-kill", "data-action": "kill", "data-app": app, "data-id": t.id, type: "button" }, "Kill"),
      ),
    );
  }

  // -- try a call -----------------------------------------------------------------------------
  private fillApps(): void {
    const chosen = this.form.app.value;
    const apps = this.model.apps.map((a) => a.app);
    if (json(apps) !== json([...this.form.app.options].map((o) => o.value))) {
      this.form.app.replaceChildren(...apps.map((a) => h("option", { value: a }, a)));
      if (apps.includes(chosen)) this.form.app.value = chosen;
    }
    this.fillFunctions();
  }

  private fillFunctions(): void {
    const app = this.model.apps.find((a) => a.app === this.form.app.value);
    // Untrusted callers cannot reach names with ':' (HTTP endpoints, task: names).
    const names = (app?.functions ?? []).filter((n) => !n.includes(":"));
    const chosen = this.form.fn.value;
    if (json(names) !== json([...this.form.fn.options].map((o) => o.value))) {
      this.form.fn.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
      if (names.includes(chosen)) this.form.fn.value = chosen;
    }
  }

  private async tryCall(): Promise<void> {
    const out = this.form.result;
    const app = this.form.app.value;
    const fn = this.form.fn.value;
    out.className = "anvil-nb-lab-try-result";
    if (!app || !fn) {
      out.textContent = "Pick an app and a function.";
      return;
    }
    let args: unknown;
    try {
      args = JSON.parse(this.form.args.value.trim() || "[]");
    } catch (error) {
      out.classList.add("anvil-nb-lab-try-error");
      out.textContent = `The arguments are not JSON: ${(error as Error).message}`;
      return;
    }
    out.textContent = `calling ${fn}…`;
    out.dataset.state = "calling";
    try {
      // The app's own browser client, as a page of that app would load it (webpack leaves it be).
      const client = await import(/* webpackIgnore: true */ clientUrl(app));
      const result = Array.isArray(args)
        ? await client.callWithKwargs(fn, args, {})
        : args !== null && typeof args === "object"
          ? await client.callWithKwargs(fn, [], args)
          : await client.callWithKwargs(fn, [args], {});
      out.dataset.state = "result";
      out.textContent = json(result);
    } catch (error: any) {
      out.dataset.state = "error";
      out.classList.add("anvil-nb-lab-try-error");
      out.textContent = `${error?.type ?? error?.name ?? "Error"}: ${error?.message ?? error}`;
    }
  }

  // -- the feed -------------------------------------------------------------------------------
  private renderFeed(): void {
    const rows: Node[] = [];
    for (const c of this.model.calls) {
      rows.push(this.callRow(c));
      if (c.id === this.openCall) rows.push(this.callDetails(c));
    }
    this.feedEl.replaceChildren(...rows);
  }

  private callRow(c: CallRow): Node {
    const outcome = c.ok === undefined ? "running" : c.ok ? "ok" : "error";
    return h(
      "tr",
      {
        class: `anvil-nb-lab-call anvil-nb-lab-outcome-${outcome}`,
        "data-action": "open-call",
        "data-call-id": c.id,
        "data-function": c.command,
        "data-caller": c.caller,
        "data-outcome": outcome,
        "aria-expanded": String(c.id === this.openCall),
      },
      h("td", {}, clock(c.time)),
      h("td", {}, c.app),
      h("td", {}, h("code", {}, c.command)),
      h("td", {}, c.caller),
      h("td", {}, c.trusted ? "yes" : "no"),
      h("td", {}, c.duration === undefined ? "" : (c.duration * 1000).toFixed(1)),
      h("td", {}, outcome === "error" ? (c.errorType ?? "error") : outcome),
    );
  }

  private callDetails(c: CallRow): Node {
    const error = c.ok === false ? { type: c.errorType, message: c.errorMessage, trace: c.trace } : null;
    return h(
      "tr",
      { class: "anvil-nb-lab-call-details" },
      h(
        "td",
        { colspan: "7" },
        h("div", { class: "anvil-nb-lab-hint" }, "CallContext"),
        h("pre", {}, json(c.context)),
        error && h("div", { class: "anvil-nb-lab-hint" }, "error"),
        error && h("pre", { class: "anvil-nb-lab-try-error" }, json(error)),
      ),
    );
  }

  // -- clicks ---------------------------------------------------------------------------------
  private onClick(event: MouseEvent): void {
    const target = (event.target as Element).closest<HTMLElement>("[data-action]");
    if (!target || !this.node.contains(target)) return;
    const d = target.dataset;
    switch (d.action) {
      case "copy":
        Clipboard.copyToSystem(d.value ?? "");
        target.textContent = "copied";
        setTimeout(() => (target.textContent = "copy"), 1000);
        break;
      case "toggle-key":
        if (this.shownKeys.has(d.app!)) this.shownKeys.delete(d.app!);
        else this.shownKeys.add(d.app!);
        this.markDirty("apps");
        break;
      case "kill":
        (target as HTMLButtonElement).disabled = true;
        this.model.kill(d.app!, d.id!).catch((error) => {
          target.replaceWith(h("span", { class: "anvil-nb-lab-try-error" }, `kill failed: ${error.message}`));
        });
        break;
      case "try":
        void this.tryCall();
        break;
      case "open-call":
        this.openCall = this.openCall === d.callId ? null : d.callId!;
        this.markDirty("feed");
        break;
    }
  }
}
