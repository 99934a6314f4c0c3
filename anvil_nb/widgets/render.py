"""HTML for the widgets: tables built from the models' records, escaped. No widgets here."""

from __future__ import annotations

import html
import linecache
import sys
import time
from collections.abc import Iterable
from typing import Any

from anvil_nb.widgets.models import (
    CallLogModel,
    CallRecord,
    CapabilityView,
    SessionView,
    short_repr,
)

__all__ = [
    "call_detail",
    "call_summary",
    "call_table",
    "capability_list",
    "plural",
    "registry_table",
    "session_list",
    "source_line",
    "traceback_html",
]

#: The longest source line a traceback shows.
MAX_SOURCE = 200

_STYLE = (
    "<style>.anvil-nb{overflow-x:auto;max-width:100%;min-width:0}"
    ".jupyter-widget-html-content:has(>.anvil-nb),.widget-html-content:has(>.anvil-nb){min-width:0}"
    ".anvil-nb table{border-collapse:collapse;font-size:12px;font-family:var(--jp-code-font-family,monospace)}"
    ".anvil-nb th,.anvil-nb td{border-bottom:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top;"
    "white-space:nowrap;line-height:1.4}"
    # Long text wraps, also inside words, so the table fits its cell instead of running off it.
    ".anvil-nb td.wrap{white-space:normal;overflow-wrap:anywhere}"
    ".anvil-nb td.wrap>div{min-width:4em;max-width:48em}.anvil-nb td.wide>div{min-width:9em}"
    ".anvil-nb td.client>div{min-width:5.5em}"
    ".anvil-nb pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0 8px}"
    ".anvil-nb .error{color:#b00020}.anvil-nb .untrusted{color:#9a6700}.anvil-nb mark{background:#fff3a0}"
    ".anvil-nb .muted{color:#888}.anvil-nb .src{color:#555}</style>"
)


