/**
 * What the panel knows, and where it comes from (docs/lab.md):
 *
 * - the apps: `_/admin/apps`, read at start, on every RegistrationChanged event (debounced) and
 *   whenever the event stream (re)opens, since events may have been missed while it was down;
 * - each app's registry and peers: `_/admin/state?app=NAME`, read with the apps;
 * - the call feed: ONE EventSource on `_/admin/events` (every app), CallStarted/CallFinished
 *   paired by `call_id`, the newest FEED_SIZE kept;
 * - each app's background tasks: `_/admin/tasks?app=NAME`, polled by the view while it is
 *   visible (the host pushes no task state).
 *
 * The model only keeps state and says what changed (`onChange(section)`); the view decides when
 * to render (at most every RENDER_INTERVAL ms).
 */
import { requestAPI, eventsUrl } from "./request.js";

/** Calls kept in the feed (the newest). */
export const FEED_SIZE = 200;
/** Milliseconds between two reads of the apps after registration events (a burst is one read). */
const APPS_DEBOUNCE = 200;

export interface AppInfo {
  app: string;
  url: string;
  uplink_url: string;
  server_key: string;
  client_key: string;
  functions: string[];
  portable_classes: string[];
}

export interface Peer {
  name: string;
  kind: string;
  /** What the peer says it is: a kernel's notebook path, a script's name (may be absent). */
  label?: string | null;
  ip: string | null;
}

export interface AppState {
  app: string;
  registrations: Record<string, string[]>;
  peers: Peer[];
}

export interface TaskInfo {
  id: string;
  name: string;
  status: string;
  started: number | null;
  ended: number | null;
  provider: string;
  launcher: string;
  state: unknown;
}

/** One call of the feed: CallStarted, completed by its CallFinished. */
export interface CallRow {
  id: string;
  app: string;
  command: string;
  caller: string;
  trusted: boolean;
  time: number;
  /** The CallStarted event's context fields, shown when the row is opened. */
  context: Record<string, unknown>;
  duration?: number;
  ok?: boolean;
  errorType?: string | null;
  errorMessage?: string | null;
  trace?: unknown[];
}

export type Section = "apps" | "tasks" | "feed" | "status";
export type StreamStatus = "connecting" | "live" | "reconnecting";

/** The kind of a registered name: HTTP endpoints (`http:`/`route:`), background tasks
 * (`task:`), or a plain callable. */
export function nameKind(name: string): "http" | "task" | "function" {
  if (name.startsWith("http:") || name.startsWith("route:")) return "http";
  if (name.startsWith("task:")) return "task";
  return "function";
}

export class PanelModel {
  apps: AppInfo[] = [];
  states = new Map<string, AppState>();
  tasks = new Map<string, TaskInfo[]>();
  calls: CallRow[] = [];
  status: StreamStatus = "connecting";
  error = "";
  onChange: (section: Section) => void = () => undefined;

  private byId = new Map<string, CallRow>();
  private source: EventSource | null = null;
  private appsTimer: ReturnType<typeof setTimeout> | null = null;
  private disposed = false;

  start(): void {
    this.source = new EventSource(eventsUrl(), { withCredentials: true });
    this.source.onopen = () => {
      this.setStatus("live");
      void this.refreshApps();
    };
    this.source.onerror = () => this.setStatus("reconnecting"); // EventSource retries by itself
    this.source.onmessage = (message) => this.receive(message.data);
    void this.refreshApps();
  }

  dispose(): void {
    this.disposed = true;
    this.source?.close();
    if (this.appsTimer) clearTimeout(this.appsTimer);
  }

  /** Read `_/admin/apps`, then every app's `_/admin/state`. */
  async refreshApps(): Promise<void> {
    try {
      const apps = await requestAPI<AppInfo[]>("_/admin/apps");
      const states = await Promise.all(
        apps.map((a) =>
          requestAPI<AppState>(`_/admin/state?app=${encodeURIComponent(a.app)}`).catch(() => null),
        ),
      );
      if (this.disposed) return;
      this.apps = apps;
      this.states = new Map(states.filter((s): s is AppState => s !== null).map((s) => [s.app, s]));
      this.error = "";
    } catch (error) {
      this.error = `could not read the apps: ${(error as Error).message}`;
    }
    this.onChange("apps");
  }

  /** Read every app's background tasks (the view calls it every second while visible). */
  async pollTasks(): Promise<void> {
    const results = await Promise.all(
      this.apps.map(async (a) => {
        try {
          const tasks = await requestAPI<TaskInfo[]>(
            `_/admin/tasks?app=${encodeURIComponent(a.app)}`,
          );
          return [a.app, tasks] as const;
        } catch {
          return [a.app, this.tasks.get(a.app) ?? []] as const;
        }
      }),
    );
    if (this.disposed) return;
    this.tasks = new Map(results);
    this.onChange("tasks");
  }

  /** `POST _/admin/tasks/kill`; the next poll shows the task as killed. */
  async kill(app: string, id: string): Promise<void> {
    await requestAPI("_/admin/tasks/kill", {
      method: "POST",
      body: JSON.stringify({ app, id }),
    });
    await this.pollTasks();
  }

  private setStatus(status: StreamStatus): void {
    if (this.status !== status) {
      this.status = status;
      this.onChange("status");
    }
  }

  /** One event of the host's stream (`core.events.to_wire`: `kind` is `call_started`,
   * `call_finished`, `registration`, `session`, `capability` or `registry`). */
  private receive(data: string): void {
    let event: any;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    switch (event.kind) {
      case "call_started":
        this.started(event);
        break;
      case "call_finished":
        this.finished(event);
        break;
      case "registration":
      case "registry":
        if (this.appsTimer === null) {
          this.appsTimer = setTimeout(() => {
            this.appsTimer = null;
            void this.refreshApps();
          }, APPS_DEBOUNCE);
        }
        break;
    }
  }

  private started(event: any): void {
    const stack: string[] = event.call_stack ?? [];
    const row: CallRow = {
      id: event.call_id,
      app: event.app,
      command: event.command,
      caller: stack[0] ?? event.client?.type ?? "",
      trusted: Boolean(event.trusted),
      time: event.time,
      context: {
        call_id: event.call_id,
        app: event.app,
        function: event.command,
        client: event.client,
        call_stack: stack,
        trusted: event.trusted,
        session_id: event.session_id,
        caller: event.caller,
        provider: event.provider,
        background_task_id: event.background_task_id,
      },
    };
    this.byId.set(row.id, row);
    this.calls.unshift(row);
    while (this.calls.length > FEED_SIZE) {
      this.byId.delete(this.calls.pop()!.id);
    }
    this.onChange("feed");
  }

  private finished(event: any): void {
    const row = this.byId.get(event.call_id);
    if (!row) return; // started before the panel listened, or fell off the feed
    row.duration = event.duration;
    row.ok = Boolean(event.ok);
    row.errorType = event.error_type;
    row.errorMessage = event.error_message;
    row.trace = event.trace;
    this.onChange("feed");
  }
}
