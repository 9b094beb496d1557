"""The latency cost model: candidates, grouped cross-validation, multipliers, JSON save/load.

Candidates (all scikit-learn, all predict a network's latency in ms from its edge widths):

* ``flops_linear``: latency = a + b * FLOPs (what FLOPs-based pruning assumes).
* ``ridge``: standardised ridge regression on per-layer FLOPs and bytes plus the network's
  misaligned and channel-padding FLOPs (a per-layer latency-per-FLOP model, exact in how widths
  combine).
* ``nnls``: the same features by non-negative least squares: no layer, byte or padding block
  may make a network faster by being there.
* ``hgb`` / ``rf``: gradient-boosted trees / random forest on totals and per-edge relative
  widths and alignment flags (they can learn the latency staircase).

Selection is by cross-validation grouped by edge: every width of one edge's probes is held
out together, so a model is scored on edges it never saw, and each random net is its own group.
The score is the MAPE on the random nets of the held-out folds when the fit set has at least
``MIN_CV_RANDOM`` of them (they are what pruning produces: many edges narrowed at once), else on
every held-out network. Random nets marked for validation are never used here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import LinearRegression, RidgeCV
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from gator_hw.atomic import write_json
from gator_hw.costmodel.dataset import Samples, file_sha256, load_samples, runtime_of
from gator_hw.costmodel.features import FeatureMap
from gator_hw.errors import GatorError
from gator_hw.graph.hypergraph import HyperGraph

__all__ = [
    "CANDIDATES",
    "MODEL_FORMAT",
    "CostModel",
    "fit_cost_model",
    "holdout_mask",
    "load_cost_model",
    "refit",
]

MODEL_FORMAT = "gator-hw/costmodel"
MIN_SAMPLES = 6
MIN_CV_RANDOM = 4


def _estimator(name: str):
    if name == "flops_linear":
        return LinearRegression()
    if name == "ridge":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-4, 3, 15)))
    if name == "nnls":
        return LinearRegression(positive=True)
    if name == "hgb":
        return HistGradientBoostingRegressor(
            max_iter=300, learning_rate=0.05, min_samples_leaf=3, random_state=0
        )
    if name == "rf":
        return RandomForestRegressor(n_estimators=300, random_state=0, n_jobs=1)
    raise GatorError(f"unknown cost model '{name}'; choose one of {', '.join(CANDIDATES)}")


#: candidate name -> which feature view it reads
CANDIDATES: dict[str, str] = {
    "flops_linear": "flops", "ridge": "layer", "nnls": "layer", "hgb": "edge", "rf": "edge"
}


def _features(fmap: FeatureMap, view: str, widths: np.ndarray) -> np.ndarray:
    if view == "flops":
        return fmap.flops(widths)[:, None] / 1e9
    return fmap.layer(widths) if view == "layer" else fmap.edge(widths)


def holdout_mask(samples: Samples, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random nets kept out of fitting for validation: a seeded draw of ``fraction`` of them."""
    mask = np.zeros(len(samples), dtype=bool)
    rnd = np.flatnonzero(samples.kind == "random")
    order = rnd[np.argsort(samples.variant[rnd], kind="stable")]
    n_hold = int(round(len(order) * fraction))
    mask[np.random.default_rng(seed).permutation(order)[:n_hold]] = True
    return mask


def _mape(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(p - y) / y) * 100.0)


