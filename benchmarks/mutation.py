"""Sampled, time-bounded mutation testing of the core modules (issue #15).

A small self-contained driver (Python's ``ast``; no mutation tool needed): it lists every
mutation site of the functions of each core module, samples ``--per-module`` of them with a
named ``--seed``, and runs each mutant in a private copy of the tree (one per worker) against
the test files mapped to its module, each run under a timeout. A mutant is *killed* when the
tests fail (or time out, or no longer import), and *survives* when they pass.

Each mutant is first run against the module's older test files ("before"), and, only if it
survives them, against the property and blind-spot tests too (``NEW_TESTS``, "after"): one pass
gives the kill rate with and without those tests. ``--planted`` instead replays the bugs of the
planted-bug exercise (``PLANTED``) and reports which test set catches each.

Mutations, one per mutant, always inside one function (never docstrings, annotations, f-string
text or exception messages):

* arithmetic swaps (``+``/``-``, ``*``/``/``, ``//`` -> ``/``, ``%`` -> ``//``, ``**`` -> ``*``),
  also in augmented assignments;
* comparison flips (``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``in``/``not in``,
  ``is``/``is not``), ``and``/``or``, a dropped ``not`` or unary minus, a negated ``if``;
* off-by-one constants (int ``n`` -> ``n + 1``, float ``x`` -> ``2 x``, ``True``/``False``);
* removed statements (a call statement, ``raise``, ``+=``, ``break``, ``continue`` -> ``pass``).

Example (about 30 minutes on 2 cores; writes runs/mutation.json)::

    python benchmarks/mutation.py --per-module 5 --seed 15 --budget-s 1800
    python benchmarks/mutation.py --list             # the sample, without running it
    python benchmarks/mutation.py --planted          # the planted bugs of issue #15
    python benchmarks/mutation.py --rerun runs/mutation.json --out runs/mutation2.json
                                                     # the same sample: survivors only
"""

from __future__ import annotations

import argparse
import ast
import copy
import itertools
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The tests written to close the blind spots: run only on mutants the older tests miss.
NEW_TESTS: tuple[str, ...] = ("tests/test_blindspots.py", "tests/test_properties.py")


@dataclass(frozen=True)
class Target:
    """A module to mutate, the older test files that cover it and, optionally, which of its
    functions to mutate (qualified-name prefixes) and a ``pytest -k`` selection of its tests."""

    path: str
    tests: tuple[str, ...]
    only: tuple[str, ...] = ()
    select: str = ""


def _t(path: str, *tests: str, only: tuple[str, ...] = (), select: str = "") -> Target:
    return Target(f"gator_hw/{path}", tuple(f"tests/test_{t}.py" for t in tests), only, select)


TARGETS: tuple[Target, ...] = (
    _t("graph/build.py", "graph", "slim", "soundness"),
    _t("graph/rules.py", "graph", "slim", "soundness"),
    _t("graph/hypergraph.py", "graph", "slim", "gates"),
    _t("graph/cuts.py", "convert", "gates"),
    _t("accounting.py", "accounting", "slim", "loss", "soundness"),
    _t("slim.py", "slim", "convert", "soundness"),
    _t("masking.py", "slim", "gates", "soundness", "transformers", "swin", "maxvit"),
    _t("attention.py", "transformers", "swin", "maxvit"),
    _t("gates.py", "gates", "soundness"),
    _t("loss.py", "loss", "differentiable"),
    _t("convert.py", "convert", "soundness"),
    _t("io.py", "convert", "gated_convert"),
    _t("costmodel/dataset.py", "costmodel"),
    _t("costmodel/differentiable.py", "differentiable"),
    _t("costmodel/embedded.py", "differentiable", "shipped"),
    _t("costmodel/features.py", "features", "costmodel", "differentiable"),
    _t("costmodel/gator.py", "costmodel_gator"),
    _t("costmodel/make.py", "costmodel", "differentiable"),
    _t("costmodel/model.py", "costmodel", "differentiable"),
    _t("costmodel/validate.py", "costmodel"),
    _t("profile/tables.py", "profile"),
    _t("profile/timing.py", "profile", only=("_quantiles", "LatencyResult")),
    _t("train/loop.py", "train", only=("accumulate_gradients", "learning_rate"),
       select="accumulation or learning_rate"),
)

