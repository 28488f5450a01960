"""The GRADIENTS tab: a TensorBoard plugin, found through the `tensorboard_plugins` entry point (pyproject.toml).

    tensorboard --logdir logs          # then the GRADIENTS tab, next to SCALARS

Routes, under /data/plugin/gradients/:
    /runs                      [{"run", "healthy"}] of the gradlab runs under the logdir (healthy: from health.json,
                               null before the run has one)
    /data?run=&buckets=&lo=&hi=  one run's families over steps [lo, hi], downsampled to `buckets` buckets per series
                               (min and max of each), steps and values as base64 float64/float32 columns; its health report (health.json, or the rules on a live
                               run's scalars so far) and which charts each verdict is drawn on
    /static/<file>             the frontend: index.js, style.css and the vendored uPlot (scripts/vendor_uplot.sh)
Only files of static/ are served, and only runs of the listing: anything else (`../`, an absolute path) is a 404.
"""

import math
import mimetypes
import posixpath
import threading
from pathlib import Path

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from gradlab_tensorboard.data import Runs

STATIC = Path(__file__).parent / "static"
MAX_BUCKETS = 4000  # a chart is never wider than this many pixels


class GradientsPlugin(base_plugin.TBPlugin):
    plugin_name = "gradients"

    def __init__(self, context: base_plugin.TBContext):
        self.runs = Runs(context.logdir)
        self._lock = threading.Lock()  # TensorBoard serves requests on threads; a run's reader is not thread-safe

    def get_plugin_apps(self):
        return {"/runs": self._serve_runs, "/data": self._serve_data, "/static/*": self._serve_static}

    def is_active(self) -> bool:
        with self._lock:
            return bool(self.runs.listing())

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js", tab_name="GRADIENTS")

    @wrappers.Request.application
    def _serve_runs(self, request):
        body = []
        with self._lock:
            for name, run in self.runs.listing().items():
                health = run.saved_health()  # a run without health.json is judged when it is shown
                body.append({"run": name, "healthy": None if health is None else health["healthy"]})
        return http_util.Respond(request, body, "application/json")

    @wrappers.Request.application
    def _serve_data(self, request):
        try:
            buckets = min(MAX_BUCKETS, max(10, int(request.args.get("buckets", 1000))))
            lo, hi = (float(request.args[k]) if request.args.get(k) else None for k in ("lo", "hi"))
            if not all(math.isfinite(x) for x in (lo, hi) if x is not None):
                raise ValueError
        except ValueError:
            return http_util.Respond(request, "buckets, lo and hi are finite numbers", "text/plain", code=400)
        with self._lock:
            run = self.runs.get(request.args.get("run"))
            if run is None:
                return http_util.Respond(request, "no such gradlab run under the logdir", "text/plain", code=404)
            view = run.view(lo, hi, buckets)
        return http_util.Respond(request, view, "application/json")

    @wrappers.Request.application
    def _serve_static(self, request):
        name = request.path.split("/static/", 1)[1]
        path = (STATIC / posixpath.normpath(name)).resolve()
        if name.startswith("/") or ".." in name.split("/") or path.parent != STATIC.resolve() or not path.is_file():
            return http_util.Respond(request, "not found", "text/plain", code=404)
        mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return http_util.Respond(request, path.read_bytes(), mimetype)
