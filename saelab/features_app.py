"""The feature dashboard (``sae.launch_dashboard``, ``saelab features SAE_PATH``): a local
web page to browse an SAE's features.

Built on bottle (already installed with optuna-dashboard, one module, WSGI: no new
dependency, where Flask would add several for three pages) served by the standard
library's WSGI server on 127.0.0.1. The index lists features with their firing
frequency, max activation and the tokens they fire on most; it searches by feature
id or by token text in the top contexts, sorts by frequency, id or max
activation, and filters dead/alive (a feature is dead when it never fires on the
dataset). Each feature has a page with ``visualize_feature``'s figure; plotly.js
is served locally, so nothing is fetched from the network.
"""

from __future__ import annotations

import html
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np

PAGE = 100
"""Features per index page."""
SORTS = {"freq_desc": "frequency, most first", "freq_asc": "frequency, least first",
         "max_desc": "max activation", "id": "feature id"}
FILTERS = ("all", "alive", "dead")
STYLE = """body{font-family:system-ui,sans-serif;margin:20px auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:.9em;width:100%}td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f3f3f3;text-align:left}code{background:#f6f6f6;padding:0 3px}
form{margin:12px 0}.dead{color:#999}"""


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # no access log on the terminal
        pass


@dataclass
class Dashboard:
    """A running dashboard (``block=False``): ``url``, and ``stop()``."""

    url: str
    server: WSGIServer
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _page(title: str, body: str, scripts: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style>{scripts}</head><body>{body}</body></html>")


def _token(t: str) -> str:
    return html.escape(t.replace("\n", "\\n").replace(" ", "\u2423"))


def make_app(sae: Any, model: Any, dataset: Any = None, max_tokens: int | None = None):
    """The bottle app over ``sae``'s feature index on ``dataset`` (None: its training corpus;
    a list of texts: their first ``max_tokens`` tokens, default all)."""
    import bottle
    from plotly.offline import get_plotlyjs

    from saelab.analysis import feature_index, logit_effect
    from saelab.feature_plot import feature_figure

    index = feature_index(sae, dataset, model, max_tokens)
    vocab = [model.tokenizer.decode([i]) for i in range(model.info.vocab_size)]
    tops = [[vocab[t] for t in row if t >= 0] for row in index.top_token_ids(10).tolist()]
    search = [" ".join(t).lower() for t in tops]
    freq, peak = index.frequency, index.top_values[:, 0]
    name = sae.metadata.get("model_name", "?")
    what = f"{name} layer {sae.metadata.get('layer')} {sae.metadata.get('component')}"
    app = bottle.Bottle()

    @app.get("/")
    def listing() -> str:
        q = bottle.request.query
        text, sort = q.getunicode("q", "").strip(), q.get("sort", "freq_desc")
        shown, page = q.get("filter", "all"), max(0, int(q.get("page", "0") or 0))
        if sort not in SORTS or shown not in FILTERS:
            bottle.abort(400, f"sort={sort!r} / filter={shown!r} is not valid; allowed: "
                              f"{', '.join(SORTS)} / {', '.join(FILTERS)}")
        ids = np.arange(sae.d_hidden)
        if shown != "all":
            ids = ids[(index.counts[ids] > 0) == (shown == "alive")]
        if text.isdigit():
            ids = ids[ids == int(text)]
        elif text:
            ids = np.array([f for f in ids if text.lower() in search[f]], dtype=np.int64)
        key = {"freq_desc": -freq, "freq_asc": freq, "max_desc": -peak, "id": np.arange(len(freq))}
        ids = ids[np.argsort(key[sort][ids], kind="stable")]
        rows = "".join(
            f"<tr class={'dead' if index.counts[f] == 0 else 'alive'}><td><a href='/feature/{f}'>"
            f"{f}</a></td><td>{100 * freq[f]:.3g}%</td><td>{peak[f]:.3g}</td><td>"
            + " ".join(f"<code>{_token(t)}</code>" for t in tops[f][:6]) + "</td></tr>"
            for f in ids[page * PAGE:(page + 1) * PAGE])
        options = "".join(f"<option value={k}{' selected' if k == sort else ''}>{v}</option>"
                          for k, v in SORTS.items())
        filters = "".join(f"<option{' selected' if k == shown else ''}>{k}</option>"
                          for k in FILTERS)
        args = {"q": text, "sort": sort, "filter": shown}
        nav = " ".join(f"<a href='/?{urllib.parse.urlencode({**args, 'page': p})}'>{label}</a>"
                       for p, label in ((page - 1, "previous"), (page + 1, "next"))
                       if 0 <= p * PAGE < len(ids))
        body = (f"<h1>Features of the SAE on {html.escape(what)}</h1>"
                f"<p>{sae.d_hidden} features, {int((index.counts == 0).sum())} dead on "
                f"{index.n_tokens} tokens ({html.escape(index.source)}).</p>"
                f"<form action='/'><input name=q value='{html.escape(text, quote=True)}' "
                "placeholder='feature id or token text'> <select name=sort>"
                f"{options}</select> <select name=filter>{filters}</select> "
                "<button type=submit>show</button></form>"
                f"<p id=count>{len(ids)} features match. {nav}</p><table><tr><th>feature</th>"
                f"<th>fires on</th><th>max</th><th>top tokens</th></tr>{rows}</table>")
        return _page(f"SAE features: {what}", body)

    @app.get("/feature/<f:int>")
    def feature(f: int) -> str:
        if not 0 <= f < sae.d_hidden:
            bottle.abort(404, f"feature {f} is not valid; allowed: 0..{sae.d_hidden - 1}")
        fig = feature_figure(f, index, index.contexts(f, 20, model.tokenizer),
                             *logit_effect(sae, model, f))
        div = fig.to_html(full_html=False, include_plotlyjs=False, div_id="feature",
                          config={"responsive": True, "displaylogo": False})
        nav = " ".join(f"<a href='/feature/{g}'>{label}</a>"
                       for g, label in ((f - 1, "previous"), (f + 1, "next"))
                       if 0 <= g < sae.d_hidden)
        return _page(f"Feature {f}", f"<p><a href='/'>all features</a> {nav}</p>{div}",
                     "<script src='/plotly.js'></script>")

    js = get_plotlyjs()

    @app.get("/plotly.js")
    def plotly_js() -> str:
        bottle.response.content_type = "application/javascript; charset=utf-8"
        return js

    return app


def launch(sae: Any, model: Any = None, dataset: Any = None, *, host: str = "127.0.0.1",
           port: int = 8050, block: bool = True, max_tokens: int | None = None
           ) -> Dashboard | None:
    """Serve the dashboard on ``host:port`` (port 0: any free port). ``block``: until
    Ctrl-C; otherwise in a background thread, returning the running ``Dashboard``."""
    from saelab.analysis import model_for

    model = model_for(sae, model)
    app = make_app(sae, model, dataset, max_tokens)
    try:
        server = make_server(host, port, app, handler_class=_Quiet)
    except OSError as e:
        raise ValueError(f"port={port} is not available on {host} ({e.strerror}); allowed: a "
                         "free port, or 0 for any free port") from e
    url = f"http://{host}:{server.server_port}/"
    if block:
        print(f"[saelab] feature dashboard: {url}  (Ctrl-C stops it)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return None
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="saelab-features")
    thread.start()
    return Dashboard(url, server, thread)


def features_main(argv: list[str]) -> int:
    """``saelab features SAE_PATH [data overrides] [--port 8050] [--host 127.0.0.1]``."""
    import sys

    from saelab.errors import CommandParser

    p = CommandParser(prog="saelab features", description=__doc__.split("\n\n")[0],
                      epilog="Without data overrides the features are shown on the "
                             "SAE's training corpus (its activation cache).")
    p.add_argument("sae", help="a saved SAE directory (sae.json + sae.safetensors)")
    p.add_argument("overrides", nargs="*", help="data=..., data.<field>=... (another corpus)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    args = p.parse_args(argv)
    try:
        from saelab.analysis import remember_path
        from saelab.data import load_texts
        from saelab.evaluate import compose_eval_config
        from saelab.sae import SAE
        from saelab.trace import shared_model

        sae = remember_path(SAE.load(args.sae), args.sae)
        model_cfg, data = compose_eval_config(args.overrides, sae.metadata)
        texts = load_texts(data) if args.overrides else None
        launch(sae, shared_model(model_cfg), texts, host=args.host, port=args.port,
               max_tokens=data.max_tokens if texts else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"saelab features: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