#: The bugs of the planted-bug exercise (path, exact text, replacement, what it breaks).
PLANTED: tuple[tuple[str, str, str, str], ...] = (
    ("gator_hw/slim.py", "offset += seg.length * seg.repeat", "offset += seg.length",
     "layout_index: offset of the second part of a flattened concatenation"),
    ("gator_hw/profile/timing.py", "return 1e3 * _quantiles(self.times_s)[1]",
     "return 1e3 * float(np.mean(self.times_s))", "LatencyResult.median_ms is a mean"),
    ("gator_hw/profile/spec.py", 'out.pop("variant")', 'out.pop("variant")\n        '
     'out.pop("warmup")', "TimingSpec.key() forgets warmup: a resume ignores it"),
    ("gator_hw/profile/runner.py", "diff = [k for k in self.protocol if",
     'diff = [k for k in ("dtype",) if', "resume compares only the dtype"),
    ("gator_hw/io.py", 'if [(e["name"], e["channels"]) for e in edges] != ours:',
     'if [e["name"] for e in edges] != [n for n, _ in ours]:',
     "load ignores a changed channel count"),
    ("gator_hw/io.py", 'if [(e["name"], e["channels"]) for e in edges] != ours:',
     'if [e["channels"] for e in edges] != [c for _, c in ours]:',
     "load ignores a renamed edge"),
    ("gator_hw/export.py", "if report.rel_error is not None and report.rel_error > EXPORT_RTOL:",
     "if False:", "export verification never rejects"),
    ("gator_hw/graph/rules.py", "if 0 in dims or 1 in dims:", "if 0 in dims:",
     "_reduce: a reduction over channels passes them on"),
    ("gator_hw/accounting.py", "weights = call.kernel * n_in / call.groups * n_out",
     "weights = call.kernel * n_in * n_out", "grouped conv cost without / groups"),
    ("gator_hw/costmodel/model.py", "max(1, int(w0[e.gid]) // 2)",
     "max(1, int(w0[e.gid]) // 4)", "multipliers probed at a quarter width"),
)

#: Test files each planted bug's module maps to (its older tests).
PLANTED_TESTS: dict[str, tuple[str, ...]] = {
    "gator_hw/profile/spec.py": ("tests/test_profile.py",),
    "gator_hw/profile/runner.py": ("tests/test_profile.py",),
    "gator_hw/export.py": ("tests/test_export.py",),
}

#: Survivors judged equivalent (no test can tell them apart), by mutant key, with why.
EQUIVALENT: dict[str, str] = {
    "gator_hw/graph/build.py::_finalize: drop-USub: `-1` -> `1`":
        "the default of max() over writers is read only when no layer writes the space, and "
        "then the space has a reason and its key uses sites[0][0] instead",
    "gator_hw/graph/rules.py::Builder.join: constant: `True` -> `False`":
        "zip(strict=True) runs only after the run lengths were compared equal",
    "gator_hw/masking.py::expand_layout: Gt->GtE: `seg.repeat > 1` -> `seg.repeat >= 1`":
        "repeat_interleave(1) is the identity",
    "gator_hw/graph/build.py::_tensor_args: Or->And: `found.append(n) or n` -> "
    "`found.append(n) and n`":
        "map_arg's result is discarded; only the appended nodes are used",
    "gator_hw/graph/cuts.py::constant_nodes: remove-Continue: `continue` -> `pass`":
        "a placeholder has no inputs and is never constant; the output node has no users, so "
        "it never joins the frontier that is folded",
    "gator_hw/gates.py::GateSet.mask_digest: Mult->Div: `m.sum() * (i + 1)` -> "
    "`m.sum() / (i + 1)`":
        "any positive per-edge weight makes an equally good checksum (equal masks, equal "
        "digests; moved channels change the index-weighted sum)",
    "gator_hw/costmodel/embedded.py::_profiled_graph: IsNot->Is: `graph is not None` -> "
    "`graph is None`":
        "a shortcut: without it the profiled net is rebuilt, found to have the same classes "
        "and the same graph is returned",
    "gator_hw/profile/timing.py::LatencyResult.noise: constant: `True` -> `False`":
        "zip(strict=True) is redundant: __post_init__ already refuses unpaired blocks",
    "gator_hw/graph/rules.py::_linear: Or->And: `x is None or shape is None or len(shape) != 2`"
    " -> `x is None and shape is None and (len(shape) != 2)`":
        "fx gives every tensor node a shape and a layout (constants included), so a 2-D input "
        "never has x or shape None",
    "gator_hw/costmodel/dataset.py::load_samples: constant: `True` -> `False`":
        "concat(ignore_index=False): the index labels are never read afterwards (boolean masks "
        "and to_numpy only); two tables load the same samples either way",
}