@dataclass
class CostModel:
    """A fitted latency model of one network on one device setting."""

    graph: HyperGraph
    fmap: FeatureMap
    method: str
    estimator: object
    baseline_ms: float
    fit_variants: list[str]
    cv_mape: dict[str, float] = field(default_factory=dict)
    tables: list[dict] = field(default_factory=list)
    context: dict = field(default_factory=dict)

    def predict(self, widths: np.ndarray) -> np.ndarray:
        """Predicted latency in ms of each width vector (rows of ``widths``)."""
        x = _features(self.fmap, CANDIDATES[self.method], np.atleast_2d(widths))
        with _one_thread():
            return np.asarray(self.estimator.predict(x), dtype=float)

    def feature_names(self) -> list[str]:
        """Names of the columns the estimator reads."""
        view = CANDIDATES[self.method]
        if view == "flops":
            return ["gflops"]
        return self.fmap.layer_names() if view == "layer" else self.fmap.edge_names()

    def full_widths(self) -> np.ndarray:
        return np.array([e.channels for e in self.graph.edges], dtype=np.int64)

    def multipliers(self, widths: Sequence[int] | None = None) -> list[float]:
        """Per edge: predicted latency saved (%) over FLOPs saved (%) when it is halved.

        This is the GATOR ``edge_multipliers`` convention (half-width probe at the current
        widths, every other edge as is). Values are floored at 0.01: a probe the model thinks
        costs nothing still keeps a small price.
        """
        w0 = np.asarray(widths if widths is not None else self.full_widths(), dtype=np.int64)
        probes = [w0]
        for e in self.graph.edges:
            w = w0.copy()
            w[e.gid] = self.graph.valid_keep_count(e.gid, max(1, int(w0[e.gid]) // 2))
            probes.append(w)
        probes_arr = np.stack(probes)
        t = self.predict(probes_arr)
        f = self.fmap.flops(probes_arr)
        out = []
        for i in range(1, len(probes)):
            dt = 100.0 * (t[0] - t[i]) / t[0]
            df = 100.0 * (f[0] - f[i]) / f[0]
            out.append(max(0.01, dt / df) if df > 0 else 1.0)
        return out

    def to_json(self) -> dict:
        params = {k: v for k, v in self.estimator.get_params().items() if _jsonable(v)}
        return {
            "format": MODEL_FORMAT,
            "format_version": 1,
            "model": self.graph.model_name,
            "input_shape": list(self.graph.input_shape),
            "method": self.method,
            "params": params,
            "features": self.feature_names(),
            "baseline_ms": self.baseline_ms,
            "cv_mape": self.cv_mape,
            "fit_variants": self.fit_variants,
            "tables": self.tables,
            "context": self.context,
            "multipliers": self.multipliers(),
        }

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (parameters and source tables; no pickle).

        Each table is also recorded relative to the file itself (``relpath``), so the pair
        travels: the file loads from any working directory.
        """
        import os

        import sklearn

        from gator_hw import __version__

        path = Path(path)
        doc = self.to_json()
        doc["tables"] = [
            {**t, "relpath": os.path.relpath(Path(t["path"]).resolve(),
                                             path.resolve().parent)}
            for t in self.tables
        ]  # fmt: skip
        doc["versions"] = {"gator_hw": __version__, "scikit_learn": sklearn.__version__}
        return write_json(path, doc)

    def __str__(self) -> str:
        cv = ", ".join(f"{k} {v:.2f}%" for k, v in self.cv_mape.items())
        return f"CostModel({self.graph.model_name}, {self.method}; CV MAPE: {cv})"


def _jsonable(v) -> bool:
    return isinstance(v, (int, float, str, bool, type(None)))


def _one_thread():
    """Tiny data sets: OpenMP threads only add contention (HGB runs 70x slower on a busy box)."""
    return threadpool_limits(limits=1)


def fit_cost_model(
    tables: Sequence[str | Path],
    graph: HyperGraph,
    *,
    method: str = "auto",
    holdout: float = 0.5,
    holdout_seed: int = 0,
) -> CostModel:
    """Fit the cost model on profile tables; ``auto`` keeps the best candidate by grouped CV.

    A ``holdout`` fraction of the random nets (drawn with ``holdout_seed``) is left out for
    ``validate``.
    """
    if method != "auto" and method not in CANDIDATES:
        raise GatorError(
            f"unknown cost-model method '{method}'; choose auto or one of {', '.join(CANDIDATES)}"
        )
    samples = load_samples(tables, graph)
    fit = samples.subset(~holdout_mask(samples, holdout, holdout_seed))
    if len(fit) < MIN_SAMPLES:
        raise GatorError(
            f"only {len(fit)} measured networks to fit; the cost model needs at least "
            f"{MIN_SAMPLES}: profile more widths (--widths 0.25,0.5,0.75) or --random-nets"
        )
    fmap = FeatureMap(graph, samples.batch, samples.dtype, runtime_of(samples.context))
    names = list(CANDIDATES) if method == "auto" else [method]
    groups = fit.groups
    n_splits = min(5, len(set(groups)))
    scored = fit.kind == "random"
    if scored.sum() < MIN_CV_RANDOM:
        scored = np.ones(len(fit), dtype=bool)
    cv: dict[str, float] = {}
    with _one_thread():
        for name in names:
            x = _features(fmap, CANDIDATES[name], fit.widths)
            if n_splits >= 2:
                pred = cross_val_predict(_estimator(name), x, fit.latency_ms, groups=groups,
                                         cv=GroupKFold(n_splits=n_splits))
                cv[name] = _mape(fit.latency_ms[scored], pred[scored])
        best = min(cv, key=cv.get) if cv else names[0]
        est = clone(_estimator(best)).fit(_features(fmap, CANDIDATES[best], fit.widths),
                                          fit.latency_ms)
    return CostModel(
        graph, fmap, best, est, samples.baseline_ms, sorted(fit.variant.tolist()), cv,
        [{"path": str(p), "sha256": file_sha256(p)} for p in tables], samples.context,
    )


def refit(graph: HyperGraph, method: str, params: dict, widths: np.ndarray,
          latency_ms: np.ndarray, batch: int, dtype: str, backend: str = "torch"
          ) -> tuple[FeatureMap, object]:
    """Fit the estimator ``method`` with saved ``params`` on measured networks (deterministic)."""
    if method not in CANDIDATES:
        raise GatorError(f"unknown cost-model method {method!r}; make the config again")
    fmap = FeatureMap(graph, batch, dtype, backend)
    est = _estimator(method).set_params(**params)
    with _one_thread():
        est.fit(_features(fmap, CANDIDATES[method], np.asarray(widths)), np.asarray(latency_ms))
    return fmap, est


def load_cost_model(path: str | Path, graph: HyperGraph) -> CostModel:
    """Load a saved cost model: re-read its tables (hash-checked) and refit the same estimator."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GatorError(f"cannot read cost model {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
        raise GatorError(f"{path} is not a gator-hw cost model file")
    if doc["model"] != graph.model_name:
        raise GatorError(f"{path} models {doc['model']}, not {graph.model_name}")
    tables = [_find_table(t, path) for t in doc["tables"]]
    samples = load_samples(tables, graph)
    fit = samples.subset(np.isin(samples.variant, doc["fit_variants"]))
    fmap, est = refit(graph, doc["method"], doc["params"], fit.widths, fit.latency_ms,
                      samples.batch, samples.dtype, runtime_of(samples.context))
    cm = CostModel(graph, fmap, doc["method"], est, samples.baseline_ms, doc["fit_variants"],
                   doc.get("cv_mape", {}), doc["tables"], doc.get("context", {}))
    made = doc.get("versions", {}).get("scikit_learn", "an unknown version")
    if "features" in doc and cm.feature_names() != doc["features"]:
        raise GatorError(f"cost model {path} names other features than this gator-hw computes; "
                         "refit it with make-config")
    if "multipliers" in doc and not np.allclose(cm.multipliers(), doc["multipliers"],
                                                rtol=1e-6, atol=0.0):
        raise GatorError(f"cost model {path} refits to other multipliers than it recorded "
                         f"(made with scikit-learn {made}); refit it with make-config")
    return cm


def _find_table(entry: dict, model_file: Path) -> Path:
    """A recorded table: beside the model file (``relpath``), as recorded (from the working
    directory), or under a folder above the model file (a project root); hash-checked."""
    rec = Path(entry["path"])
    tries = [model_file.parent / entry["relpath"]] if entry.get("relpath") else []
    tries.append(rec)
    if not rec.is_absolute():
        tries += [d / rec for d in model_file.resolve().parents]
    p = next((t for t in tries if t.is_file()), None)
    if p is None:
        raise GatorError(
            f"table {entry['path']} of cost model {model_file} is missing (looked beside the "
            "file and from the working directory); put the table back or refit with make-config"
        )
    if file_sha256(p) != entry["sha256"]:
        raise GatorError(f"table {p} changed since cost model {model_file} was fitted; refit it")
    return p