#: The direction column: a call served here, made from here, or seen at the host (another
#: connection's call in this app).
_ARROWS = {"in": "←", "out": "→"}


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 call``, ``3 calls``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def call_summary(model: CallLogModel) -> str:
    """``3 calls (1 error, 1 running)``: the calls since the log started."""
    rows = model.rows()
    counts = [
        plural(n, what, whats)
        for what, whats, n in (
            ("error", "errors", sum(r.outcome == "error" for r in rows)),
            ("running", "running", sum(r.outcome == "running" for r in rows)),
        )
        if n
    ]
    return plural(model.total, "call") + (f" ({', '.join(counts)})" if counts else "")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _table(cls: str, head: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<div class="anvil-nb"><span class="muted">{_e(empty)}</span></div>'
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<div class="anvil-nb">{_STYLE}<table class="{cls}"><tr>{header}</tr>{"".join(rows)}</table></div>'


def call_table(rows: list[CallRecord], total: int) -> str:
    """The call log: one row per call, newest first."""
    out = []
    for c in rows:
        if c.outcome == "ok":
            outcome = _e(c.result)
        elif c.outcome == "error":
            outcome = f'<span class="error">{_e(c.error_type)}: {_e(c.error_message)}</span>'
        else:
            outcome = '<span class="muted">running</span>'
        client_type = c.client_type if c.client_type != c.caller else ""  # usually the same
        client = " ".join(x for x in (client_type, c.ip, c.location) if x)
        trust = "yes" if c.trusted else '<span class="untrusted">no</span>'
        duration = "" if c.duration is None else f"{c.duration * 1000:.1f} ms"
        out.append(
            f'<tr class="anvil-nb-call" data-function="{_e(c.function)}" data-caller="{_e(c.caller)}" '
            f'data-outcome="{_e(c.outcome)}" data-call="{_e(c.call_id)}">'
            f"<td>{_clock(c.time)}</td><td>{_ARROWS.get(c.direction, '·')}</td>"
            f'<td class="wrap wide"><div><b>{_e(c.function)}</b>({_e(c.args)})</div></td>'
            f"<td>{_e(c.caller)}</td><td>{trust}</td>"
            f'<td class="wrap client"><div>{_e(client)}</div></td><td>{_e(c.session_id[:8])}</td>'
            f'<td class="wrap"><div>{_e(c.task_id)}</div></td><td>{duration}</td>'
            f'<td class="wrap wide"><div>{outcome}</div></td>'
            f'<td class="wrap"><div>{_e(c.output[-80:])}</div></td></tr>'
        )
    head = [
        "time",
        "",
        "call",
        "caller",
        "trusted",
        "client",
        "session",
        "task",
        "duration",
        "outcome",
        "output",
    ]
    table = _table("anvil-nb-calllog", head, out, "No calls yet.")
    return (
        table
        + f'<div class="anvil-nb muted">{len(rows)} shown, {total} since the log started</div>'
    )


def call_detail(c: CallRecord | None) -> str:
    """Everything about one call: its CallContext, arguments, result or traceback, output."""
    if c is None:
        return ""
    parts = [f"<b>{_e(c.function)}</b>({_e(c.args)}) — {_e(c.outcome)}"]
    parts.append(
        "<br><b>CallContext</b><pre>"
        + _e("\n".join(f"{k}: {v!r}" for k, v in c.context.items()))
        + "</pre>"
    )
    if c.outcome == "ok":
        parts.append(f"<b>Result</b><pre>{_e(c.result)}</pre>")
    elif c.outcome == "error":
        parts.append(
            '<b>Error</b><pre class="error">Traceback (most recent call last):\n'
            f"{traceback_html(c.trace, local=c.direction == 'in')}"
            f"{_e(c.error_type)}: {_e(c.error_message)}</pre>"
        )
    if c.output:
        parts.append(f"<b>Output</b><pre>{_e(c.output)}</pre>")
    return f'<div class="anvil-nb">{_STYLE}{"".join(parts)}</div>'


def traceback_html(trace: list[Any], local: bool = True) -> str:
    """The frames of a trace (innermost first, ``[file, line]`` each), most recent call last,
    each with its source line where this process has the file.

    *local*: the frames ran in this process (a call served here). Otherwise (a remote trace,
    received with the error of a call made from here) a line is shown only from a file this
    process knows (a cell of this kernel, a module it loaded), never any file the trace names.
    """
    out = []
    for frame in reversed(trace):
        if not isinstance(frame, (list, tuple)) or len(frame) < 2:
            continue
        path, line = frame[0], frame[1]
        out.append(_e(f'  File "{path}", line {line}') + "\n")
        text = source_line(path, line, local)
        if text:
            out.append(f'<span class="src">    {_e(text)}</span>\n')
    return "".join(out)


def source_line(path: Any, line: Any, local: bool = True) -> str:
    """Line *line* of *path*, stripped and clipped; "" when this process does not have it.

    *local* False: only from a file this process knows (see :func:`traceback_html`).
    """
    if not isinstance(path, str) or type(line) is not int or line < 1:
        return ""
    if not local and not _known_here(path):
        return ""
    try:
        text = linecache.getline(path, line).strip()
    except Exception:  # an unreadable file, an odd loader: no line, no error
        return ""
    return text if len(text) <= MAX_SOURCE else text[: MAX_SOURCE - 1] + "…"


def _known_here(path: str) -> bool:
    """Whether *path* is a file this process runs code from: a kernel cell or a loaded module."""
    if path in linecache.cache:  # IPython registers its cells here
        return True
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file.replace("\\", "/") == path:
            return True
    return False


def session_list(sessions: list[SessionView]) -> str:
    """Each session's contents; keys the last call changed are highlighted."""
    rows = []
    for s in sessions:
        if s.data:
            items = "<br>".join(
                (f"<mark>{_e(k)}</mark>" if k in s.changed else _e(k)) + f" = {_e(v)}"
                for k, v in sorted(s.data.items())
            )
        else:
            items = '<span class="muted">(empty)</span>'
        gone = sorted(k for k in s.changed if k not in s.data)
        if gone:
            items += "<br>" + ", ".join(f"<mark><s>{_e(k)}</s></mark>" for k in gone)
        status = s.status if not s.replaced_by else f"{s.status} → {s.replaced_by[:8]}"
        rows.append(
            f'<tr class="anvil-nb-session" data-status="{_e(s.status)}"><td>{_e(s.session_id[:8])}</td>'
            f"<td>{_e(status)}</td><td>{_clock(s.time)}</td><td>{items}</td></tr>"
        )
    return _table(
        "anvil-nb-sessions",
        ["session", "status", "updated", "contents"],
        rows,
        "No sessions served yet.",
    )


def capability_list(scopes: list[CapabilityView]) -> str:
    """Per scope: the aggregated value, then each update."""
    rows = []
    for v in scopes:
        updates = "<br>".join(
            f"{_clock(t)} {'↑' if d == 'sent' else '↓'} {_e(call[:12])}: {_e(payload)}"
            for t, call, d, payload in reversed(v.updates)
        )
        rows.append(
            f'<tr class="anvil-nb-capability" data-scope="{_e(v.scope_key)}"><td>{_e(v.scope_key)}</td>'
            f"<td>{_e(short_repr(v.aggregate))}</td><td>{v.count}</td><td>{updates}</td></tr>"
        )
    return _table(
        "anvil-nb-capabilities",
        ["scope", "aggregate", "updates", "latest first"],
        rows,
        "No capability updates yet.",
    )


def registry_table(
    names: dict[str, list[str]],
    local: list[str],
    classes: list[str],
    me: str | None,
    label: str = "this kernel",
) -> str:
    """Registered names and who provides them; this kernel's (*label*) own are marked."""
    rows = []
    for name, providers in names.items():
        who = ", ".join((label if p == me else p) for p in providers)
        rows.append(f'<tr class="anvil-nb-name"><td>{_e(name)}</td><td>{_e(who)}</td></tr>')
    for name in local:
        if name not in names:
            rows.append(f'<tr class="anvil-nb-name"><td>{_e(name)}</td><td>{_e(label)}</td></tr>')
    table = _table("anvil-nb-registry", ["name", "provided by"], rows, "Nothing is registered.")
    portable = ", ".join(_e(c) for c in classes) or '<span class="muted">none</span>'
    return table + f'<div class="anvil-nb">Portable classes of {_e(label)}: {portable}</div>'