_SWAP_BIN: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
    ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr,
}
_SWAP_CMP: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_REMOVABLE = (ast.Expr, ast.Raise, ast.AugAssign, ast.Break, ast.Continue)


# ---------------------------------------------------------------------------------------------
# mutation sites
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutant:
    """One mutation: the ``index``-th node (``ast.walk`` order) of function ``qualname`` of
    module ``path``, changed by operator ``op``; ``key`` names it stably for reports."""

    path: str
    qualname: str
    index: int
    op: str
    line: int
    before: str
    after: str

    @property
    def key(self) -> str:
        return f"{self.path}::{self.qualname}: {self.op}: `{self.before}` -> `{self.after}`"


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef]]:
    """Top-level functions and methods of top-level classes, with qualified names."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{sub.name}", sub


def _skipped(func: ast.FunctionDef) -> set[int]:
    """Ids of nodes never mutated: docstrings, annotations, decorators, f-strings and the
    exception raised by a ``raise`` (its message)."""
    skip: set[int] = set()

    def cover(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(func):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            if not isinstance(node, ast.Lambda):
                cover(node.returns)
                for d in node.decorator_list:
                    cover(d)
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(
                        getattr(body[0], "value", None), ast.Constant) and isinstance(
                        body[0].value.value, str):
                    cover(body[0])
            for a in (*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs):
                cover(a.annotation)
            for d in (*node.args.defaults, *node.args.kw_defaults):
                cover(d)
        elif isinstance(node, ast.AnnAssign):
            cover(node.annotation)
        elif isinstance(node, ast.JoinedStr):
            cover(node)
        elif isinstance(node, ast.Raise):
            cover(node.exc)
            cover(node.cause)
    return skip


def _variants(node: ast.AST) -> list[tuple[str, Callable[[ast.AST], ast.AST]]]:
    """The mutations of one node: (operator name, function making the replacement)."""
    out: list[tuple[str, Callable[[ast.AST], ast.AST]]] = []
    if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _SWAP_BIN:
        new = _SWAP_BIN[type(node.op)]
        out.append((f"{type(node.op).__name__}->{new.__name__}",
                    lambda n, new=new: _with(n, op=new())))
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _SWAP_CMP:
                new = _SWAP_CMP[type(op)]
                at = f"[{i}]" if len(node.ops) > 1 else ""
                out.append((f"{type(op).__name__}->{new.__name__}{at}",
                            lambda n, i=i, new=new: _with(
                                n, ops=[new() if j == i else o for j, o in enumerate(n.ops)])))
    if isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__}->{new.__name__}",
                    lambda n, new=new: _with(n, op=new())))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        out.append((f"drop-{type(node.op).__name__}", lambda n: n.operand))
    if isinstance(node, ast.If):
        out.append(("negate-if", lambda n: _with(n, test=ast.UnaryOp(ast.Not(), n.test))))
    if isinstance(node, ast.Constant) and type(node.value) in (bool, int, float):
        v = node.value
        new_v = (not v) if isinstance(v, bool) else v + 1 if isinstance(v, int) else (
            v * 2 if v else 1.0)
        out.append(("constant", lambda n, new_v=new_v: ast.Constant(new_v)))
    if isinstance(node, _REMOVABLE) and not (
            isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call)):
        out.append((f"remove-{type(node).__name__}", lambda n: ast.Pass()))
    return out


def _with(node: ast.AST, **changes: object) -> ast.AST:
    new = copy.copy(node)
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def _snippet(node: ast.AST, limit: int = 70) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def list_mutants(target: Target, root: Path = ROOT) -> list[Mutant]:
    """Every mutation site of ``target``'s functions (those named by ``only``, if given)."""
    tree = ast.parse((root / target.path).read_text())
    out = []
    for qualname, func in _functions(tree):
        if target.only and not qualname.startswith(target.only):
            continue
        skip = _skipped(func)
        for index, node in enumerate(ast.walk(func)):
            if id(node) in skip or node is func:
                continue
            for op, make in _variants(node):
                after = make(copy.deepcopy(node))
                if ast.dump(after) == ast.dump(node):
                    continue
                out.append(Mutant(target.path, qualname, index, op, getattr(node, "lineno", 0),
                                  _snippet(node), _snippet(after)))
    return out


