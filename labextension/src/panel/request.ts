/**
 * The panel's one door to the host: `requestAPI` joins the Lab's base URL with the host's
 * `anvil/` prefix and goes through `ServerConnection.makeRequest`, so every request carries the
 * Lab's token and XSRF header (the admin routes are behind Jupyter's authentication).
 */
import { PageConfig, URLExt } from "@jupyterlab/coreutils";
import { ServerConnection } from "@jupyterlab/services";

/** `{base_url}anvil/` joined with *path* (no leading slash), as an absolute URL. */
export function anvilUrl(path: string): string {
  return URLExt.join(PageConfig.getBaseUrl(), "anvil", path);
}

/** The host answered with an error status: `status` and the host's `{"error"}` text. */
export class ResponseError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = "ResponseError";
  }
}

/** GET (or *init*) `{base_url}anvil/PATH` and decode the JSON answer. */
export async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(anvilUrl(path), init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let body: any = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { error: text.slice(0, 200) };
  }
  if (!response.ok) {
    throw new ResponseError(response.status, body?.error ?? `${response.status} ${path}`);
  }
  return body as T;
}

/** The URL of the host's event stream, with the Lab's token when it has one (EventSource
 * cannot send headers; a Lab opened with a login cookie needs none). */
export function eventsUrl(): string {
  const url = anvilUrl("_/admin/events");
  const token = PageConfig.getToken();
  return token ? `${url}?token=${encodeURIComponent(token)}` : url;
}

/** The browser client module of *app*: `{base}anvil/_/client.js` for `default`, else
 * `{base}anvil/app/NAME/_/client.js`. */
export function clientUrl(app: string): string {
  return app === "default"
    ? anvilUrl("_/client.js")
    : anvilUrl(`app/${encodeURIComponent(app)}/_/client.js`);
}