def mutated_source(source: str, m: Mutant) -> str:
    """``source`` with mutant ``m`` applied: only its function's lines are rewritten."""
    tree = ast.parse(source)
    func = dict(_functions(tree))[m.qualname]
    new_func = copy.deepcopy(func)
    nodes = list(ast.walk(new_func))
    target = nodes[m.index]
    replacement = dict(_variants(target))[m.op](copy.deepcopy(target))
    _replace(new_func, target, replacement)
    new_func.decorator_list = []
    indent = " " * func.col_offset
    body = "\n".join(indent + line if line else line
                     for line in ast.unparse(ast.fix_missing_locations(new_func)).splitlines())
    lines = source.splitlines()
    out = "\n".join(lines[: func.lineno - 1] + [body] + lines[func.end_lineno:]) + "\n"
    compile(out, m.path, "exec")
    return out


def _replace(root: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(root):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                setattr(parent, name, [new if v is old else v for v in value])
                return
    raise ValueError("mutation site not found")


def sample(targets: tuple[Target, ...], per_module: int, seed: int, root: Path = ROOT
           ) -> list[Mutant]:
    """``per_module`` mutants of each target, drawn with ``random.Random(seed)``, in run
    order (one of each module in turn)."""
    rng = random.Random(seed)
    per = []
    for t in targets:
        sites = list_mutants(t, root)
        per.append(sorted(rng.sample(sites, min(per_module, len(sites))),
                          key=lambda m: (m.qualname, m.index, m.op)))
    # round robin over modules: a run cut short by its budget still covers every module
    return [m for rnd in itertools.zip_longest(*per) for m in rnd if m is not None]


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
_IGNORE = shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache",
                                 "*.egg-info", ".hypothesis", "mutants", ".benchmarks", "out")


def make_workers(n: int, base: Path) -> list[Path]:
    """``n`` private copies of the tree under ``base`` (``shared/`` linked beside them)."""
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (base / "shared").symlink_to(shared)
    dirs = []
    for i in range(n):
        d = base / f"w{i}"
        shutil.copytree(ROOT, d, ignore=_IGNORE, symlinks=True)
        dirs.append(d)
    return dirs


@dataclass
class Outcome:
    """How one test run ended: ``killed`` (failed, errored or timed out) and in what time."""

    killed: bool
    status: str
    seconds: float
    detail: str = ""


def run_tests(tree: Path, tests: tuple[str, ...], select: str, timeout: float) -> Outcome:
    """Run ``pytest -x`` on ``tests`` inside ``tree`` (its own ``gator_hw`` first on the path)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header",
           "-W", "ignore", *tests]
    if select:
        cmd += ["-k", select]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(True, "timeout", time.perf_counter() - t0)
    dt = time.perf_counter() - t0
    tail = (proc.stdout.strip().splitlines() or [""])[-1][:200]
    status = {0: "survived", 1: "failed", 5: "no-tests"}.get(proc.returncode, "error")
    return Outcome(proc.returncode not in (0, 5), status, dt, tail)


@dataclass
class Result:
    """A mutant and what the older and the new tests did with it."""

    mutant: Mutant
    before: Outcome
    after: Outcome | None = None
    equivalent: str = ""

    @property
    def killed_before(self) -> bool:
        return self.before.killed

    @property
    def killed_after(self) -> bool:
        return self.before.killed or (self.after is not None and self.after.killed)


@dataclass
class Pool:
    """Worker trees handed out one at a time, plus each test set's clean time (for timeouts)."""

    trees: queue.Queue
    clean_s: dict[tuple, float] = field(default_factory=dict)

    def timeout(self, tests: tuple[str, ...], select: str) -> float:
        return max(60.0, 3.0 * self.clean_s.get((tests, select), 60.0) + 30.0)


def check_clean(pool: Pool, targets: tuple[Target, ...], workers: int,
                log: Callable[[str], None]) -> set[str]:
    """Run each distinct test set unmutated; return the modules whose tests are not green."""
    sets = sorted({(t.tests, t.select) for t in targets} | {(NEW_TESTS, "")})

    def clean(s: tuple[tuple[str, ...], str]) -> tuple[tuple, Outcome]:
        tree = pool.trees.get()
        try:
            return s, run_tests(tree, s[0], s[1], 900)
        finally:
            pool.trees.put(tree)

    bad: set[tuple] = set()
    with ThreadPoolExecutor(workers) as ex:
        for (tests, select), out in ex.map(clean, sets):
            pool.clean_s[(tests, select)] = out.seconds
            log(f"clean {' '.join(tests)}{' -k ' + select if select else ''}: {out.status} "
                f"in {out.seconds:.0f} s")
            if out.killed:
                bad.add((tests, select))
    return {t.path for t in targets if (t.tests, t.select) in bad or (NEW_TESTS, "") in bad}


def run_mutant(pool: Pool, target: Target, m: Mutant) -> Result:
    """Apply ``m`` in a free worker tree, run the older tests, then, if it survives them, the
    new tests."""
    tree = pool.trees.get()
    path = tree / m.path
    original = path.read_text()
    try:
        path.write_text(mutated_source(original, m))
        before = run_tests(tree, target.tests, target.select,
                           pool.timeout(target.tests, target.select))
        after = None
        if not before.killed:
            after = run_tests(tree, NEW_TESTS, "", pool.timeout(NEW_TESTS, ""))
        return Result(m, before, after, EQUIVALENT.get(m.key, ""))
    finally:
        path.write_text(original)
        pool.trees.put(tree)


def _previous(path: Path | None) -> dict[str, dict]:
    """Mutant key -> its recorded result, from an earlier report (``--rerun``)."""
    if path is None:
        return {}
    return {r["key"]: r for r in json.loads(path.read_text()).get("results", [])}


def _reuse(m: Mutant, prev: dict | None) -> Result | None:
    """An earlier result of ``m``: the whole result if it was killed; a survivor runs again
    against all its tests (the module's own test files may have grown since)."""
    if prev is None or not prev["killed_after"]:
        return None
    before = Outcome(**prev["before"])
    after = Outcome(**prev["after"]) if prev.get("after") else None
    return Result(m, before, after, EQUIVALENT.get(m.key, ""))


def summarize(results: list[Result], sampled: dict[str, int]) -> dict:
    """Per module: sampled, run, killed before / after, kill rates; plus every survivor."""
    modules = {}
    for path, n in sampled.items():
        rs = [r for r in results if r.mutant.path == path]
        kb, ka = sum(r.killed_before for r in rs), sum(r.killed_after for r in rs)
        eq = sum(1 for r in rs if not r.killed_after and r.equivalent)
        modules[path] = {
            "sampled": n, "run": len(rs), "killed_before": kb, "killed_after": ka,
            "equivalent": eq,
            "kill_rate_before": kb / len(rs) if rs else None,
            "kill_rate_after": ka / len(rs) if rs else None,
        }
    run = len(results)
    kb, ka = sum(r.killed_before for r in results), sum(r.killed_after for r in results)
    eq = sum(1 for r in results if not r.killed_after and r.equivalent)
    total = {"run": run, "killed_before": kb, "killed_after": ka, "equivalent": eq,
             "kill_rate_before": kb / run if run else None,
             "kill_rate_after": ka / run if run else None,
             "kill_rate_after_excluding_equivalent": ka / (run - eq) if run - eq else None}
    survivors = [{**asdict(r.mutant), "key": r.mutant.key, "equivalent": r.equivalent}
                 for r in results if not r.killed_after]
    closed = [r.mutant.key for r in results if not r.killed_before and r.killed_after]
    rows = [{"key": r.mutant.key, "path": r.mutant.path, "killed_before": r.killed_before,
             "killed_after": r.killed_after, "before": asdict(r.before),
             "after": asdict(r.after) if r.after else None} for r in results]
    return {"modules": modules, "total": total, "survivors": survivors,
            "killed_only_by_new_tests": closed, "results": rows}


def _pct(x: float | None) -> str:
    return "   -" if x is None else f"{100 * x:4.0f}"


def print_table(report: dict) -> None:
    """Kill rate per module (before and after the new tests), then the survivors."""
    print(f"\n{'module':34s} {'run':>4s} {'before%':>8s} {'after%':>7s}")
    for path, m in report["modules"].items():
        print(f"{path:34s} {m['run']:4d} {_pct(m['kill_rate_before']):>8s} "
              f"{_pct(m['kill_rate_after']):>7s}")
    t = report["total"]
    print(f"{'total':34s} {t['run']:4d} {_pct(t['kill_rate_before']):>8s} "
          f"{_pct(t['kill_rate_after']):>7s}  (excluding equivalent: "
          f"{_pct(t['kill_rate_after_excluding_equivalent']).strip()} %)")
    for s in report["survivors"]:
        tag = f"  [equivalent: {s['equivalent']}]" if s["equivalent"] else ""
        print(f"SURVIVED L{s['line']} {s['key']}{tag}")


def run_sample(args: argparse.Namespace) -> dict:
    """The sampled mutation run: clean check, then mutants until the budget is spent."""
    targets = tuple(t for t in TARGETS if not args.module or any(k in t.path
                                                                 for k in args.module))
    by_path = {t.path: t for t in targets}
    if args.list:
        for m in sample(targets, args.per_module, args.seed):
            print(f"L{m.line} {m.key}")
        return {}
    t_end = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gator-mutation-") as base:
        trees: queue.Queue = queue.Queue()
        dirs = make_workers(args.workers, Path(base))
        for d in dirs:
            trees.put(d)
        # sites are listed in the copies (the live tree may change while this runs)
        mutants = sample(targets, args.per_module, args.seed, dirs[0])
        sampled = {t.path: sum(1 for m in mutants if m.path == t.path) for t in targets}
        pool = Pool(trees)
        bad = check_clean(pool, () if args.rerun else targets, args.workers, print)
        todo = [m for m in mutants if m.path not in bad]
        results: list[Result] = []
        counter = itertools.count(1)

        prev = _previous(args.rerun)

        def one(m: Mutant) -> Result | None:
            done = _reuse(m, prev.get(m.key))
            if done is not None:
                return done
            if time.monotonic() > t_end:
                return None
            r = run_mutant(pool, by_path[m.path], m)
            state = "killed" if r.killed_before else ("killed by new tests" if r.killed_after
                                                      else "SURVIVED")
            print(f"[{next(counter)}/{len(todo)}] {state:19s} {r.before.status:8s} "
                  f"{r.before.seconds:4.0f} s L{m.line} {m.key}", flush=True)
            return r

        with ThreadPoolExecutor(args.workers) as ex:
            for r in ex.map(one, todo):
                if r is not None:
                    results.append(r)
    report = summarize(results, sampled)
    report["settings"] = {"seed": args.seed, "per_module": args.per_module,
                          "workers": args.workers, "budget_s": args.budget_s,
                          "not_run": len(todo) - len(results),
                          "not_green_modules": sorted(bad),
                          "wall_s": round(args.budget_s - (t_end - time.monotonic()), 1)}
    report["targets"] = [asdict(t) for t in targets]
    print_table(report)
    return report


def run_planted(args: argparse.Namespace) -> dict:
    """Replay each planted bug: which tests (older ones of its module, the new ones) catch it."""
    older = {t.path: t.tests for t in TARGETS} | PLANTED_TESTS
    rows = []
    with tempfile.TemporaryDirectory(prefix="gator-planted-") as base:
        tree = make_workers(1, Path(base))[0]
        for path, old, new, what in PLANTED:
            f = tree / path
            text = f.read_text()
            if text.count(old) != 1:
                rows.append({"bug": what, "error": f"text not found once in {path}"})
                continue
            f.write_text(text.replace(old, new))
            try:
                b = run_tests(tree, older[path], "", 900)
                a = run_tests(tree, NEW_TESTS, "", 900)
            finally:
                f.write_text(text)
            rows.append({"bug": what, "path": path, "caught_by_older_tests": b.killed,
                         "caught_by_new_tests": a.killed, "new_tests_said": a.detail})
            print(f"{what:60s} older: {'caught' if b.killed else 'MISSED':7s} "
                  f"new: {'caught' if a.killed else 'MISSED'}", flush=True)
    return {"planted": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-module", type=int, default=5, help="mutants sampled per module")
    p.add_argument("--seed", type=int, default=15, help="seed of the sample")
    p.add_argument("--workers", type=int, default=2, help="mutants run at once")
    p.add_argument("--budget-s", type=float, default=1800.0,
                   help="start no mutant after this many seconds")
    p.add_argument("--module", action="append", default=[],
                   help="only modules whose path contains this (repeatable)")
    p.add_argument("--list", action="store_true", help="print the sample, run nothing")
    p.add_argument("--planted", action="store_true", help="replay the planted bugs of #15")
    p.add_argument("--rerun", type=Path, default=None,
                   help="an earlier report: reuse its kills, run only its survivors again")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "mutation.json")
    args = p.parse_args(argv)
    report = run_planted(args) if args.planted else run_sample(args)
    if not args.list:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
